"""python -m imagen_jax.evaluate --checkpoints RUN --num 500 (see cli.py)."""

from imagen_jax.evaluate import cli

if __name__ == '__main__':
  cli.run()
