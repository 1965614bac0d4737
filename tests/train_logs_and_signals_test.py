"""train_lib.MetricWriter (one W&B run per workdir, TensorBoard purged on resume) and StopSignal."""

import sys
import types

import numpy as np
import pytest

from configs import base64
from imagen_jax import train_lib

pytestmark = pytest.mark.unit


def test_a_resumed_run_logs_into_the_same_wandb_run_and_purges_later_tensorboard_steps(
  tmp_path, monkeypatch
):
  # A stand-in for wandb (not installed here) with the calls MetricWriter makes. Checked against
  # wandb 0.31.0 in offline mode: it has no wandb.util.generate_id (so the stand-in has none), and
  # a resumed run's records keep re-run steps when the step is a logged metric, not `step=`.
  inits, purges, logs, metrics = [], [], [], []
  ids = iter(['first1', 'second2'])
  fake = types.ModuleType('wandb')

  class Run:
    def __init__(self, run_id):
      self.id = run_id

    def define_metric(self, name, **kwargs):
      metrics.append((name, kwargs))

    def log(self, data, **kwargs):
      logs.append((data, kwargs))

    def finish(self):
      pass

  def init(**kwargs):
    inits.append(kwargs)
    return Run(kwargs['id'] or next(ids))

  fake.init = init
  fake.Image = lambda array: 'image'
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  import tensorboardX

  real = tensorboardX.SummaryWriter

  def writer(logdir, purge_step=None):
    purges.append(purge_step)
    return real(logdir, purge_step=purge_step)

  monkeypatch.setattr(tensorboardX, 'SummaryWriter', writer)
  config = base64.get_config('tiny')
  config.train.wandb = True
  for start in (0, 40, 20):  # a fresh start, a resume from step 40, then from an older step 20
    w = train_lib.MetricWriter(tmp_path, config, enabled=True, start_step=start)
    w.write(start + 1, {'loss': 0.5})
    w.image(start + 1, 'samples', np.zeros((4, 4, 3), np.uint8))
    w.close()
  assert [i['id'] for i in inits] == [None, 'first1', 'first1']
  assert {i['resume'] for i in inits} == {'allow'}
  assert (tmp_path / 'wandb_run_id').read_text() == 'first1\n'
  assert purges == [1, 41, 21]  # events of steps the new run logs again are dropped
  # Every chart's x-axis is the training step, logged as a metric: W&B would drop a `step=`
  # below the run's largest (step 21 after step 41).
  assert (
    metrics == [('train/step', {}), ('*', {'step_metric': 'train/step', 'step_sync': True})] * 3
  )
  assert [(d.get('train/step'), sorted(d), k) for d, k in logs] == [
    (1, ['loss', 'train/step'], {}),
    (1, ['samples', 'train/step'], {}),
    (41, ['loss', 'train/step'], {}),
    (41, ['samples', 'train/step'], {}),
    (21, ['loss', 'train/step'], {}),
    (21, ['samples', 'train/step'], {}),
  ]


def test_wandb_that_does_not_start_is_one_line_naming_the_fixes(tmp_path, monkeypatch):
  # wandb 0.31.0 online without a login raises its UsageError, which train.py let through as a
  # traceback.
  fake = types.ModuleType('wandb')

  def init(**kwargs):
    raise RuntimeError('No API key configured. Use `wandb login` to log in.\nmore detail')

  fake.init = init
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  config = base64.get_config('tiny')
  config.train.wandb = True
  with pytest.raises(train_lib.TrainingError) as e:
    train_lib.MetricWriter(tmp_path, config, enabled=True)
  assert str(e.value) == (
    'Weights & Biases did not start (No API key configured. Use `wandb login` to log in.); '
    'nothing was trained. Log in with `wandb login`, or run with '
    '--config.train.wandb_mode=offline (sync later with `wandb sync`) or '
    '--config.train.wandb=False.'
  )
  assert not (tmp_path / 'wandb_run_id').exists()


def test_a_second_ctrl_c_stops_at_once(tmp_path, caplog, monkeypatch):
  import os
  import signal

  # A first Ctrl-C outside the loop (setup, the cache build) is not called a second one.
  monkeypatch.setattr(train_lib.StopSignal, 'first_signal_seen', False)
  assert train_lib.interrupted_message(str(tmp_path)).startswith(
    'Stopped at once by Ctrl-C outside the training loop, without saving; no checkpoint'
  )

  with train_lib.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)  # the first: save at the current step, then exit
    assert stop.received == 'SIGINT'
    assert 'Ctrl-C again: stop at once' in caplog.text
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(100):  # the handler runs between bytecodes of the main thread
        pass
  with train_lib.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's repeated SIGTERM still saves
    assert stop.received == 'SIGTERM'
  message = train_lib.interrupted_message(str(tmp_path))
  assert message == (
    'Stopped at once by a second Ctrl-C, without saving; no checkpoint was saved yet: the same '
    'command starts afresh.'
  )


_CLOSE_ON_A_FULL_DISK = """
import errno, pathlib, sys
import ml_collections
import tensorboardX.record_writer as record_writer
from imagen_jax import train_lib

config = ml_collections.ConfigDict({'train': {'wandb': False}})
writer = train_lib.MetricWriter(pathlib.Path(sys.argv[1]), config, enabled=True)
writer.write(1, {'loss': 0.5})

def full(self):
  raise OSError(errno.ENOSPC, 'No space left on device')

record_writer.RecordWriter.flush = full  # the disk filled up
writer.close()
print('closed')
"""


def test_closing_the_logs_on_a_full_disk_is_one_warning(tmp_path):
  # The first failing close skipped the others, and tensorboardX's exit hook flushed again:
  # 'Exception ignored in atexit callback' and 'Exception in thread' tracebacks after the run's
  # one-line error.
  import subprocess

  from tests.conftest import REPO_ROOT, cli_env

  proc = subprocess.run(
    [sys.executable, '-c', _CLOSE_ON_A_FULL_DISK, str(tmp_path)],
    cwd=REPO_ROOT,
    env={**cli_env(), 'PYTHONPATH': str(REPO_ROOT)},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0 and proc.stdout.strip() == 'closed', proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr and 'Exception' not in proc.stderr, proc.stderr[-2000:]
  assert 'Could not close TensorBoard (No space left on device)' in proc.stderr
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 1, "loss": 0.5}\n'


def test_catch_up_makes_only_the_grid_and_evaluation_a_stopped_run_lacks(tmp_path):
  # A kill -9 between step 4's save and its grid or evaluation: the resumed run went on without
  # them. catch_up makes what process 0's files lack (the grid PNG, the eval row).
  import json

  import jax.numpy as jnp
  import ml_collections

  made = []

  class Writer:
    def write(self, step, scalars):
      made.append(('write', step, sorted(scalars)))

    def image(self, step, name, grid):
      made.append(('image', step, name))

  config = ml_collections.ConfigDict(
    {'train': {'sample_every': 2, 'eval_every': 4}, 'data': {'lowres_resolution': 0}}
  )
  loop = train_lib._Loop(
    config=config,
    step_fn=None,
    data_iter=None,
    manager=None,
    writer=Writer(),
    sample_grid=lambda ema, step: (np.zeros((2, 2, 3), np.uint8), {}),
    eval_fn=lambda ema, step: {'adherence': 0.5, 'fd': 3.0},
    workdir_path=tmp_path,
  )
  state = {'ema_params': {'w': jnp.ones(3)}}
  (tmp_path / 'metrics.jsonl').write_text(json.dumps({'step': 4, 'loss': 0.1}) + '\n')
  scalars = loop.catch_up(state, 4, num_steps=8)
  assert made == [('image', 4, 'samples'), ('write', 4, ['eval/adherence', 'eval/fd'])]
  assert scalars == {'eval/adherence': 0.5, 'eval/fd': 3.0}
  # Both present: nothing is made again; a step with neither due: nothing either.
  (tmp_path / 'samples').mkdir()
  (tmp_path / 'samples' / 'step_00000004.png').write_bytes(b'png')
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'step': 4, 'eval/adherence': 0.5}) + '\n')
  made.clear()
  assert loop.catch_up(state, 4, num_steps=8) == {} and made == []
  assert loop.catch_up(state, 3, num_steps=8) == {} and made == []
  assert loop.catch_up(state, 3, num_steps=3) != {}  # the last step's evaluation is due
  # An SR stage's grid logs its PSNR / SSIM row after its PNG: a kill between them left the PNG.
  config.data.lowres_resolution = 8
  loop.sample_grid = lambda ema, step: (np.zeros((2, 2, 3), np.uint8), {'sr/psnr': 20.0})
  made.clear()
  assert loop.catch_up(state, 4, num_steps=8) == {'sr/psnr': 20.0}
  assert made == [('image', 4, 'samples'), ('write', 4, ['sr/psnr'])]
