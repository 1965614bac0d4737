"""Helpers for runs over several JAX processes (`jax.distributed.initialize`d); with one
process each is a no-op or trivial."""

import itertools
import json
import os
import pathlib
import socket
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_barrier_count = itertools.count()  # every process passes the same barriers in the same order


BARRIER_TIMEOUT_SETTING = 'IMAGEN_JAX_BARRIER_TIMEOUT_S'
DEFAULT_BARRIER_TIMEOUT_S = 3600  # the slowest legitimate wait: a peer compiling or encoding


class PeersLostError(RuntimeError):
  """Another process did not reach a barrier in time (it failed, hangs, or was stopped)."""


def barrier_timeout_s() -> int:
  """IMAGEN_JAX_BARRIER_TIMEOUT_S (seconds), default one hour; ValueError for a bad value."""
  raw = os.environ.get(BARRIER_TIMEOUT_SETTING, '').strip()
  if not raw:
    return DEFAULT_BARRIER_TIMEOUT_S
  try:
    value = int(raw)
  except ValueError:
    value = 0
  if value < 1:
    raise ValueError(f'{BARRIER_TIMEOUT_SETTING}={raw!r}: use a whole number of seconds >= 1.')
  return value


def barrier(name: str, timeout_s: int | None = None) -> None:
  """Wait until every process reaches `name` (no-op with one process), at most `timeout_s`
  (default `barrier_timeout_s()`); PeersLostError, one line naming the barrier, when a peer
  does not come (before: XLA's DEADLINE_EXCEEDED traceback).

  Through the distributed runtime's own barrier, not a device collective: on CPU, gloo gives up
  on a collective whose peers arrive more than 30 s apart, which a skew in compile or encode
  times (one host finding a program in the compilation cache, another compiling it) exceeds.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the public multihost_utils barrier is a collective

  timeout_s = barrier_timeout_s() if timeout_s is None else timeout_s
  unique = f'{name}#{next(_barrier_count)}'  # a barrier id is used once
  try:
    distributed.global_state.client.wait_at_barrier(unique, timeout_s * 1000)
  except Exception as e:  # noqa: BLE001 - the runtime's error types are not public
    text = ' '.join(str(e).split())[:300]
    raise PeersLostError(
      f'Process {jax.process_index()} of {jax.process_count()} waited at {name!r} and not every '
      f'process came within {timeout_s} s ({text}): another process failed, hangs or was '
      f'stopped; its log says why. {BARRIER_TIMEOUT_SETTING} sets the wait.'
    ) from e


def compiled_together(jitted: Callable, name: str) -> Callable:
  """`jitted` (a jax.jit function) compiled for each new signature of its arguments (tree
  structure, shapes, dtypes, shardings, memory layouts), then barrier `name`, so that every
  process starts its collectives together (gloo's 30 s limit, see `barrier`); a call with a
  signature seen before reuses that compiled program. Every process makes the same calls, so
  all compile (and pass the barrier) at the same calls. Each call returns finished results: two
  calls with no data between them could otherwise run at once, and their collectives pair up
  wrongly across processes (seen: both processes hung in per-leaf checkpoint checksums)."""
  compiled: dict[Any, Any] = {}

  def run(*args):
    key = argument_signature(args)
    if key not in compiled:
      compiled[key] = jitted.lower(*args).compile()
      barrier(name)
    return jax.block_until_ready(compiled[key](*args))

  return run


def argument_signature(args: Any) -> tuple:
  """What a compiled program is specific to in a tree of arguments: its structure (None leaves
  included), and each array's shape, dtype, sharding and memory layout."""
  leaves, treedef = jax.tree.flatten(args)
  return (treedef, tuple(_signature(x) for x in leaves))


def _signature(x: Any) -> tuple:
  if isinstance(x, jax.Array):
    # The memory layout too: a program compiled for one (train.state_layout's conv kernels,
    # or a just-restored row-major leaf of the same shape) refuses arrays in another.
    fmt = getattr(x, 'format', None)  # typed PRNG key arrays have none
    layout = None if fmt is None or fmt.layout is None else fmt.layout.major_to_minor
    return (x.shape, x.dtype, x.sharding, layout)
  x = np.asarray(x)
  return (x.shape, x.dtype)


def allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-serialisable `value`, in process order (a barrier too)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils

  barrier('imagen_jax:allgather')  # the peers arrive together (see `barrier`)
  data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(rows[i, : sizes[i]]).decode()) for i in range(len(sizes))]


def check_writable(folder: pathlib.Path) -> None:
  """Create folder (and parents) and write and remove a probe file in it; OSError if it cannot.
  The probe is named after the host and process, so processes sharing the folder never remove
  each other's probe."""
  folder.mkdir(parents=True, exist_ok=True)
  probe = folder / f'.write_test.{socket.gethostname()}.{os.getpid()}'
  try:
    probe.write_text('ok')
  finally:  # also a probe created on a full disk, whose write then failed
    probe.unlink(missing_ok=True)
