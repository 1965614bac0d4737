"""Text-to-image quality of a trained base stage on the labelled digits benchmark.

  python evaluate.py --checkpoints runs/digits --num 500
  python evaluate.py --checkpoints runs/digits@1000 --sampler ddpm --steps 64 --out eval.json

Samples class-balanced prompts (half seen, half held-out caption templates), scores them with a
judge classifier trained on the real train digits, and prints prompt adherence, predicted-class
entropy, judge-space Fréchet distance, k-NN precision/recall and the distance to the nearest
training image, beside the same metrics for calibration rows (real test images, shuffled
labels, class means, noise); last, one JSON line. Same as `python -m imagen_jax.evaluate`.
"""

from absl import flags

from imagen_jax.evaluate import cli

flags.adopt_module_key_flags(cli)  # --helpshort lists its flags

if __name__ == '__main__':
  cli.run()
