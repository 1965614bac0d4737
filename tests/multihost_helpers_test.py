"""multihost's helpers in one process (the multi-process runs are in multihost_test.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import multihost

pytestmark = pytest.mark.unit


def test_compiled_together_compiles_and_waits_once_per_argument_signature(monkeypatch):
  barriers, lowered = [], []
  monkeypatch.setattr(multihost, 'barrier', barriers.append)
  double = jax.jit(lambda tree: jax.tree.map(lambda x: x * 2, tree))

  class CountingJit:
    def lower(self, *args):
      lowered.append(args)
      return double.lower(*args)

  run = multihost.compiled_together(CountingJit(), 'test:compiled')
  a = jnp.arange(3.0)
  np.testing.assert_array_equal(run({'a': a})['a'], 2 * a)
  np.testing.assert_array_equal(run({'a': a + 1})['a'], 2 * (a + 1))
  assert len(lowered) == 1 and barriers == ['test:compiled']  # same signature: reused

  for other in ({'a': jnp.arange(5.0)}, {'a': jnp.arange(3)}, {'b': a}, {'a': a, 'b': a}):
    out = run(other)
    for k, v in other.items():
      np.testing.assert_array_equal(out[k], 2 * v)
  assert len(lowered) == 5 and barriers == ['test:compiled'] * 5  # shape, dtype, tree each new
  run({'a': jnp.arange(5.0) - 1})
  assert len(lowered) == 5

  # A kernel in another memory layout (train.state_layout='conv_ohwi', next to a restored
  # row-major one of the same shape): a program of its own, not one that refuses it.
  from jax.experimental.layout import Format, Layout

  k = jnp.arange(24.0).reshape(1, 2, 3, 4)
  ohwi = jax.device_put(k + 0, Format(Layout(major_to_minor=(3, 0, 1, 2)), k.sharding))
  np.testing.assert_array_equal(run({'a': k})['a'], 2 * k)
  np.testing.assert_array_equal(run({'a': ohwi})['a'], 2 * k)
  assert len(lowered) == 7


def test_a_peer_that_never_reaches_a_barrier_is_one_clear_error(monkeypatch):
  from jax._src import distributed

  waits = []

  class Client:  # the distributed runtime's client, as a barrier timeout leaves it
    def wait_at_barrier(self, name, timeout_ms):
      waits.append((name, timeout_ms))
      raise RuntimeError('DEADLINE_EXCEEDED: Barrier timed out. Id: x.\n  (details)')

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(distributed.global_state, 'client', Client())
  monkeypatch.setenv(multihost.BARRIER_TIMEOUT_SETTING, '7')
  with pytest.raises(multihost.PeersLostError) as raised:
    multihost.barrier('imagen_jax:test')
  assert waits[0][0].startswith('imagen_jax:test#') and waits[0][1] == 7000
  message = str(raised.value)
  assert message.startswith("Process 0 of 2 waited at 'imagen_jax:test' and not every process")
  assert 'within 7 s (DEADLINE_EXCEEDED: Barrier timed out. Id: x. (details))' in message
  assert message.endswith('IMAGEN_JAX_BARRIER_TIMEOUT_S sets the wait.')
  for bad in ('0', 'soon'):
    monkeypatch.setenv(multihost.BARRIER_TIMEOUT_SETTING, bad)
    with pytest.raises(ValueError, match='use a whole number of seconds >= 1'):
      multihost.barrier_timeout_s()
  monkeypatch.delenv(multihost.BARRIER_TIMEOUT_SETTING)
  assert multihost.barrier_timeout_s() == 3600
