"""Train one cascade stage.

  python train.py --config=configs/base64.py --workdir=runs/base64
  python train.py --config=configs/sr256.py --workdir=runs/sr256 --config.optim.lr=5e-5
  python train.py --config=configs/base64.py:tiny --workdir=/tmp/tiny

Resumes from the latest checkpoint in --workdir. Multi-host (TPU pods, GPU clusters): launch one
process per host; jax.distributed.initialize() picks up the cluster from the environment.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Stage config file, e.g. configs/base64.py.', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, logs, sample grids.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-process runs).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's per-save INFO lines
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize()
  from imagen_jax import train_lib

  try:
    metrics = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train_lib.TrainingError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(
    f'done: step {metrics.get("step")}, loss {metrics.get("loss", float("nan")):.4f}; '
    f'checkpoints in {FLAGS.workdir}/checkpoints'
  )


if __name__ == '__main__':
  app.run(main)
