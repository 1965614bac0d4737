"""device_memory: a compiled program's memory from XLA, and the warning when it will not fit."""

import logging
import re

import jax
import jax.numpy as jnp
import pytest

from imagen_jax import device_memory

pytestmark = pytest.mark.unit

FIXES = 'Lower train.batch_size.'


def _compiled():
  def f(x):  # exp(x) feeds two products: a 1 MiB temporary
    t = jnp.exp(x)
    return (t @ t[:8].T).sum(0) + (t.T @ t[:, :8]).sum(1)[:8]

  x = jnp.zeros((256, 1024), jnp.float32)  # a 1 MiB argument
  return jax.jit(f).lower(x).compile()


def test_the_analysis_of_a_compiled_program():
  mem = device_memory.analyse(_compiled())
  assert mem.argument == 256 * 1024 * 4 and mem.output == 8 * 4
  assert mem.temp >= 256 * 1024 * 4
  assert mem.total == mem.argument + mem.output + mem.temp - mem.alias
  assert mem.allocated_by_run == mem.output + mem.temp - mem.alias
  assert mem.as_gb()['argument_gb'] == 0.001

  class NoAnalysis:
    def memory_analysis(self):
      raise NotImplementedError('UNIMPLEMENTED')

  assert device_memory.analyse(NoAnalysis()) is None


def test_cpu_counts_every_local_devices_run_against_host_memory():
  mem = device_memory.ProgramMemory(argument=10**9, output=10**9, temp=3 * 10**9, alias=10**9)
  cpus = jax.devices('cpu')[:2]
  level, line = device_memory.check(mem, cpus, what='Step', fixes=FIXES, available=20 * 10**9)
  assert level == logging.INFO
  assert line == (
    'Step: per device 1.0 GB of arguments, 1.0 GB of outputs (1.0 GB of them in donated '
    'buffers), 3.0 GB of temporaries; 6.0 GB more host memory, 20.0 GB available.'
  )
  level, line = device_memory.check(mem, cpus, what='Step', fixes=FIXES, available=5 * 10**9)
  assert level == logging.WARNING
  assert line.endswith(
    '6.0 GB more host memory, 5.0 GB available: the system may end the process for lack of '
    'memory (with no error message). Lower train.batch_size.'
  )
  assert device_memory.check(None, cpus, what='Step', fixes=FIXES) is None


class FakeGpu:
  platform = 'gpu'
  device_kind = 'NVIDIA H100 80GB HBM3'

  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    if isinstance(self.stats, Exception):
      raise self.stats
    return self.stats


def test_an_accelerator_compares_the_whole_footprint_with_its_limit():
  mem = device_memory.ProgramMemory(
    argument=30 * 10**9, output=30 * 10**9, temp=40 * 10**9, alias=30 * 10**9
  )
  gpu = FakeGpu({'bytes_limit': 79 * 10**9, 'bytes_in_use': 0})
  level, line = device_memory.check(mem, [gpu], what='Step', fixes=FIXES)
  assert level == logging.INFO
  assert line.endswith('70.0 GB in all of the 79.0 GB of a NVIDIA H100 80GB HBM3.')
  level, line = device_memory.check(mem, [gpu], what='Step', fixes=FIXES, limit=60 * 10**9)
  assert level == logging.WARNING
  assert line.endswith(': it will run out of device memory. Lower train.batch_size.')
  # Other buffers already on the device (e.g. the other stages' params while one samples) count:
  # 30 GB in use beyond the 30 GB of live arguments, plus the 40 GB the run allocates.
  held = FakeGpu({'bytes_limit': 79 * 10**9, 'bytes_in_use': 60 * 10**9})
  level, line = device_memory.check(mem, [held], what='Step', fixes=FIXES)
  assert level == logging.WARNING
  assert '100.0 GB in all of the 79.0 GB of a NVIDIA H100 80GB HBM3 (with the 60.0 GB' in line
  for stats in ({}, None, RuntimeError('no stats')):  # no limit known: the figures alone
    level, line = device_memory.check(mem, [FakeGpu(stats)], what='Step', fixes=FIXES)
    assert level == logging.INFO and line.endswith('of temporaries.')


def test_log_check_logs_the_compiled_programs_figures(caplog):
  with caplog.at_level(logging.INFO, logger='imagen_jax.device_memory'):
    device_memory.log_check(_compiled(), jax.devices('cpu')[:1], what='Probe', fixes=FIXES)
  assert 'Probe: per device 1 MB of arguments' in caplog.text


def test_in_training_samplers_name_their_own_settings_when_out_of_memory():
  from imagen_jax import train_lib

  def grid(ema_params, step):
    raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 12 bytes.')

  named = train_lib._in_training_sampler(
    grid, 'Grid', 'sampling the in-training grid', 'Fewer prompts.'
  )
  with pytest.raises(train_lib.TrainingError) as raised:
    named(None, 5000)
  assert str(raised.value) == (
    'Out of memory sampling the in-training grid at step 5000 (RESOURCE_EXHAUSTED: Out of '
    'memory allocating 12 bytes): Fewer prompts. The checkpoints saved so far are kept; the '
    'command with that change resumes from the newest.'
  )

  def other(ema_params, step):
    raise jax.errors.JaxRuntimeError('INTERNAL: something else')

  with pytest.raises(jax.errors.JaxRuntimeError, match='INTERNAL'):
    train_lib._in_training_sampler(other, 'X', 'x', 'y')(None, 1)
  assert train_lib._in_training_sampler(None, 'X', 'x', 'y') is None
  assert train_lib._in_training_sampler(lambda p, s: (p, s), 'X', 'x', 'y')(1, 2) == (1, 2)


def test_in_training_samplers_log_their_first_call_and_how_it_compiled(caplog):
  from imagen_jax import train_lib

  calls = []

  @jax.jit
  def square(x):
    return x * x + 0.5  # a program of its own

  def grid(ema_params, step):
    calls.append(step)
    return square(jnp.full((3,), float(len(calls) + 7)))

  logged = train_lib._in_training_sampler(grid, 'In-training sample grid', 'x', 'y')
  with caplog.at_level(logging.INFO, logger='imagen_jax.train_lib'):
    assert float(logged(None, 500)[0]) == 64.5
    assert float(logged(None, 1000)[0]) == 81.5
  lines = [r.getMessage() for r in caplog.records if 'In-training' in r.getMessage()]
  assert len(lines) == 1, lines  # the first call only
  assert re.fullmatch(
    r'In-training sample grid at step 500: \d+\.\d s, compile included \('
    r'(compiled|loaded from the persistent compilation cache)\)\.',
    lines[0],
  ), lines
  assert calls == [500, 1000]
