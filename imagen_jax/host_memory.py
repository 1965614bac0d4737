"""Keep XLA:CPU's per-step buffers mapped between steps (glibc's malloc, CPU runs only).

XLA:CPU allocates each execution's temporaries as one block (small64's training step at batch
4, 64 px: 786 MB) with posix_memalign, from one of its worker threads. glibc serves a block that
large from a thread's arena with a fresh mmap and unmaps it when the step ends, so every step
faults in and zeroes the whole block again: about 195,000 page faults and 0.35-0.4 s of kernel
time per small64 step on the 2-core development CPU, out of a 1.7 s step.

`keep_freed_buffers()` makes glibc keep them: one arena for every thread (M_ARENA_MAX=1, so
XLA's threads allocate from the main heap), no separate mmap for large blocks (M_MMAP_MAX=0),
and a freed heap top handed back to the kernel only above 2 GB (M_TRIM_THRESHOLD). The next
step's temporaries then reuse the pages of the last. It must run before JAX starts its CPU
client (whose threads pick their arena on their first allocation); the entry points call it
first thing. It acts only where it helps: glibc on Linux, and a process whose JAX backend will
be the CPU (JAX_PLATFORMS starts with cpu, or no GPU/TPU plugin is installed). On GPU and TPU
the step's buffers live in device memory, and many data-loading threads would share one arena.
IMAGEN_JAX_HOST_MALLOC=default leaves glibc's settings alone (unset or `keep`: as above; any
other value is refused with a ValueError).

The price is resident memory: a freed block that a small, longer-lived allocation has split no
longer fits the next step's temporaries, which then take a new block, so the heap can hold one
to a few step-sized blocks (small64: 1.9 GB growing once to 2.6 GB in 300 steps, against
2.0-2.1 GB with glibc's defaults; docs/performance.md, "Host memory on CPU").
"""

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

OPT_OUT = 'IMAGEN_JAX_HOST_MALLOC'
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): about 2 GB kept free
# Packages whose presence means JAX may pick an accelerator instead of the CPU.
_ACCELERATOR_MODULES = (
  'libtpu',
  'jax_cuda12_plugin',
  'jax_cuda13_plugin',
  'jax_rocm60_plugin',
  'jax_rocm7_plugin',
)

_state: dict[str, str] = {}


def _accelerator_installed() -> str | None:
  """The name of an installed GPU/TPU plugin for JAX, or None."""
  for name in _ACCELERATOR_MODULES:
    if importlib.util.find_spec(name) is not None:
      return name
  namespace = importlib.util.find_spec('jax_plugins')  # e.g. jax_plugins.xla_cuda12
  if namespace is not None and namespace.submodule_search_locations:
    found = next(pkgutil.iter_modules(namespace.submodule_search_locations), None)
    if found is not None:
      return f'jax_plugins.{found.name}'
  try:
    plugins = importlib.metadata.entry_points(group='jax_plugins')
  except Exception:  # noqa: BLE001 - broken package metadata must not stop a CPU run
    return None
  return next((ep.name for ep in plugins), None)


def accelerator_reason(environ: Mapping[str, str] | None = None) -> str | None:
  """Why JAX's backend may be something other than the CPU (None: it will be the CPU):
  JAX_PLATFORMS names another platform first, or, when unset, a GPU/TPU plugin is installed."""
  environ = os.environ if environ is None else environ
  platforms = (environ.get('JAX_PLATFORMS') or '').strip().lower()
  if platforms:
    if platforms.split(',')[0].strip() != 'cpu':
      return f'JAX_PLATFORMS={platforms}'
    return None
  plugin = _accelerator_installed()
  if plugin:
    return f'an accelerator plugin is installed ({plugin}); set JAX_PLATFORMS=cpu for CPU runs'
  return None


def _read_int(path: str) -> int | None:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None  # cgroup v2 writes 'max' for no limit


def _meminfo_available(path: str) -> int | None:
  try:
    with open(path) as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024  # kB
  except (OSError, ValueError, IndexError):
    return None
  return None


def _address_space_left(root: str) -> int | None:
  """What RLIMIT_AS (`ulimit -v`) leaves this process beyond its mapped size (None: no limit)."""
  try:
    import resource
  except ImportError:  # not Unix
    return None
  soft, _ = resource.getrlimit(resource.RLIMIT_AS)
  if soft == resource.RLIM_INFINITY:
    return None
  try:
    with open(os.path.join(root, 'proc/self/status')) as f:
      mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmSize:'))
  except (OSError, ValueError, IndexError, StopIteration):
    return None
  return max(0, soft - mapped)


def available_bytes(root: str = '/') -> int | None:
  """Memory this process can still take, in bytes (None where it cannot be read: not Linux):
  the kernel's MemAvailable, or less where the process's cgroup (a container's limit, v2 or v1)
  or its address-space limit (RLIMIT_AS, `ulimit -v`) leaves less."""
  found = []
  left = _address_space_left(root)
  if left is not None:
    found.append(left)
  system = _meminfo_available(os.path.join(root, 'proc/meminfo'))
  if system is not None:
    found.append(system)
  for folder, limit_file, usage_file in _cgroup_memory_files(root):
    limit = _read_int(os.path.join(folder, limit_file))
    usage = _read_int(os.path.join(folder, usage_file))
    if limit is not None and usage is not None and limit < 2**60:  # v1 writes ~2**63 for none
      found.append(max(0, limit - usage))
  return min(found) if found else None


def _cgroup_memory_files(root: str) -> list[tuple[str, str, str]]:
  """(folder, limit file, usage file) of this process's memory cgroup and each group above it,
  v2 and v1. Inside a container the process's group reads as the mount's root; a SLURM job or a
  `systemd-run -p MemoryMax=` unit has its own group below it, whose limit is the one that
  counts (the smallest up the tree does)."""
  v2, v1 = '/', '/'
  try:
    with open(os.path.join(root, 'proc/self/cgroup')) as f:
      for line in f:
        _, controllers, group = line.rstrip('\n').split(':', 2)
        if controllers == '':
          v2 = group
        elif 'memory' in controllers.split(','):
          v1 = group
  except (OSError, ValueError):
    pass
  files = []
  for mount, group, limit, usage in (
    ('sys/fs/cgroup', v2, 'memory.max', 'memory.current'),
    ('sys/fs/cgroup/memory', v1, 'memory.limit_in_bytes', 'memory.usage_in_bytes'),
  ):
    parts = [p for p in group.split('/') if p and p != '..']
    for depth in range(len(parts), -1, -1):  # the process's own group first, then its parents
      files.append((os.path.join(root, mount, *parts[:depth]), limit, usage))
  return files


def backend_started() -> bool:
  """JAX's backends are initialised (settings read at their start can no longer change)."""
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
  except ImportError:
    return False
  started = getattr(xla_bridge, 'backends_are_initialized', None)
  return bool(started and started())


def _is_glibc() -> bool:
  """The process runs on glibc (whose malloc has the mallopt settings used here)."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # noqa: B018 - glibc has it; musl and others do not
    libc.mallopt  # noqa: B018
  except (OSError, AttributeError):
    return False
  return True


def why_not(environ: Mapping[str, str] | None = None) -> str | None:
  """Why `keep_freed_buffers` would leave malloc alone here, or None when it applies.
  ValueError for an IMAGEN_JAX_HOST_MALLOC that is neither unset, `keep` nor `default`."""
  environ = os.environ if environ is None else environ
  setting = environ.get(OPT_OUT, '').strip().lower()
  if setting == 'default':
    return f'{OPT_OUT}=default'
  if setting not in ('', 'keep'):
    raise ValueError(
      f'{OPT_OUT}={environ[OPT_OUT]!r} is not a setting: use {OPT_OUT}=default to leave '
      "malloc as it is, or unset it (or 'keep') to keep XLA:CPU's buffers mapped."
    )
  if not sys.platform.startswith('linux'):
    return f'not Linux ({sys.platform})'
  accelerator = accelerator_reason(environ)
  if accelerator is not None:
    return accelerator
  if backend_started():
    return "JAX's backend already started (its threads have their arenas)"
  if not _is_glibc():
    return 'the C library is not glibc'
  return None


def keep_freed_buffers(environ: Mapping[str, str] | None = None) -> str:
  """Set glibc's malloc to keep freed large blocks mapped (see the module docstring), where it
  applies; once per process. Returns 'on' or why it was left alone; ValueError for a bad
  IMAGEN_JAX_HOST_MALLOC."""
  if 'status' in _state:
    return _state['status']
  reason = why_not(environ)
  if reason is None:
    libc = ctypes.CDLL(None)
    ok = (
      libc.mallopt(_M_ARENA_MAX, 1) == 1
      and libc.mallopt(_M_MMAP_MAX, 0) == 1
      and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    reason = None if ok else 'mallopt refused a setting'
  _state['status'] = 'on' if reason is None else f'off: {reason}'
  if reason is None:
    log.info(
      'host memory: glibc keeps XLA:CPU step buffers mapped between steps (%s=default to '
      'leave malloc alone)',
      OPT_OUT,
    )
  else:
    log.debug('host memory: malloc left as it is (%s)', reason)
  return _state['status']
