"""Orbax checkpoints of a training run: state, data-iterator state, resolved config, checksums.

Each checkpoint step holds four items:
  state      params, EMA params, optimizer state, step, base RNG (sharded arrays)
  data       the grain iterator state (JSON), so a resumed run sees exactly the same batches
  config     the resolved ConfigDict (JSON), so sample.py can rebuild the model from it
  checksums  two wrapping uint32 sums per array (plain and position-weighted, over the raw bits)
             and a SHA-256 of each JSON item, computed before the save and verified after every
             restore: orbax restores whatever bytes are on disk, so bit rot would otherwise give
             finite but wrong values.
Saves are async and atomic (orbax writes to a temporary folder and renames it when complete),
so a save killed midway never becomes the latest checkpoint; leftover temporary folders are
removed when the manager opens. A non-finite state is never saved (`save` refuses it).

Restores fall back: a resume (`train_lib`) and `restore_params` try the requested or latest step,
and on a checkpoint that does not load or fails verification log its step and path and try the
previous kept one. With several processes, every process restores on its own (no orbax barrier)
and they agree after each step tried: a step that fails on any process is passed over by all, and
processes that see different kept steps refuse to start, so they never resume from different
steps.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from imagen_jax import device_memory, multihost

log = logging.getLogger(__name__)

ITEMS = ('state', 'data', 'config', 'checksums')
CHECKSUM_VERSION = 2  # what saves write; versions 1 and 2 verify (`_fingerprint`)
SET_ASIDE_DIR = 'checkpoints_set_aside'


# Orbax notes logged every time a checkpoint folder is opened read-only, as sampling does: the
# settings they mention are the read-only defaults, nothing is wrong. Only these are dropped.
ORBAX_READ_ONLY_NOTES = (
  'CheckpointManagerOptions.read_only=True, setting ',
  'Given directory is read only=',
)


class _DropOrbaxReadOnlyNotes(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(ORBAX_READ_ONLY_NOTES)


_unloadable_steps: set[str] = set()  # 'step folder/' of each that failed to load here


class _DropOrbaxOrphanTaskErrors(logging.Filter):
  """asyncio's "... exception was never retrieved" for the reads of a step that failed to load:
  when one array of a damaged checkpoint fails, orbax's gather stops at that first error (the one
  reported, `_does_not_load`) and its sibling reads fail unobserved; asyncio logs each, with a
  traceback, when it is garbage collected, at random, often during the next restore. Orbax's own
  tasks are recognised by their coroutine's file; tensorstore's bare futures by the step folder
  their error names, which must be one that already failed to load here."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    if msg.startswith('Task exception was never retrieved'):
      return '/orbax/' not in msg
    if msg.startswith('Future exception was never retrieved'):
      return not any(folder in msg for folder in _unloadable_steps)
    return True


UNFINISHED_SAVE = '.orbax-checkpoint-tmp'  # orbax's folder of a save not yet committed
_ORBAX_READ = '_read_array_index_and_device_put'  # orbax's coroutine reading one array's shard


class _DropUnfinishedSaveErrors(logging.Filter):
  """Errors that orbax's save threads log with a traceback each (5 or more, and asyncio's
  "exception was never retrieved" for their sibling writes) when a write into a save's
  unfinished folder fails, e.g. the disk filled up: the save's failure reaches the caller's
  wait or next save, and train.py reports it in one line (which checkpoints are kept, what to
  do); the unfinished folder never becomes a checkpoint."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    text = str(record.msg) + ' '.join(map(str, record.args or ()))
    if record.exc_info and record.exc_info[1] is not None:
      text += str(record.exc_info[1])
    return UNFINISHED_SAVE not in text


def quiet_orbax_noise() -> None:
  """For entry points: drop orbax's read-only notes (ORBAX_READ_ONLY_NOTES), and the noise a
  damaged checkpoint leaves after it fails to load, which the restore functions here already
  report in one line: the "RuntimeError: Event loop is closed" tracebacks that tensorstore read
  callbacks print (as unraisable exceptions, ~100 of them) and those of orbax's read coroutines
  collected unfinished, and asyncio's "Task/Future exception was never retrieved" for the
  sibling reads (`_DropOrbaxOrphanTaskErrors`); and the tracebacks of a save whose writes
  failed, which train.py reports in one line (`_DropUnfinishedSaveErrors`). Every other log
  record and exception is kept."""
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, _DropOrbaxReadOnlyNotes) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxReadOnlyNotes())
  asyncio_logger = logging.getLogger('asyncio')
  if not any(isinstance(f, _DropOrbaxOrphanTaskErrors) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_DropOrbaxOrphanTaskErrors())
  for logger in (absl_logger, asyncio_logger):
    if not any(isinstance(f, _DropUnfinishedSaveErrors) for f in logger.filters):
      logger.addFilter(_DropUnfinishedSaveErrors())
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_callbacks', False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      return
    # The sibling reads of a step that failed to load, each a traceback with the TensorStore
    # spec (up to a thousand of them, 30,000 lines): orbax's read coroutines, collected
    # unfinished; the step's failure is the one line already reported.
    if getattr(unraisable.object, '__name__', '') == _ORBAX_READ and str(exc).startswith(
      'Encountered error while reading array index'
    ):
      return
    previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


def _orbax_write_threads() -> list[threading.Thread]:
  """The threads of orbax's background commits (its `_SignalingThread`s) alive now; [] where
  this orbax has no such class."""
  try:
    from orbax.checkpoint._src.futures import future as orbax_future
  except ImportError:
    return []
  kind = getattr(orbax_future, '_SignalingThread', None)
  if not isinstance(kind, type):
    return []
  me = threading.current_thread()
  return [t for t in threading.enumerate() if isinstance(t, kind) and t is not me and t.is_alive()]


def wait_for_background_writes(timeout: float = 30.0) -> list[str]:
  """Wait (up to `timeout` seconds in all) for orbax's background commit threads to end; returns
  the names of those still running.

  After a failed save orbax's wait returns at the first failed write while its sibling writes go
  on in their threads. A process that then exits reached interpreter shutdown with them still
  writing, and each printed a traceback ("cannot schedule new futures after interpreter
  shutdown"); their own failures, into the save's unfinished folder, are dropped from the log
  (`_DropUnfinishedSaveErrors`)."""
  deadline = time.monotonic() + timeout
  for thread in _orbax_write_threads():
    threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))  # not orbax's: it raises
  return [t.name for t in _orbax_write_threads()]


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be used; the message says what was found."""


class NonFiniteStateError(CheckpointError):
  """`save` was given a state holding NaN/Inf; nothing was written."""


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
  """WORKDIR/checkpoints, absolute; '~' expanded as train.py's workdir is (a quoted
  --workdir='~/run' reaches the program unexpanded)."""
  return pathlib.Path(workdir).expanduser().absolute() / 'checkpoints'


def step_dir(workdir: str | os.PathLike, step: int) -> pathlib.Path:
  return checkpoint_dir(workdir) / str(step)


def step_numbers(directory: str | os.PathLike) -> list[int]:
  """The steps saved in a checkpoint folder (WORKDIR/checkpoints), ascending: orbax names a
  finished step's folder by its number alone (one being written carries a temporary suffix);
  [] where the folder is missing."""
  try:
    return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())
  except (FileNotFoundError, NotADirectoryError):
    return []


def make_manager(
  workdir: str | os.PathLike,
  *,
  keep: int = 3,
  async_save: bool = True,
  read_only: bool = False,
  preserve: Sequence[int] = (),
) -> ocp.CheckpointManager:
  """The run's checkpoint manager. A read-only one (for restores) is this process's alone: its
  restores end in no cross-process barrier, so that a step failing to load on one process (bit
  rot in its copy) cannot leave the others waiting in orbax's barrier forever; the processes
  agree on each step's outcome instead (`restore_with_fallback`). `preserve`: steps kept beside
  the newest `keep` (a run's train.resume_step, which the same command goes back to again)."""
  local = ocp.options.MultiprocessingOptions(
    primary_host=jax.process_index(), active_processes={jax.process_index()}
  )
  retention = {}  # read-only: none (orbax warns about any keep setting)
  if not read_only and preserve:  # orbax takes a policy or max_to_keep, not both
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    policies.append(ocp.checkpoint_managers.CustomSteps(steps=list(preserve)))
    retention['preservation_policy'] = ocp.checkpoint_managers.AnyPreservationPolicy(policies)
  elif not read_only:
    retention['max_to_keep'] = keep
  options = ocp.CheckpointManagerOptions(
    **retention,
    save_interval_steps=0 if read_only else 1,
    create=not read_only,
    enable_async_checkpointing=async_save,
    # A step's folders are made before save() returns: made in orbax's background threads, a
    # failed mkdir (disk out of space or inodes) left the sibling writes waiting for its signal
    # until their timeout (minutes), and then each logged a traceback.
    async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    cleanup_tmp_directories=not read_only,
    read_only=read_only,
    multiprocessing_options=local if read_only else ocp.options.MultiprocessingOptions(),
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


# --------------------------------------------------------------------------- checksums


def _as_uint32_bits(x: jax.Array) -> jax.Array:
  """The raw bits of x as a flat uint32 vector (narrower types widened, wider ones split)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif size in (1, 2):
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  else:  # 8 bytes: [..., 2] uint32 words
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return bits.reshape(-1)


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: each input bit flips about half the output bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _fingerprint(x: jax.Array, version: int) -> tuple[jax.Array, jax.Array]:
  """(uint32[2] checksum, finite) of one array; b_i its i-th 32-bit word, sums mod 2**32.

  Version 2 (saved since 2026-11-29): s0 = sum_i mix(b_i), s1 = sum_i mix(b_i + mix(i + 1)).
  A change of any words changes each sum but with odds of about 2**-32.
  Version 1: s0 = sum_i b_i, s1 = sum_i b_i (2i + 1). Any single flipped bit changes s0 and a
  swap of two words s1, but the top bit of a word adds 2**31 to both sums whatever its place:
  two flipped float32 sign bits (two weights negated) left both unchanged, and so did a swap of
  x and -x.
  """
  bits = _as_uint32_bits(x)
  index = jnp.arange(bits.shape[0], dtype=jnp.uint32)
  if version == 1:
    first, second = bits, bits * (index * jnp.uint32(2) + jnp.uint32(1))
  else:
    first, second = _mix(bits), _mix(bits + _mix(index + jnp.uint32(1)))
  sums = jnp.stack([jnp.sum(first, dtype=jnp.uint32), jnp.sum(second, dtype=jnp.uint32)])
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return sums, finite


_FINGERPRINTS = {v: jax.jit(functools.partial(_fingerprint, version=v)) for v in (1, 2)}
# Compiled once per array signature (and process), then barrier: see `array_checksums`.
_FINGERPRINTS_TOGETHER = {
  v: multihost.compiled_together(f, f'imagen_jax:checksums_compiled_v{v}')
  for v, f in _FINGERPRINTS.items()
}


def array_checksums(tree: Any, version: int | None = None) -> tuple[dict[str, list[int]], bool]:
  """({key path: [s0, s1]}, all finite) of every array leaf of tree (`_fingerprint`'s version,
  None: CHECKSUM_VERSION).

  One small program per distinct (shape, dtype, sharding) of the leaves, not one program over
  the whole tree: a train state's hundreds of leaves share a few dozen signatures, and XLA takes
  far longer to compile hundreds of reductions in one module (the digits:tiny and base64:demo
  states, 724 leaves in 28 signatures, first call on a 2-core CPU: 11-15 s as one program, about
  5 s as programs per signature).

  With several processes, arrays that span them make each a collective: every process compiles
  a new signature first and then passes a barrier, so that they start it together (gloo on CPU
  gives up on a collective whose peers arrive more than 30 s apart, which a skew in compile times
  exceeds, and the peer that arrives late then waits in it forever), one leaf at a time.
  In one process a leaf split over several devices (FSDP) is one too, finished before the
  next starts: XLA:CPU ran such programs, dispatched back to back, in different orders on
  different devices, and the all-reduce rendezvous then timed out and aborted the process (a
  2-device fsdp=2 run, at its first save, in 5 of 6 tries)."""
  table = _FINGERPRINTS_TOGETHER if jax.process_count() > 1 else _FINGERPRINTS
  fingerprint = table[CHECKSUM_VERSION if version is None else version]
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]

  def one(x):
    result = fingerprint(x)
    if isinstance(x, jax.Array) and not x.sharding.is_fully_replicated:
      jax.block_until_ready(result)  # its collectives done before the next program's start
    return result

  results = jax.device_get([one(x) for _, x in flat])
  sums = {
    jax.tree_util.keystr(path): [int(v) for v in np.asarray(s)]
    for (path, _), (s, _) in zip(flat, results, strict=True)
  }
  return sums, all(bool(f) for _, f in results)


def json_checksum(obj: Any) -> str:
  text = json.dumps(obj, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def _verify_arrays(tree: Any, stored: dict[str, list[int]], where: str, version: int) -> None:
  actual, _ = array_checksums(tree, version)
  bad = [k for k, v in actual.items() if stored.get(k) != v]
  if bad:
    missing = [k for k in bad if k not in stored]
    what = f'{len(bad)} array(s) differ from their saved checksums (e.g. {bad[0]})'
    if len(missing) == len(bad):
      what = f'{len(bad)} array(s) have no saved checksum (e.g. {bad[0]})'
    raise CheckpointError(f'{where}: {what}; the files are damaged.')


def _verify_json(name: str, obj: Any, stored: dict, where: str) -> None:
  if stored.get('json', {}).get(name) != json_checksum(obj):
    raise CheckpointError(f'{where}: the {name} item differs from its saved checksum.')


# -------------------------------------------------------------------------------- save


def save(
  manager: ocp.CheckpointManager,
  step: int,
  *,
  state: Any,
  data_state: Any,
  config: ml_collections.ConfigDict,
  force: bool = False,
) -> bool:
  """Start an (async) save of step, with checksums; returns whether a save was started.

  Raises NonFiniteStateError, writing nothing, if any array of the state is NaN/Inf.
  """
  if not (force or manager.should_save(step)):
    return False
  arrays, finite = array_checksums(state, CHECKSUM_VERSION)
  if not finite:
    raise NonFiniteStateError(
      f'Refusing to save step {step}: the train state holds NaN/Inf values (nothing written).'
    )
  config_json = json.loads(config.to_json_best_effort())
  checksums = {
    'version': CHECKSUM_VERSION,
    'arrays': arrays,
    'json': {'data': json_checksum(data_state), 'config': json_checksum(config_json)},
  }
  return manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(config_json),
      checksums=ocp.args.JsonSave(checksums),
    ),
    force=force,
  )


# ----------------------------------------------------------------------------- restore


def _where(manager: ocp.CheckpointManager, step: int) -> str:
  return f'checkpoint step {step} ({pathlib.Path(manager.directory) / str(step)})'


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:300]}'


def _not_damage(e: BaseException) -> bool:
  """A restore error that says nothing about the checkpoint: out of memory (XLA's
  RESOURCE_EXHAUSTED placing the arrays). Raised as it is (the entry points' out-of-memory line),
  not taken as damage: that would pass over every kept step and set good ones aside."""
  return device_memory.out_of_memory(e) is not None


def _does_not_load(
  manager: ocp.CheckpointManager, step: int, e: BaseException, item: str = ''
) -> CheckpointError:
  """The one-line error for a step (or its `item`) whose files do not load. The step's folder is
  remembered, so that the leftovers of the failed read are not reported again
  (`_DropOrbaxOrphanTaskErrors`)."""
  _unloadable_steps.add(f'{pathlib.Path(manager.directory) / str(step)}/')  # not step 60 for 6
  what = f': its {item}' if item else ''
  return CheckpointError(f'{_where(manager, step)}{what} does not load ({_one_line(e)}).')


_warned_unverified: set[str] = set()  # step folders restored without checksums


def _read_checksums(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The step's checksums item; None for checkpoints written before checksums existed (whose
  orbax metadata lists no checksums item). A step that was saved with checksums and has lost
  them is damaged: CheckpointError, so that the previous step is used."""
  folder = pathlib.Path(manager.directory) / str(step)
  if not (folder / 'checksums').exists():
    if _saved_with_checksums(folder):
      raise CheckpointError(
        f'{_where(manager, step)}: its checksums item is missing (the step was saved with one).'
      )
    if str(folder) not in _warned_unverified:  # once, not for its config and again its state
      _warned_unverified.add(str(folder))
      log.warning(
        '%s has no checksums (written by an older version): restored unverified.',
        _where(manager, step),
      )
    return None
  restored = manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))
  stored = restored['checksums']
  if not isinstance(stored, dict) or stored.get('version') not in _FINGERPRINTS:
    raise CheckpointError(f'{_where(manager, step)}: unreadable checksums item.')
  return stored


def _saved_with_checksums(folder: pathlib.Path) -> bool:
  """Whether orbax's metadata of a step folder lists a checksums item (True where the metadata is
  unreadable too: a step is only taken for an older version's when its metadata says so)."""
  try:
    handlers = json.loads((folder / '_CHECKPOINT_METADATA').read_text())['item_handlers']
  except (OSError, ValueError, KeyError, TypeError):
    return True
  return not isinstance(handlers, dict) or 'checksums' in handlers


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The resolved config saved with step (verified against its checksum when there is one)."""
  where = _where(manager, step)
  try:
    stored = _read_checksums(manager, step)
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - any failure to read is reported with the step
    raise _does_not_load(manager, step, e, item='checksums') from e  # not as its config's
  try:
    raw = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  except Exception as e:  # noqa: BLE001
    raise _does_not_load(manager, step, e, item='config') from e
  if not isinstance(raw, dict):
    raise CheckpointError(f'{where}: its config item is not a JSON object.')
  if stored is not None:
    _verify_json('config', raw, stored, where)
  return ml_collections.ConfigDict(raw)


@dataclasses.dataclass
class Loaded:
  """What a `restore_with_fallback` restore_fn returns: the loaded value, and verify, which checks
  it (CheckpointError if it fails). verify may be a collective over the processes (checksums of
  arrays that span them), so it is called on every process together, once all have loaded."""

  value: Any
  verify: Callable[[], None] = lambda: None


def load(manager: ocp.CheckpointManager, step: int, *, abstract_state: Any) -> Loaded:
  """(state, data_state) of step, placed as `abstract_state`'s shardings say, with its verify.

  CheckpointError (naming the step and folder) when it does not load, or from verify when it
  does not match its saved checksums.
  """
  where = _where(manager, step)
  try:
    stored = _read_checksums(manager, step)
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
      ),
    )
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - reported with the step, then the caller falls back
    if _not_damage(e):
      raise
    raise _does_not_load(manager, step, e) from e

  def verify() -> None:
    if stored is not None:
      _verify_arrays(restored['state'], stored['arrays'], where, stored['version'])
      _verify_json('data', restored['data'], stored, where)

  return Loaded((restored['state'], restored['data']), verify)


def restore(manager: ocp.CheckpointManager, step: int, *, abstract_state: Any) -> tuple[Any, Any]:
  """`load` and verify: (state, data_state) of step; CheckpointError when it does not load or
  fails verification."""
  loaded = load(manager, step, abstract_state=abstract_state)
  loaded.verify()
  return loaded.value


def kept_steps(manager: ocp.CheckpointManager) -> list[int]:
  """The kept steps, newest first. With several processes, every process must see the same list
  (one shared checkpoint folder): CheckpointError naming what each one sees otherwise, raised on
  every process alike, since a process that restored a step its peers do not have would train on
  different weights than them."""
  local = sorted(manager.all_steps(), reverse=True)
  seen = multihost.allgather_json(local)
  if any(steps != seen[0] for steps in seen):
    views = '; '.join(f'process {i}: {sorted(steps) or "none"}' for i, steps in enumerate(seen))
    raise CheckpointError(
      f'The processes see different checkpoints in {manager.directory} ({views}). Every process '
      'must see the same run folder: put --workdir on a filesystem that all hosts share.'
    )
  return local


def candidate_steps(manager: ocp.CheckpointManager, step: int | None) -> list[int]:
  """[step] if it is kept (CheckpointError listing the kept steps otherwise), else all kept
  steps, newest first (the same on every process: `kept_steps`)."""
  kept = kept_steps(manager)
  if step is None:
    return kept
  if step not in kept:
    aside_root = pathlib.Path(manager.directory).parent / SET_ASIDE_DIR
    aside = sorted(aside_root.glob(f'{step}')) + sorted(aside_root.glob(f'{step}.*'))
    where = (
      f' A resume to an earlier step set step {step} aside, to {", ".join(map(str, aside))}; '
      f'move it back into {manager.directory} to use it.'
      if aside
      else ''
    )
    raise CheckpointError(
      f'Step {step} is not a kept checkpoint in {manager.directory}; kept steps: '
      f'{sorted(kept) or "none"}.{where}'
    )
  return [step]


def agreed_failures(step: int, reports: list[dict]) -> list[str]:
  """The failures of one restore attempt over all processes, from each process's report
  {'step': the step it tried, 'error': its CheckpointError message or None, 'earlier': the
  failures it met before}, in process order.

  [] when every process restored `step`; else the messages (prefixed 'process i:' when there are
  several processes), so that every process passes over a step that failed on any of them. A
  report of another step means the processes are trying different steps (a safety net: the
  callers keep them in step): CheckpointError naming every failure, never a silent divergence."""
  tried = [r['step'] for r in reports]
  if any(s != step for s in tried):
    seen = [
      f'process {i}: {e}'
      for i, r in enumerate(reports)
      for e in [*r.get('earlier', []), r['error']]
      if e
    ]
    raise CheckpointError(
      f'The processes tried different checkpoint steps (process order: {tried}); failures so '
      f'far: {"; ".join(seen) or "none"}. Check that every host reads the same run folder, '
      'move any damaged step named here out of checkpoints/, and start again.'
    )
  if len(reports) == 1:
    return [reports[0]['error']] if reports[0]['error'] else []
  return [f'process {i}: {r["error"]}' for i, r in enumerate(reports) if r['error']]


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None, BaseException | None]:
  """(fn(), None, None), or (None, message, None) on CheckpointError (a damaged step), or
  (None, message, exception) on any other exception (re-raised once the peers know)."""
  try:
    return fn(), None, None
  except CheckpointError as e:
    return None, str(e), None
  except Exception as e:  # noqa: BLE001 - see above
    return None, _one_line(e), e


def _agree(manager, step: int, error, fatal, failures: list[str]) -> list[str]:
  """Every process's outcome of one phase of restoring step (`agreed_failures`); a process that
  met an error other than a damaged checkpoint stops every process."""
  reports = multihost.allgather_json(
    {'step': step, 'error': error, 'earlier': failures, 'fatal': fatal is not None}
  )
  if fatal is not None:
    raise fatal
  stopped = [f'process {i}: {r["error"]}' for i, r in enumerate(reports) if r['fatal']]
  if stopped:
    raise CheckpointError(f'Restoring {_where(manager, step)} stopped on ' + '; '.join(stopped))
  return agreed_failures(step, reports)


def restore_with_fallback(
  manager: ocp.CheckpointManager,
  *,
  step: int | None,
  restore_fn: Callable[[int], Loaded],
  ask_with: str = '',
) -> tuple[int, Any, list[str]]:
  """(step, its loaded and verified value, failures) for the newest usable step.

  With step=None, tries the kept steps newest first; restore_fn(step) or its `Loaded.verify`
  raising CheckpointError marks a step unusable (logged with its step and path) and the previous
  one is tried. With a step, only that one. CheckpointError listing every failure when none is
  usable (ask_with: how the caller's user asks for a step, for its advice).

  With several processes, they agree on the outcome after the load and again after the verify
  (`agreed_failures`): a step that failed on any process is passed over by all, so they never
  resume from different steps, and none waits in a verify collective for a peer that failed to
  load. restore_fn reads only this process's files: the managers of `make_manager(read_only=
  True)` end a restore in no cross-process barrier.
  """
  failed_steps, tried = {}, []  # step -> why it failed

  def failures() -> list[str]:
    return [message for messages in failed_steps.values() for message in messages]

  candidates = candidate_steps(manager, step)
  for _ in range(_RELISTS + 1):
    for s in candidates:
      tried.append(s)
      loaded, error, fatal = _attempt(lambda s=s: restore_fn(s))
      failed = _agree(manager, s, error, fatal, failures())
      if not failed:
        _, error, fatal = _attempt(loaded.verify)
        failed = _agree(manager, s, error, fatal, failures())
        if not failed:
          return s, loaded.value, failures()
      failed_steps[s] = failed
      if step is None and s != candidates[-1]:
        log.error('%s Falling back to the previous kept checkpoint.', ' '.join(failed))
    if step is not None:
      break
    # A training run still saving into this folder deletes its older steps (keep_checkpoints)
    # while they are read here: the steps it saved meanwhile are tried too, and the removed
    # steps' failures are no damage to report.
    manager.reload()
    candidates = [s for s in kept_steps(manager) if s not in tried]
    if not candidates:
      break
    for s in _removed(manager, tried):
      failed_steps.pop(s, None)
    log.warning(
      'Trying the checkpoint steps saved into %s while the older ones were read (is a training '
      'run still saving into it?): %s.',
      manager.directory,
      candidates,
    )
  if not tried:
    raise CheckpointError(f'No checkpoint to load: {describe_folder(manager.directory.parent)}.')
  others = sorted(set(manager.all_steps()) - {step}) if step is not None else []
  if others:  # the step asked for is damaged; others are kept
    raise CheckpointError(
      f'Checkpoint step {step}, the one asked for, is not usable:\n  '
      + '\n  '.join(failures())
      + f'\nAsk for another kept step ({", ".join(map(str, others))}), or for none to use the '
      f'newest usable one{ask_with}.'
    )
  removed = _removed(manager, tried)
  if removed:
    raise CheckpointError(
      f'The checkpoints of {manager.directory} were removed while being read (steps '
      f'{removed}): a training run still saving into it keeps only its newest '
      'steps. Run again, or raise --config.train.keep_checkpoints of the training run.'
    )
  raise CheckpointError(
    'No usable checkpoint in '
    f'{manager.directory}:\n  ' + '\n  '.join(failures()) + '\nRestore the folder from a backup, '
    'or train into a fresh --workdir.'
  )


_RELISTS = 3  # times the kept steps are listed again when the ones tried were removed meanwhile


def _removed(manager: ocp.CheckpointManager, steps: list[int]) -> list[int]:
  """Those of steps whose folder no longer exists."""
  return [s for s in steps if not (pathlib.Path(manager.directory) / str(s)).exists()]


@dataclasses.dataclass
class RestoredParams:
  params: Any
  config: ml_collections.ConfigDict
  step: int
  failures: list[str]  # why newer steps were passed over


def parse_run(spec: str) -> tuple[str, int | None]:
  """'runs/base64' -> ('runs/base64', None); 'runs/base64@1200' -> ('runs/base64', 1200); a
  leading '~' expanded. A run folder whose own name holds '@' (train.py takes
  --workdir=runs/lr@3e-4) is that run; CheckpointError where a spec names both a run folder and
  a step of another run."""
  spec = str(spec)
  literal = os.path.expanduser(spec)
  if '@' not in spec:
    return literal, None
  path, _, step = spec.rpartition('@')
  is_run = checkpoint_dir(literal).is_dir()
  if not re.fullmatch(r'\d+', step) or not path:
    if is_run:
      return literal, None
    raise CheckpointError(
      f"'{spec}': a checkpoint is RUN or RUN@STEP with STEP a kept step number, e.g. "
      'runs/base64@2000.'
    )
  if is_run and checkpoint_dir(os.path.expanduser(path)).is_dir():
    raise CheckpointError(
      f"'{spec}' names both the run folder {literal} and step {step} of the run {path}. Rename "
      'one of the two folders.'
    )
  if is_run:
    return literal, None
  return os.path.expanduser(path), int(step)


def restore_params(
  workdir: str | os.PathLike,
  *,
  step: int | None = None,
  key: str = 'ema_params',
  abstract_fn: Callable[[ml_collections.ConfigDict], Any],
  sharding: jax.sharding.Sharding,
) -> RestoredParams:
  """Only state[key] (e.g. the EMA params) of a run, verified, with fallback (see module doc).

  abstract_fn(config) gives the abstract params of the saved config; arrays land on `sharding`.
  """
  if not checkpoint_dir(workdir).exists():
    raise CheckpointError(f'No checkpoint to load: {describe_folder(workdir)}.')
  manager = make_manager(workdir, read_only=True)

  def restore_one(s: int) -> Loaded:
    config = restore_config(manager, s)
    abstract = abstract_fn(config)
    target = {
      key: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
      )
    }
    where = _where(manager, s)
    try:
      stored = _read_checksums(manager, s)
      restored = manager.restore(
        s,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
          )
        ),
      )['state']
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - reported with the step, then the caller falls back
      if _not_damage(e):
        raise
      raise _does_not_load(manager, s, e) from e

    def verify() -> None:
      if stored is not None:
        wanted = {k: v for k, v in stored['arrays'].items() if k.startswith(f"['{key}']")}
        _verify_arrays({key: restored[key]}, wanted, where, stored['version'])

    return Loaded((restored[key], config), verify)

  try:
    used, (params, config), failures = restore_with_fallback(
      manager, step=step, restore_fn=restore_one
    )
  finally:
    manager.close()
  return RestoredParams(params=params, config=config, step=used, failures=failures)


def set_aside_newer(workdir: str | os.PathLike, step: int, manager: ocp.CheckpointManager) -> list:
  """Move kept checkpoints newer than step to <workdir>/checkpoints_set_aside/ (nothing deleted),
  so a run resumed from step neither overwrites nor returns to them; returns the moved paths."""
  moved = []
  newer = [s for s in manager.all_steps() if s > step]
  if newer and jax.process_index() == 0:
    dest_root = pathlib.Path(workdir).absolute() / SET_ASIDE_DIR
    dest_root.mkdir(exist_ok=True)
    for s in sorted(newer):
      dest = dest_root / str(s)
      n = 1
      while dest.exists():
        dest, n = dest_root / f'{s}.{n}', n + 1
      shutil.move(str(step_dir(workdir, s)), dest)
      moved.append(dest)
  if newer:
    multihost.barrier('imagen_jax:set_aside')  # process 0 has moved them
    manager.reload()
  return moved


def describe_folder(workdir: str | os.PathLike) -> str:
  """What a run folder holds, for error messages."""
  root = pathlib.Path(workdir).expanduser()
  if not root.exists():
    return f'{root} does not exist'
  if not root.is_dir():
    return f'{root} is a file, not a run folder'
  ckpt = checkpoint_dir(root)
  if not ckpt.exists():
    listing = sorted(p.name for p in root.iterdir())[:20]
    return f'{root} has no checkpoints/ folder (it holds: {listing or "nothing"})'
  listing = sorted(p.name for p in ckpt.iterdir())[:20]
  return f'{ckpt} holds no finished checkpoint (it holds: {listing or "nothing"})'


def latest_finished_step(workdir: str | os.PathLike) -> int:
  """The latest finished checkpoint step of a run folder; CheckpointError naming what is there."""
  if not checkpoint_dir(workdir).exists():
    raise CheckpointError(f'No checkpoint to load: {describe_folder(workdir)}.')
  manager = make_manager(workdir, read_only=True)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise CheckpointError(f'No checkpoint to load: {describe_folder(workdir)}.')
  return step


def peek_config(spec: str) -> ml_collections.ConfigDict | None:
  """The config saved with a run's checkpoint ('RUN' or 'RUN@STEP'), read as a plain file before
  JAX's backend starts (a CheckpointManager would start it), unverified; None where there is
  none to read. For estimates only (`cpu_devices`'s memory check); restores use
  `restore_config`."""
  try:
    workdir, step = parse_run(spec)
    root = checkpoint_dir(workdir)
    steps = step_numbers(root) if step is None else [step]
  except (CheckpointError, OSError):
    return None
  for s in reversed(steps):
    try:
      raw = json.loads((root / str(s) / 'config' / 'metadata').read_text())
    except (OSError, ValueError):
      continue
    if isinstance(raw, dict):
      return ml_collections.ConfigDict(raw)
  return None


def config_differences(
  saved: ml_collections.ConfigDict | dict,
  current: ml_collections.ConfigDict | dict,
  prefix: str = '',
) -> list[str]:
  """'field: saved -> current' for every leaf that differs (tuples and lists compare equal)."""
  saved = saved.to_dict() if isinstance(saved, ml_collections.ConfigDict) else dict(saved)
  current = current.to_dict() if isinstance(current, ml_collections.ConfigDict) else dict(current)
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, '<absent>'), current.get(key, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_differences(a, b, f'{prefix}{key}.')
    elif _normalise(a) != _normalise(b):
      out.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return out


def _normalise(v: Any) -> Any:
  if isinstance(v, list | tuple):
    return tuple(_normalise(x) for x in v)
  return v
