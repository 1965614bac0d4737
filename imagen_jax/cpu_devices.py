"""Training and sampling on a CPU as two JAX devices: data parallelism over one host's cores.

XLA:CPU runs a program's operations one after another, each spread over the cores by its own
kernel, and many leave cores idle: YNNPACK runs a 64-channel convolution of a 64 px image as
one 64x64 tile on one core (`models.cpu_conv`), kernel gradients are tiled by channel only,
and the many small reductions, transposes and optimizer updates have little work to share.
With two host devices (`jax_num_cpu_devices=2`) the train step runs as two data-parallel
programs, one per half of the batch, whose operations overlap on the same thread pool; the
gradient all-reduce between them is a copy in memory.

Measured on the 2-core AMD EPYC (docs/performance.md): small64 at batch 4, 64 px, text length 32,
`bench/unet.py --fake_cpu_devices 1` then `2`, four interleaved pairs, every pair faster with
two: train step median 1.555 -> 1.424 s, guided sampling step 1.03 -> 0.83 s. The CPU demo's
config (`bench/train.py --config=configs/base64.py:demo`, batch 16 at 32 px): 0.285 -> 0.24 s.
Four devices on the same two cores were slower than one (train 1.66-1.79 s). Two is also
what is used on larger CPUs, where it has not been measured: IMAGEN_JAX_CPU_DEVICES=N sets
another count, and `bench/unet.py --fake_cpu_devices N` measures it.

Sampling gains too: a guided sampling step of small64 at batch 2 (64 px, text length 32) took
0.59 s on one device and 0.47 s on two, but a single image split as two (padded) took 0.47 s
against 0.27 s on one device. sample.py, evaluate.py and bench/sample.py therefore ask for two
devices only when their first batch is even; `cascade.BatchDevices` splits each batch the
devices divide and samples any other on the first of them.

`configure` applies the choice before JAX's backend starts (train.py, sample.py, evaluate.py
and the bench scripts call it first thing). Automatically
(IMAGEN_JAX_CPU_DEVICES unset or `auto`) it picks two devices only where all of these hold,
and otherwise leaves JAX's default of one:

- the backend will be the CPU (JAX_PLATFORMS starts with cpu, or no GPU/TPU plugin is
  installed; `host_memory.accelerator_reason`) and has not started yet;
- one process (a `--distributed` run sets its own devices);
- nothing else set the count (XLA_FLAGS' --xla_force_host_platform_device_count,
  JAX_NUM_CPU_DEVICES or jax's `jax_num_cpu_devices`);
- at least two cores are usable (the process's CPU affinity);
- the config can use two: an even train.batch_size and a mesh that two devices fill (sampling:
  an even first batch);
- memory for the second copy: each device holds its own copy of what is replicated (training:
  params, EMA, gradients and optimizer state; sampling: the params of every stage), so two
  copies must take at most half of the memory available (`host_memory.available_bytes`). Where
  they would not, one device keeps one copy: base64's 1,610M float32 params are 6.4 GB, and a
  cascade's three stages 12 GB. A mesh whose fsdp axis takes both devices (the state split
  over them, not copied) is not checked.

IMAGEN_JAX_CPU_DEVICES=N (a positive integer) asks for N devices on the CPU backend; a training
batch or mesh that N devices cannot take is refused (ValueError) instead of being changed
(sampling takes any N: a batch that N does not divide is sampled on one device). N copies that
do not fit the memory check above are taken with a warning in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from imagen_jax import device_memory, host_memory

log = logging.getLogger(__name__)

SETTING = 'IMAGEN_JAX_CPU_DEVICES'
AUTO_DEVICES = 2
# The automatic choice takes two devices only when their copies of the replicated state fit in
# this share of the memory available (the rest: activations, the sampler's or step's temporaries).
MEMORY_SHARE = 0.5
_MEMORY = 'memory: '
_XLA_FLAG = '--xla_force_host_platform_device_count'
ONE_DEVICE_MESH = '--config.mesh.data=-1 --config.mesh.fsdp=1'  # the settings, as train.py's


def _usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _count_set_elsewhere(environ: Mapping[str, str]) -> str | None:
  if _XLA_FLAG in environ.get('XLA_FLAGS', ''):
    return f'XLA_FLAGS sets {_XLA_FLAG}'
  if environ.get('JAX_NUM_CPU_DEVICES', '').strip():
    return 'JAX_NUM_CPU_DEVICES is set'
  import jax

  if int(jax.config.jax_num_cpu_devices) > 0:
    return 'jax_num_cpu_devices is already configured'
  return None


def _unfit(
  n: int, batch_size: int, mesh: Any, batch_name: str, distributed: bool = False
) -> str | None:
  """Why a train config cannot run on n devices (None when it can); mesh None: sampling, whose
  first batch of `batch_size` images n devices would split. batch_name: the setting the batch
  size came from, for the message. distributed: n devices in each of several processes; the
  mesh spans all of them (checked against the global count once JAX starts), so only the batch
  is checked here."""
  if mesh is None:
    if batch_size % n:
      return f'a first batch of {batch_size} images does not split over {n} devices'
    return None
  if batch_size % n:
    return f'{batch_name}={batch_size} is not divisible by {n}'
  if distributed:
    return None
  from imagen_jax import sharding

  sizes = sharding.mesh_sizes(mesh)  # ValueError for sizes no mesh can have (fsdp=0)
  fixed = sharding.fixed_devices(sizes)
  fills = n % fixed == 0 if -1 in sizes else fixed == n
  if not fills:
    return f'the mesh data={sizes[0]} x fsdp={sizes[1]} does not fill {n} devices'
  return None


def _replicas(n: int, mesh: Any) -> int:
  """Copies of the state that n devices hold: n / the mesh's fsdp size (sampling, mesh None: n)."""
  if mesh is None:
    return n
  from imagen_jax import sharding

  data, fsdp = sharding.mesh_sizes(mesh)
  if fsdp == -1:
    fsdp = n // max(data, 1)
  return max(1, n // max(fsdp, 1))


def _memory_short(
  n: int, copy_bytes: Callable[[], int | None] | None, available: int | None
) -> str | None:
  """Why n copies of the replicated bytes do not fit in MEMORY_SHARE of the memory available
  (None: they fit, or either figure is unknown; one copy is never checked)."""
  if copy_bytes is None or n < 2:
    return None
  available = host_memory.available_bytes() if available is None else available
  if available is None:
    return None
  each = copy_bytes()
  if each is None or n * each <= MEMORY_SHARE * available:
    return None
  size = device_memory.size_text
  return (
    f'{_MEMORY}{n} copies of the {size(each)} that each data-parallel replica holds would take '
    f'more than {MEMORY_SHARE:.0%} of the {size(available)} of memory available'
  )


def choose(
  batch_size: int,
  mesh: Any,
  *,
  distributed: bool = False,
  environ: Mapping[str, str] | None = None,
  cores: int | None = None,
  copy_bytes: Callable[[], int | None] | None = None,
  available: int | None = None,
  batch_name: str = 'train.batch_size',
  one_device_mesh: str = ONE_DEVICE_MESH,
) -> tuple[int | None, str]:
  """(number of CPU devices to configure, or None to leave JAX's default; the reason).

  Training passes its batch size and mesh. Sampling (sample.py) passes mesh=None and the size
  of its first batch: the automatic choice then takes two devices only when they split that
  batch, and an explicit count is taken whatever the batches (sample_lib samples a batch that
  the devices do not split on one of them).

  copy_bytes() gives the bytes each device holds a copy of (None: unknown, not checked); it is
  called only when everything else allows two devices (or an explicit count above one, which
  is taken, the reason then saying that the copies do not fit). available: the memory free for
  the process (default `host_memory.available_bytes()`). batch_name: the setting that gave
  batch_size, as messages name it (bench/unet.py: '--batch'); one_device_mesh: the settings
  that make the mesh fit one device, as the refusal of a mesh one device cannot hold names them
  (bench/unet.py: '--mesh_fsdp=1').

  ValueError for a bad IMAGEN_JAX_CPU_DEVICES, a count the config cannot use, or a count asked
  for after JAX's backend started."""
  environ = os.environ if environ is None else environ
  raw = environ.get(SETTING, '').strip().lower()
  if raw not in ('', 'auto'):
    try:
      n = int(raw)
    except ValueError:
      n = 0
    if n < 1:
      raise ValueError(
        f'{SETTING}={environ[SETTING]!r} is not a setting: use a positive number of CPU devices '
        "(1: one device), or unset it (or 'auto') for the automatic choice."
      )
    why = host_memory.accelerator_reason(environ)
    if why is not None:
      return None, f'{SETTING}={n} ignored: the backend may not be the CPU ({why})'
    elsewhere = _count_set_elsewhere(environ)
    if elsewhere:
      raise ValueError(f'{SETTING}={n} and {elsewhere}: set the CPU device count in one place.')
    unfit = (  # sampling: any count
      None if mesh is None else _unfit(n, batch_size, mesh, batch_name, distributed)
    )
    if unfit:
      raise ValueError(
        f'{SETTING}={n}: {unfit}; choose a count that divides the batch and fits the mesh.'
      )
    if host_memory.backend_started():
      raise ValueError(f"{SETTING}={n}: JAX's backend already started; the count is read then.")
    short = _memory_short(_replicas(n, mesh), copy_bytes, available)
    return n, f'{SETTING}={n}' + (f'; {short}' if short else '')  # taken, with a warning
  why = host_memory.accelerator_reason(environ)
  if why is not None:
    return None, f'the backend may not be the CPU ({why})'
  if distributed:
    return None, 'several processes (--distributed) set their own devices'
  elsewhere = _count_set_elsewhere(environ)
  if elsewhere:
    return None, elsewhere
  if host_memory.backend_started():
    return None, "JAX's backend already started"
  cores = _usable_cores() if cores is None else cores
  if cores < AUTO_DEVICES:
    return _one_device(mesh, f'{cores} usable core(s)', one_device_mesh)
  unfit = _unfit(AUTO_DEVICES, batch_size, mesh, batch_name)
  if unfit:
    return _one_device(mesh, unfit, one_device_mesh)
  too_big = _memory_short(_replicas(AUTO_DEVICES, mesh), copy_bytes, available)
  if too_big:
    return _one_device(mesh, too_big, one_device_mesh)
  return AUTO_DEVICES, f'{cores} cores; {SETTING}=1 for one device'


def _one_device(mesh: Any, reason: str, one_device_mesh: str) -> tuple[None, str]:
  """(None, reason): the automatic choice leaves one device. ValueError, naming the reason, for
  a training mesh that one device cannot hold (before: 'does not divide the 1 available devices'
  from the mesh, without why one on a CPU of several cores)."""
  if mesh is not None:
    from imagen_jax import sharding

    sizes = sharding.mesh_sizes(mesh)
    fixed = sharding.fixed_devices(sizes)
    if fixed > 1:
      raise ValueError(
        f'The mesh data={sizes[0]} x fsdp={sizes[1]} needs {fixed} devices, but the CPU backend '
        f'is left at one ({reason}). Set {one_device_mesh} for one device, or {SETTING}=N for N '
        'CPU devices that the batch and mesh fit.'
      )
  return None, reason


def configure(
  batch_size: int,
  mesh: Any,
  *,
  distributed: bool = False,
  environ: Mapping[str, str] | None = None,
  copy_bytes: Callable[[], int | None] | None = None,
  batch_name: str = 'train.batch_size',
  one_device_mesh: str = ONE_DEVICE_MESH,
) -> int | None:
  """Apply `choose` (see the module docstring) before JAX's backend starts; returns the count
  set (None: JAX's default). ValueError as `choose`."""
  n, reason = choose(
    batch_size,
    mesh,
    distributed=distributed,
    environ=environ,
    copy_bytes=copy_bytes,
    batch_name=batch_name,
    one_device_mesh=one_device_mesh,
  )
  if n is None:
    level = logging.INFO if reason.startswith(_MEMORY) else logging.DEBUG  # worth knowing
    log.log(level, 'CPU devices: left as they are (%s)', reason)
    return None
  import jax

  jax.config.update('jax_num_cpu_devices', n)
  level = logging.WARNING if _MEMORY in reason else logging.INFO  # an explicit count, too big
  log.log(level, 'CPU devices: %d, data parallel over the cores (%s)', n, reason)
  return n
