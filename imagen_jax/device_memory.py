"""What a compiled program needs in memory (XLA's `memory_analysis()`), and whether it fits.

train_lib logs the train step's figures when it compiles, and warns, with the fixes, when they
do not fit, before the first step runs:

- GPU/TPU: the program's whole footprint per device (arguments + outputs + temporaries, less
  the donated buffers its outputs reuse), or what the device already holds plus what the run
  allocates, whichever is larger, against the allocator's limit
  (`memory_stats()['bytes_limit']`); past it XLA fails the step with RESOURCE_EXHAUSTED.
- CPU: the state is already in host memory when the step compiles, so what still has to fit
  is every local device's outputs and temporaries (less the reused buffers), against
  `host_memory.available_bytes()`. Past it the kernel's OOM killer ends the process with no
  message of ours, hence the warning. XLA:CPU's figures overstate a GPU's (bench/unet.py).

A warning, not a refusal: the figures are XLA's estimate, and a CPU host may have swap. When an
allocation does fail, XLA raises RESOURCE_EXHAUSTED (`out_of_memory`), which train.py and
sample.py turn into one line with the same fixes and what was kept.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from imagen_jax import host_memory

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """Bytes per device of one compiled program (`memory_analysis()`)."""

  argument: int
  output: int
  temp: int
  alias: int  # outputs that reuse donated argument buffers

  @property
  def total(self) -> int:
    return self.argument + self.output + self.temp - self.alias

  @property
  def allocated_by_run(self) -> int:
    """What a run allocates beyond its (already live) arguments."""
    return max(0, self.output + self.temp - self.alias)

  def as_gb(self, digits: int = 3) -> dict[str, float]:
    """The bench scripts' JSON fields (GB per device)."""
    return {
      'argument_gb': round(self.argument / 1e9, digits),
      'output_gb': round(self.output / 1e9, digits),
      'temp_gb': round(self.temp / 1e9, digits),
      'alias_gb': round(self.alias / 1e9, digits),
      'total_gb': round(self.total / 1e9, digits),
    }


def analyse(compiled: Any) -> ProgramMemory | None:
  """The compiled program's memory per device; None where the backend gives none."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - an unimplemented analysis is 'unknown', not an error
    return None
  if mem is None:
    return None
  return ProgramMemory(
    argument=int(mem.argument_size_in_bytes),
    output=int(mem.output_size_in_bytes),
    temp=int(mem.temp_size_in_bytes),
    alias=int(mem.alias_size_in_bytes),
  )


def tree_bytes(tree: Any) -> int:
  """Bytes of a tree of arrays or abstract arrays (ShapeDtypeStruct), all of it (not per device:
  `sharding.bytes_per_device` divides by the shardings)."""
  import jax

  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, 'dtype'))


def size_text(n: int) -> str:
  """'6.4 GB' / '47 MB'."""
  return f'{n / 1e9:.1f} GB' if n >= 1e9 else f'{n / 1e6:.0f} MB'


def _stats(device: Any) -> dict:
  try:
    return device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - some backends do not implement memory_stats
    return {}


def device_limit(device: Any) -> int | None:
  """The allocator's limit of a GPU/TPU device (None where it reports none)."""
  limit = _stats(device).get('bytes_limit')
  return int(limit) if limit else None


def device_in_use(device: Any) -> int:
  """Bytes the allocator holds now on a GPU/TPU device (0 where it reports none)."""
  return int(_stats(device).get('bytes_in_use') or 0)


def check(
  mem: ProgramMemory | None,
  devices: Sequence[Any],
  *,
  what: str,
  fixes: str,
  available: int | None = None,
  limit: int | None = None,
  in_use: int | None = None,
) -> tuple[int, str] | None:
  """(logging level, line) about `what` on this process's `devices`; WARNING with `fixes` when
  it does not fit (see the module docstring); None when the backend gives no analysis.
  available / limit / in_use override the host's and the device's figures (tests)."""
  if mem is None or not devices:
    return None
  arguments, outputs, donated, temporaries = map(
    size_text, (mem.argument, mem.output, mem.alias, mem.temp)
  )
  figures = (
    f'{what}: per device {arguments} of arguments, {outputs} of outputs ({donated} of them in '
    f'donated buffers), {temporaries} of temporaries'
  )
  if devices[0].platform == 'cpu':
    need = mem.allocated_by_run * len(devices)
    available = host_memory.available_bytes() if available is None else available
    if available is None:
      return logging.INFO, f'{figures}.'
    line = f'{figures}; {size_text(need)} more host memory, {size_text(available)} available'
    if need > available:
      return logging.WARNING, (
        f'{line}: the system may end the process for lack of memory (with no error message). '
        f'{fixes}'
      )
    return logging.INFO, f'{line}.'
  limit = device_limit(devices[0]) if limit is None else limit
  if limit is None:
    return logging.INFO, f'{figures}.'
  kind = devices[0].device_kind
  # Buffers already on the device (the arguments, when they are live, and anything else held:
  # another stage's params, the other copy of a state) count too; abstract arguments are not
  # there yet, hence the larger of the two.
  in_use = device_in_use(devices[0]) if in_use is None else in_use
  need = max(mem.total, in_use + mem.allocated_by_run)
  line = f'{figures}; {size_text(need)} in all of the {size_text(limit)} of a {kind}'
  if need > mem.total:
    line += f' (with the {size_text(in_use)} already in use on it)'
  if need > limit:
    return logging.WARNING, f'{line}: it will run out of device memory. {fixes}'
  return logging.INFO, f'{line}.'


def out_of_memory(error: BaseException) -> str | None:
  """XLA's message when `error` is an allocation failure (RESOURCE_EXHAUSTED: on GPU/TPU past
  the allocator's limit, on CPU past the process's address-space limit), else None."""
  import jax

  if isinstance(error, jax.errors.JaxRuntimeError) and 'RESOURCE_EXHAUSTED' in str(error):
    return ' '.join(str(error).split())[:300].rstrip('.')
  return None


def log_check(compiled: Any, devices: Sequence[Any], *, what: str, fixes: str) -> None:
  """`check` of a compiled program, logged."""
  result = check(analyse(compiled), devices, what=what, fixes=fixes)
  if result is not None:
    log.log(*result)
