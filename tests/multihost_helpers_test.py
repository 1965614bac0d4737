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
