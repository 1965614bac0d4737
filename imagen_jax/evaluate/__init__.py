"""Text-to-image quality evaluation on the labelled digits benchmark.

python evaluate.py --checkpoints runs/digits --num 500      # or python -m imagen_jax.evaluate

judge.py    the classifier that scores images (trained on real train digits, cached)
metrics.py  adherence, entropy, Fréchet distance, k-NN precision/recall, nearest distance
scoring.py  prompts, one `score` for every row, calibration rows, the table
runner.py   restore a base stage, sample, score (`run`); `make_train_eval_fn` for train.py
cli.py      absl flags -> runner
"""

_RUNNER_NAMES = ('EvalError', 'EvalRequest', 'make_train_eval_fn', 'run')

__all__ = list(_RUNNER_NAMES)


def __getattr__(name: str):
  if name in _RUNNER_NAMES:
    from imagen_jax.evaluate import runner

    return getattr(runner, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
