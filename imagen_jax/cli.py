"""Shared pieces of the command-line entry points (train.py, sample.py, evaluate.py, precompute).

`run(main)` parses absl flags so that a bad --config (missing file, unknown variant, unknown or
ill-typed override) is one line on stderr and exit code 2, never a traceback.
"""

import importlib.util
import logging
import os
import pathlib
import re
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE, prefix: str = 'error: ', now: bool = False) -> None:
  """Print `error: message` (`prefix` + message) on stderr and exit with `code`.

  now: exit at once (os._exit) on one process too, for a stop signal that may arrive while XLA
  compiles in its own threads: the interpreter's shutdown under them crashed (SIGSEGV, rc 139)
  after the line was printed. The caller's files must be complete (written atomically) by then.

  In a run of several JAX processes this process exits at once (os._exit): a normal exit waits
  in JAX's shutdown barrier for peers that, when only this process failed, are blocked in the
  next collective, so every process hung 300 s and then aborted with a C++ stack dump. The
  line goes to the peers too (`multihost.announce_failure`), which end with it within about a
  second rather than at JAX's heartbeat timeout (100 s, rc -6)."""
  distributed = _distributed_runtime() is not None
  if distributed:
    from imagen_jax import multihost

    multihost.ENDING.acquire()  # never released; a peer's failure seen now prints no 2nd line
  print(f'{prefix}{message}', file=sys.stderr)
  if distributed:
    multihost.announce_failure(message, code)
  if distributed or now:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
  sys.exit(code)


def raise_stop(signum, frame) -> None:
  """A signal handler that stops the program like Ctrl-C: KeyboardInterrupt(the signal's name),
  which the entry point turns into its 'stopped (NAME)' line (`stop_name`)."""
  raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_name(e: KeyboardInterrupt) -> str:
  """The signal a KeyboardInterrupt stands for: `raise_stop`'s, else Ctrl-C's SIGINT."""
  return e.args[0] if e.args else 'SIGINT'


def check_output_png(flag: str, path: str, overwrite: bool) -> None:
  """Refuse (one line, exit 2) an output PNG path that is a folder, or that exists without
  --overwrite; called before the work that would end in writing it."""
  if pathlib.Path(path).is_dir():
    fail(f'{flag} {path} is a folder; pass a PNG path, e.g. {path}/grid.png.')
  if pathlib.Path(path).exists() and not overwrite:
    fail(f'{flag} {path} exists; pass --overwrite to replace it, or give another path.')


def _distributed_runtime():
  """`multihost.distributed_runtime()` (client, this process, count) of a run of several
  processes, else None; without importing jax where nothing has (then there is no such run)."""
  if 'jax' not in sys.modules:
    return None
  from imagen_jax import multihost

  return multihost.distributed_runtime()


def _config_flag_values(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]]]:
  """(--config value, [(dotted field, value) of --config.<field>=... overrides]); absl's
  space-separated form (`--config PATH`, `--config.field VALUE`) is read as well."""
  spec, overrides = None, []
  args = list(argv)
  for i, arg in enumerate(args):
    following = args[i + 1] if i + 1 < len(args) else ''
    if arg == '--config':
      spec = following or None
    elif arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg.startswith('--config.'):
      field, equals, value = arg[len('--config.') :].partition('=')
      if not equals and not following.startswith('--'):
        value = following
      overrides.append((field, value))
  return spec, overrides


def explain_config_error(argv: Sequence[str], error: BaseException) -> str:
  """One line saying which part of the --config flags is wrong, and how to fix it."""
  spec, overrides = _config_flag_values(argv)
  if spec is None:
    return f'--config is required, e.g. --config=configs/base64.py ({error}).'
  path_text, _, arg = spec.partition(':')
  path = pathlib.Path(path_text)
  if not path.is_file():
    return f'--config={spec}: no such config file {path}; pass one of configs/*.py.'
  try:
    module_spec = importlib.util.spec_from_file_location('_config_check', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001 - any failure of the user's config file is reported
    return f'--config={spec}: {e}'
  for field, value in overrides:
    node, walked = config, []
    for part in field.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(walked) or 'the config'
        choices = sorted(node.keys()) if hasattr(node, 'keys') else []
        return (
          f'--config.{field}: {where} has no field {part!r} (fields: {", ".join(choices)}); '
          'check the spelling against the config file.'
        )
      node = node[part]
      walked.append(part)
    if value == '' and not isinstance(node, str):
      return f'--config.{field} needs a value, e.g. --config.{field}={node!r}.'
  first = str(error).strip().splitlines()
  return f'bad --config flags: {first[-1] if first else type(error).__name__}'


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing with one-line errors (exit 2) instead of tracebacks."""
  argv = list(argv)
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      flags.FLAGS.config.keys()  # a config that failed to load raises on first use
  except flags.Error as e:
    if any(a.startswith('--config') for a in argv[1:]) and 'config' in str(e):
      fail(explain_config_error(argv[1:], e))
    message = str(e).rstrip('.')
    required = r'flag --(\w+)=None: Flag --\1 must have a value other than None'
    if missing := re.fullmatch(required, message):
      message = f'--{missing[1]} is required'
    fail(f'{message}. Pass --helpshort to see the flags.')
  except Exception as e:  # noqa: BLE001 - a config file's own errors (SyntaxError, NameError, ...)
    fail(explain_config_error(argv[1:], e))
  return rest


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main) with `parse_flags`. In a run of several processes, an unexpected exception
  (a bug: the expected errors are `fail` lines already) prints its traceback and then ends like
  `fail`, so that the other processes stop at once with its line: otherwise this process
  would wait in JAX's shutdown barrier, and the others in their next collective, until JAX
  aborts them all."""

  def main_or_fail(argv: list[str]) -> None:
    try:
      main(argv)
    except Exception as e:
      runtime = _distributed_runtime()
      if runtime is None:
        raise
      traceback.print_exc()
      text = ' '.join(str(e).split())[:300]
      where = f"process {runtime[1]}'s log, before this line"
      fail(f'{type(e).__name__}: {text} (unexpected; its traceback is in {where})', code=1)

  app.run(main_or_fail, flags_parser=parse_flags)


def keep_freed_host_buffers() -> str:
  """`host_memory.keep_freed_buffers()` for an entry point (its status: 'on' or why not): a bad
  IMAGEN_JAX_HOST_MALLOC is one line and exit code 2. Call it before JAX's CPU client starts its
  threads."""
  from imagen_jax import host_memory

  try:
    return host_memory.keep_freed_buffers()
  except ValueError as e:
    fail(str(e))


def split_cpu_devices(
  batch_size: int,
  mesh,
  *,
  distributed: bool,
  copy_bytes: Callable[[], int | None] | None = None,
  batch_name: str = 'train.batch_size',
  one_device_mesh: str | None = None,
) -> None:
  """`cpu_devices.configure` for an entry point (two data-parallel devices on a CPU of two or
  more cores, see its docstring; train.py passes its batch size and mesh, sample.py its first
  batch and mesh=None; copy_bytes: what each device would hold a copy of): a bad
  IMAGEN_JAX_CPU_DEVICES, or a count the config cannot use, is one line and exit code 2 (naming
  the batch as batch_name, the setting it came from, and the mesh settings for one device as
  one_device_mesh, default train.py's). Call it before JAX's backend starts. A
  copy_bytes that fails counts as unknown: the config's own errors are reported where it is
  used."""
  from imagen_jax import cpu_devices

  def estimate() -> int | None:
    try:
      return copy_bytes()
    except Exception as e:  # noqa: BLE001 - an estimate; the real use reports the problem
      logging.getLogger(__name__).debug('CPU devices: no memory estimate (%s)', e)
      return None

  try:
    cpu_devices.configure(
      batch_size,
      mesh,
      distributed=distributed,
      copy_bytes=copy_bytes and estimate,
      batch_name=batch_name,
      one_device_mesh=one_device_mesh or cpu_devices.ONE_DEVICE_MESH,
    )
  except ValueError as e:
    fail(str(e))


# ---------------------------------------------------------------------- several processes


def define_distributed_flags() -> None:
  """--distributed and the coordinator flags (train.py, sample.py, precompute)."""
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-process).')
  flags.DEFINE_string(
    'coordinator_address',
    None,
    'With --distributed: host:port of process 0 (default: from the cluster environment: TPU '
    'pod, SLURM, ...).',
  )
  flags.DEFINE_integer('num_processes', None, 'With --distributed: the number of processes.')
  flags.DEFINE_integer('process_id', None, 'With --distributed: this process, 0..num_processes-1.')
  flags.DEFINE_integer(
    'coordinator_timeout', 300, 'With --distributed: seconds to wait for every process to join.'
  )


def check_distributed_flags() -> None:
  """One line and exit 2 for coordinator flags given without --distributed: ignored, they ran
  each process as a lone run of the whole job (process 1 of 2 sampled every batch)."""
  FLAGS = flags.FLAGS
  if FLAGS.distributed:
    return
  given = [
    name
    for name in ('coordinator_address', 'num_processes', 'process_id', 'coordinator_timeout')
    if FLAGS[name].present
  ]
  if given:
    they = ('they set', 'them') if len(given) > 1 else ('it sets', 'it')
    fail(
      f'--{", --".join(given)} given without --distributed, which {they[0]} up; add '
      f'--distributed for a multi-process run, or drop {they[1]}.'
    )


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Until the coordinator accepts TCP connections; one line and exit 1 after `timeout` s.

  (jax's own client aborts the whole process with a C++ stack trace when its deadline passes.)
  """
  import socket
  import time

  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return
    except OSError as e:  # the address's form was checked by initialize_distributed
      if time.monotonic() > deadline:
        fail(
          f'--distributed: no coordinator answered at {address} within {timeout} s '
          f'({e}). Start process 0 (--process_id=0) with the same --coordinator_address, '
          'or raise --coordinator_timeout.',
          code=1,
        )
      time.sleep(0.5)


def initialize_distributed() -> None:
  """jax.distributed.initialize from the flags; one line instead of a hang or a traceback."""
  import jax

  from imagen_jax import multihost

  FLAGS = flags.FLAGS
  try:
    multihost.barrier_timeout_s()  # a bad setting is refused now, not at the first barrier
  except ValueError as e:
    fail(str(e))
  if FLAGS.coordinator_address:
    host, _, port = FLAGS.coordinator_address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      fail(
        f'--coordinator_address={FLAGS.coordinator_address!r} is not HOST:PORT; pass e.g. '
        "--coordinator_address=10.0.0.1:1234 (process 0's address and a free port)."
      )
  if FLAGS.num_processes is not None and FLAGS.process_id is not None:
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
      fail(
        f'--process_id={FLAGS.process_id} is not in [0, --num_processes={FLAGS.num_processes}); '
        'give each process a distinct id from 0.'
      )
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU runs; no-op elsewhere
  if FLAGS.coordinator_address and FLAGS.process_id:  # not process 0, which hosts the service
    _wait_for_coordinator(FLAGS.coordinator_address, FLAGS.coordinator_timeout)
  try:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
      initialization_timeout=FLAGS.coordinator_timeout,
    )
  except (RuntimeError, ValueError) as e:
    where = FLAGS.coordinator_address or 'the address from the cluster environment'
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    fail(
      f'--distributed: could not join the other processes through the coordinator at {where} '
      f'within {FLAGS.coordinator_timeout} s ({first[:200]}). Check that every process was '
      'started with the same --coordinator_address and --num_processes and a distinct '
      '--process_id, and that process 0 is reachable.',
      code=1,
    )
  multihost.watch_for_failures()  # a peer's failure ends this process too, with its line


# ------------------------------------------------------------------- compilation cache


# The persistent compilation cache's size: least recently used entries are removed beyond it
# (JAX_COMPILATION_CACHE_MAX_SIZE, in bytes, overrides; -1 there means no limit).
COMPILATION_CACHE_MAX_BYTES = 8 * 2**30


def define_compilation_cache_flag() -> None:
  flags.DEFINE_string(
    'compilation_cache',
    '~/.cache/imagen_jax/xla',
    "JAX's persistent compilation cache: a second run of the same config skips compiling. "
    "'' turns it off; JAX_COMPILATION_CACHE_DIR, when set, wins. Kept under "
    f'{COMPILATION_CACHE_MAX_BYTES / 2**30:.0f} GiB by removing the least recently used entries '
    '(JAX_COMPILATION_CACHE_MAX_SIZE, in bytes, overrides).',
  )


def adopt_unlimited_cache_entries(path: pathlib.Path) -> int:
  """Give each entry of a compilation cache written without a size limit (this project's
  default cache before it had one) the access-time file that JAX's LRU eviction reads, set to
  the entry's modification time; eviction fails on an entry without one, and then no new entry
  is written. Returns how many entries were adopted."""
  import os

  adopted = 0
  for entry in path.glob('*-cache'):
    atime = entry.with_name(entry.name[: -len('-cache')] + '-atime')
    if atime.exists():
      continue
    try:
      tmp = atime.with_name(f'.{atime.name}.{os.getpid()}.tmp')
      tmp.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, 'little'))
      os.replace(tmp, atime)  # whole or absent for a reader in another process
      adopted += 1
    except OSError:  # removed meanwhile (evicted by another process) or not writable
      continue
  return adopted


def enable_compilation_cache() -> None:
  """Point JAX's persistent compilation cache at --compilation_cache (unless off / set), with
  a size limit (LRU eviction; JAX then reads and writes entries under a file lock)."""
  import os

  import jax

  path = flags.FLAGS.compilation_cache
  if os.environ.get('JAX_COMPILATION_CACHE_DIR') or not path:
    return
  path = pathlib.Path(path).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    print(f'warning: compilation cache {path} unusable ({e.strerror}); compiling every run.')
    return
  if not os.environ.get('JAX_COMPILATION_CACHE_MAX_SIZE'):
    jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_MAX_BYTES)
  if jax.config.jax_compilation_cache_max_size != -1:
    adopt_unlimited_cache_entries(path)
  jax.config.update('jax_compilation_cache_dir', str(path))
  if not os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'):
    # Every program, however fast it compiled (JAX's default skips those under 1 s, a limit
    # meant for remote caches): a start's dozens of small programs (one checksum program per
    # array signature of a checkpoint, the schedule's, the RNG's) take about 5 s to compile on a
    # 2-core CPU and milliseconds to read from this local folder.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
