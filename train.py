"""Train one cascade stage.

  python train.py --config=configs/base64.py --workdir=runs/base64
  python train.py --config=configs/sr256.py --workdir=runs/sr256 --config.optim.lr=5e-5
  python train.py --config=configs/base64.py:tiny --workdir=/tmp/tiny
  python train.py --config=configs/base64.py --workdir=runs/base64 --config.train.resume_step=4000

Resumes from the newest checkpoint in --workdir that verifies (a damaged one is reported and
passed over); --config.train.resume_step=N resumes from kept step N instead. Multi-host (TPU pods,
GPU clusters): launch one process per host with --distributed; jax.distributed.initialize() then
picks up the cluster.

Exit codes: 0 finished; 1 training error, or a config value the run refuses (one line on stderr
naming it); 2 bad flags or a config file that does not load; 75 stopped early by SIGTERM/SIGINT
after saving (resume with the same command; schedulers may requeue on it), or by a SIGTERM
outside the training loop, with no new step to save; 130 stopped at once by a second Ctrl-C (or
Ctrl-C outside the loop), without saving.
"""

import logging
import signal

from absl import flags
from ml_collections import config_flags

from imagen_jax import cli

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early by a signal, checkpoint saved, resumable

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Stage config file, e.g. configs/base64.py.', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, logs, sample grids.')
cli.define_distributed_flags()
cli.define_compilation_cache_flag()
flags.adopt_module_key_flags(cli)  # --helpshort lists them too
flags.mark_flags_as_required(['config', 'workdir'])


def _replicated_bytes(config) -> int:
  from imagen_jax import train_lib

  return train_lib.replicated_bytes(config)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments: {argv[1:]}; overrides look like --config.optim.lr=1e-4.')
  if not FLAGS.workdir.strip():
    cli.fail('--workdir is empty; pass the run folder, e.g. --workdir=runs/base64.')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's per-save INFO lines
  cli.check_distributed_flags()
  cli.keep_freed_host_buffers()
  cli.split_cpu_devices(
    FLAGS.config.train.batch_size,
    FLAGS.config.mesh,
    distributed=FLAGS.distributed,
    copy_bytes=lambda: _replicated_bytes(FLAGS.config),
  )

  if FLAGS.distributed:
    cli.initialize_distributed()
  else:
    # Outside the training loop (setup, the cache build, the restore, the compile) a SIGTERM
    # ended the process with no line and exit 143, which schedulers take for a failure; it stops
    # like one inside the loop (exit 75), with nothing new to save. Several processes leave it
    # to JAX's preemption notifier, which holds it until the loop's first step.
    signal.signal(signal.SIGTERM, cli.raise_stop)
  cli.enable_compilation_cache()
  from imagen_jax import checkpoints, multihost, train_lib

  checkpoints.quiet_orbax_noise()
  try:
    metrics = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (
    train_lib.TrainingError,
    checkpoints.CheckpointError,
    multihost.PeersLostError,
    ValueError,
    FileNotFoundError,
  ) as e:
    cli.fail(str(e), code=1)
  except KeyboardInterrupt as e:  # XLA may be compiling in its own threads: exit at once
    if cli.stop_name(e) == 'SIGTERM':
      cli.fail(train_lib.stopped_outside_message(FLAGS.workdir), EXIT_STOPPED, prefix='', now=True)
    cli.fail(train_lib.interrupted_message(FLAGS.workdir), code=130, now=True)
  except OSError as e:  # a full disk or a bad path for metrics, grids, logs
    cli.fail(train_lib.write_failed_message(FLAGS.workdir, e), code=1)
  except Exception as e:
    from imagen_jax import device_memory

    xla_message = device_memory.out_of_memory(e)
    if xla_message is None:
      raise
    cli.fail(train_lib.out_of_memory_message(FLAGS.workdir, xla_message), code=1)
  step = metrics.get('step')
  if metrics.get('stopped_by'):
    print(
      f'stopped at step {step} ({metrics["stopped_by"]}); checkpoint saved in '
      f'{FLAGS.workdir}/checkpoints; resume with the same command.'
    )
    raise SystemExit(EXIT_STOPPED)
  # A rerun of a finished run trains no step: no loss to report.
  loss = f', loss {metrics["loss"]:.4f}' if 'loss' in metrics else ' (already finished)'
  print(f'done: step {step}{loss}; checkpoints in {FLAGS.workdir}/checkpoints')


if __name__ == '__main__':
  cli.run(main)
