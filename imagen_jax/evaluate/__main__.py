"""python -m imagen_jax.evaluate --checkpoints RUN --num 500 (see cli.py)."""

from absl import flags

from imagen_jax.evaluate import cli

flags.adopt_module_key_flags(cli)  # --helpshort lists its flags

if __name__ == '__main__':
  cli.run()
