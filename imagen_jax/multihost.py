"""Helpers for runs over several JAX processes (`jax.distributed.initialize`d); with one
process each is a no-op or trivial."""

import atexit
import itertools
import json
import os
import pathlib
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_barrier_count = itertools.count()  # every process passes the same barriers in the same order


BARRIER_TIMEOUT_SETTING = 'IMAGEN_JAX_BARRIER_TIMEOUT_S'
DEFAULT_BARRIER_TIMEOUT_S = 3600  # the slowest legitimate wait: a peer compiling or encoding


# A process that fails alone (cli.fail) puts its line here; every other process watches for it
# (`watch_for_failures`) and ends with that line, rather than waiting in its next collective for
# a peer that is gone until JAX's heartbeat timeout aborts it (100 s, rc -6, no reason given).
FAILURE_KEY = 'imagen_jax/failure'
_DONE_PREFIX = 'imagen_jax/failure_done/'  # a process ending after a failure: its last use
ENDING = threading.Lock()  # held by whichever thread ends this process: one error line


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


def distributed_runtime() -> tuple[Any, int, int] | None:
  """(coordination client, this process, process count) of a jax.distributed run of several
  processes, else None. Reads jax.distributed's state, so the backend is not started."""
  from jax._src import distributed

  state = distributed.global_state
  if state.client is None or (state.num_processes or 1) < 2:
    return None
  return state.client, int(state.process_id), int(state.num_processes)


def announce_failure(message: str, code: int) -> None:
  """Tell the other processes that this one ends with `message` and exit code `code` (the first
  process to fail is the one they report). Best effort: a store that is gone leaves the peers
  to JAX's heartbeat timeout, as before. Called by `cli.fail`, which then ends the process
  (holding ENDING, so a failure that a peer announces at the same moment prints no second
  line)."""
  runtime = distributed_runtime()
  if runtime is None:
    return
  client, me, count = runtime
  try:
    client.key_value_set(FAILURE_KEY, json.dumps({'process': me, 'code': code, 'message': message}))
  except Exception:  # noqa: BLE001 - another process failed first (its line is the one shown),
    pass  # or the store is gone
  _leave(client, me, count)


def _leave(client: Any, me: int, count: int, wait_s: float = 5.0) -> None:
  """The last use of the store by a process that ends after a failure. Process 0 hosts the
  store, and when it ends JAX aborts every process still connected (rc -6, its own message):
  so it waits, at most `wait_s`, until each process has said it is done with the store."""
  try:
    client.key_value_set(_DONE_PREFIX + str(me), '1')
    if me != 0:
      return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and len(client.key_value_dir_get(_DONE_PREFIX)) < count:
      time.sleep(0.05)
    time.sleep(0.2)  # a peer's last step after its key: os._exit
  except Exception:  # noqa: BLE001 - the store is gone: nothing more to wait for
    pass


def watch_for_failures(poll_ms: int = 1000) -> None:
  """Start a daemon thread that ends this process as soon as another one announces a failure
  (`announce_failure`): `error: Process P of N failed, so this one stops too: <its line>` on
  stderr and the same exit code. The main thread may be blocked in a collective that the
  failed process will never join. No-op with one process; stopped at a normal exit before JAX
  shuts the distributed runtime down."""
  runtime = distributed_runtime()
  if runtime is None:
    return
  client, me, count = runtime
  stop = threading.Event()

  def watch() -> None:
    while not stop.is_set():
      try:
        value = client.blocking_key_value_get(FAILURE_KEY, poll_ms)
      except Exception as e:  # noqa: BLE001 - the runtime's error types are not public
        if 'DEADLINE_EXCEEDED' in str(e):
          continue  # no failure yet
        return  # the store is gone (a normal shutdown, or process 0 ended): JAX reports that
      failure = json.loads(value)
      if failure['process'] == me:
        return  # this process's own failure: cli.fail ends it
      ENDING.acquire()  # blocks for good if this process is already failing on its own
      print(
        f'error: Process {failure["process"]} of {count} failed, so this one stops too: '
        f'{failure["message"]}',
        file=sys.stderr,
      )
      sys.stdout.flush()
      sys.stderr.flush()
      _leave(client, me, count)
      os._exit(int(failure['code']))

  thread = threading.Thread(target=watch, name='imagen_jax-failure-watch', daemon=True)
  thread.start()

  def finish() -> None:  # registered after JAX's own exit handler, so it runs before it
    stop.set()
    thread.join(timeout=poll_ms / 1000 + 5)

  atexit.register(finish)
