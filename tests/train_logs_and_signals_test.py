"""train_lib.MetricWriter (one W&B run per workdir, TensorBoard purged on resume) and StopSignal."""

import sys
import types

import pytest

from configs import base64
from imagen_jax import train_lib

pytestmark = pytest.mark.unit


def test_a_resumed_run_logs_into_the_same_wandb_run_and_purges_later_tensorboard_steps(
  tmp_path, monkeypatch
):
  inits, purges = [], []
  ids = iter(['first1', 'second2'])
  fake = types.ModuleType('wandb')
  fake.util = types.SimpleNamespace(generate_id=lambda: next(ids))

  class Run:
    def log(self, *args, **kwargs):
      pass

    def finish(self):
      pass

  def init(**kwargs):
    inits.append(kwargs)
    return Run()

  fake.init = init
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  import tensorboardX

  real = tensorboardX.SummaryWriter

  def writer(logdir, purge_step=None):
    purges.append(purge_step)
    return real(logdir, purge_step=purge_step)

  monkeypatch.setattr(tensorboardX, 'SummaryWriter', writer)
  config = base64.get_config('tiny')
  config.train.wandb = True
  for start in (0, 40):  # a fresh start, then a resume from step 40
    w = train_lib.MetricWriter(tmp_path, config, enabled=True, start_step=start)
    w.write(start + 1, {'loss': 0.5})
    w.close()
  assert [i['id'] for i in inits] == ['first1', 'first1'] and inits[0]['resume'] == 'allow'
  assert (tmp_path / 'wandb_run_id').read_text() == 'first1\n'
  assert purges == [1, 41]  # events of steps the new run logs again are dropped


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
