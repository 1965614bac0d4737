"""imagen_jax.compile_events: the compiles of this thread inside the block, nothing else."""

import threading

import jax
import jax.numpy as jnp
import pytest

from imagen_jax import compile_events

pytestmark = pytest.mark.unit


def test_counts_this_threads_compiles_inside_the_block_only():
  x = jax.block_until_ready(jnp.arange(5.0))
  jax.block_until_ready(jax.jit(lambda y: y + 7)(x))  # before the block: not counted
  with compile_events.counting() as made:
    other = threading.Thread(target=lambda: jax.block_until_ready(jax.jit(lambda y: y - 2)(x)))
    other.start()
    other.join()
    assert made.programs == 0  # another thread's compile
    jax.block_until_ready(jax.jit(lambda y: y * 3 + 1)(x))
    assert made.programs == 1
  jax.block_until_ready(jax.jit(lambda y: y / 4)(x))  # after the block: not counted
  assert made.programs == 1
  if not jax.config.jax_compilation_cache_dir:  # conftest gives one to CLI subprocesses only
    assert made.cache_hits == 0 and made.summary() == 'compiled'


def test_summary_names_what_the_cache_gave():
  assert compile_events.Compiles(1, 0).summary() == 'compiled'
  assert compile_events.Compiles(2, 2).summary() == 'loaded from the persistent compilation cache'
  assert compile_events.Compiles(3, 2).summary() == (
    'compiled (1 of 3 programs; 2 loaded from the persistent compilation cache)'
  )
  assert compile_events.Compiles(0, 0).summary() == 'ready (no compile event seen)'
  total = compile_events.Compiles()
  total.add(compile_events.Compiles(1, 0))
  total.add(compile_events.Compiles(2, 1))
  assert total == compile_events.Compiles(3, 1)
