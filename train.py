"""Train one cascade stage.

  python train.py --config=configs/base64.py --workdir=runs/base64
  python train.py --config=configs/sr256.py --workdir=runs/sr256 --config.optim.lr=5e-5
  python train.py --config=configs/base64.py:tiny --workdir=/tmp/tiny
  python train.py --config=configs/base64.py --workdir=runs/base64 --config.train.resume_step=4000

Resumes from the newest checkpoint in --workdir that verifies (a damaged one is reported and
passed over); --config.train.resume_step=N resumes from kept step N instead. Multi-host (TPU pods,
GPU clusters): launch one process per host; jax.distributed.initialize() picks up the cluster.

Exit codes: 0 finished; 1 training error (message on stderr); 2 bad flags or config;
75 stopped early by SIGTERM/SIGINT after saving (resume with the same command; schedulers may
requeue on it).
"""

import logging

from absl import flags
from ml_collections import config_flags

from imagen_jax import cli

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early by a signal, checkpoint saved, resumable

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Stage config file, e.g. configs/base64.py.', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, logs, sample grids.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-process runs).')
flags.DEFINE_string(
  'coordinator_address',
  None,
  'With --distributed: host:port of process 0 (default: from the '
  'cluster environment: TPU pod, SLURM, ...).',
)
flags.DEFINE_integer('num_processes', None, 'With --distributed: the number of processes.')
flags.DEFINE_integer('process_id', None, 'With --distributed: this process, 0..num_processes-1.')
flags.DEFINE_integer(
  'coordinator_timeout', 300, 'With --distributed: seconds to wait for every process to join.'
)
flags.mark_flags_as_required(['config', 'workdir'])


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Until the coordinator accepts TCP connections; one line and exit 1 after `timeout` s.

  (jax's own client aborts the whole process with a C++ stack trace when its deadline passes.)
  """
  import socket
  import time

  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return
    except (OSError, ValueError) as e:
      if time.monotonic() > deadline:
        cli.fail(
          f'--distributed: no coordinator answered at {address} within {timeout} s '
          f'({e}). Start process 0 (--process_id=0) with the same --coordinator_address, '
          'or raise --coordinator_timeout.',
          code=1,
        )
      time.sleep(0.5)


def _initialize_distributed(jax) -> None:
  """jax.distributed.initialize with the flags; one line instead of a hang or a traceback."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU runs; no-op elsewhere
  if FLAGS.coordinator_address and FLAGS.process_id:  # not process 0, which hosts the service
    _wait_for_coordinator(FLAGS.coordinator_address, FLAGS.coordinator_timeout)
  try:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
      initialization_timeout=FLAGS.coordinator_timeout,
    )
  except (RuntimeError, ValueError) as e:
    where = FLAGS.coordinator_address or 'the address from the cluster environment'
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cli.fail(
      f'--distributed: could not join the other processes through the coordinator at {where} '
      f'within {FLAGS.coordinator_timeout} s ({first[:200]}). Check that every process was '
      'started with the same --coordinator_address and --num_processes and a distinct '
      '--process_id, and that process 0 is reachable.',
      code=1,
    )


def main(argv):
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments: {argv[1:]}; overrides look like --config.optim.lr=1e-4.')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's per-save INFO lines
  import jax

  if FLAGS.distributed:
    _initialize_distributed(jax)
  from imagen_jax import checkpoints, train_lib

  checkpoints.quiet_orbax_noise()
  try:
    metrics = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (
    train_lib.TrainingError,
    checkpoints.CheckpointError,
    ValueError,
    FileNotFoundError,
  ) as e:
    cli.fail(str(e), code=1)
  step = metrics.get('step')
  if metrics.get('stopped_by'):
    print(
      f'stopped at step {step} ({metrics["stopped_by"]}); checkpoint saved in '
      f'{FLAGS.workdir}/checkpoints; resume with the same command.'
    )
    raise SystemExit(EXIT_STOPPED)
  print(
    f'done: step {step}, loss {metrics.get("loss", float("nan")):.4f}; '
    f'checkpoints in {FLAGS.workdir}/checkpoints'
  )


if __name__ == '__main__':
  cli.run(main)
