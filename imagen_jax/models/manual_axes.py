"""Custom-VJP operations inside `jax.shard_map`: their inputs made equally varying.

Inside `shard_map` (with its default `check_vma=True`) JAX types every array with the mesh axes
its value varies over. A custom VJP's backward rule must return, for each input, a cotangent of
that input's type. When a replicated input (a weight, a norm's scale) meets batch-sharded
activations, its cotangent varies over the batch axis, and JAX refuses the rule ("the manual
axis types do not match"): without this module the U-Net could not be differentiated inside a
user's `shard_map` on a CPU, where its custom-VJP kernels (`cpu_norm`, `cpu_conv`,
`cpu_attention`) run.

`match_varying` casts every input to the union of the axes any of them varies over, outside the
custom VJP. JAX's own transpose of that cast sums the replicated inputs' cotangents over those
axes, exactly as for an ordinary operation. Outside `shard_map`, and when the inputs already
agree, it returns them unchanged.
"""

from __future__ import annotations

import jax


def _varying(x: jax.Array) -> frozenset:
  """The manual mesh axes x varies over (empty outside shard_map)."""
  aval = jax.typeof(x)
  manual = getattr(aval, 'manual_axis_type', None)  # jax 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, 'vma', ()))  # earlier and later spellings


def match_varying(*arrays: jax.Array | None) -> tuple[jax.Array | None, ...]:
  """`arrays`, each cast to vary over every manual axis that any of them varies over (None
  entries pass through)."""
  axes = frozenset().union(*(_varying(a) for a in arrays if a is not None))
  if not axes:
    return arrays
  out = []
  for a in arrays:
    missing = () if a is None else tuple(sorted(axes - _varying(a)))
    out.append(jax.lax.pcast(a, missing, to='varying') if missing else a)
  return tuple(out)
