"""Device mesh, logical axis rules and their resolution to `NamedSharding`s.

Modules annotate every parameter with logical axis names (metadata key `logical_axes`,
see `imagen_jax.models.layers`); one rules table maps logical names to mesh axes. A
parameter dimension is sharded only when the mesh axis size divides it; otherwise that
dimension is replicated, so tiny models run on any mesh.

Typical use (FSDP over 'fsdp', data parallel over both axes):

  mesh = make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(model)
    param_sh = state_shardings(state, mesh)
    opt_sh = state_shardings(jax.eval_shape(tx.init, state), mesh)  # optax keeps Variables
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from imagen_jax.models.layers import LOGICAL_AXES_KEY

MESH_AXES = ('data', 'fsdp')

MeshAxes = str | tuple[str, ...] | None
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
  ('batch', ('data', 'fsdp')),
  # Convolutions [kh, kw, in, out]: shard the output channels.
  ('conv_h', None),
  ('conv_w', None),
  ('conv_in', None),
  ('conv_out', 'fsdp'),
  # Dense [in, out]: shard the hidden (mlp / attention heads) side.
  ('embed', None),
  ('mlp', 'fsdp'),
  ('heads', 'fsdp'),
  ('norm', None),
)


def _get(cfg: Any, name: str) -> Any:
  if isinstance(cfg, Mapping):
    return cfg[name]
  return getattr(cfg, name)


def mesh_sizes(mesh_config: Any) -> list[int]:
  """[data, fsdp] as configured (-1: the remaining devices); ValueError for sizes no mesh can
  have. Needs no devices (cpu_devices checks a config before JAX's backend starts)."""
  sizes = [int(_get(mesh_config, axis)) for axis in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'At most one mesh axis may be -1, got data={sizes[0]}, fsdp={sizes[1]}.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'Mesh sizes must be positive or -1, got data={sizes[0]}, fsdp={sizes[1]}.')
  return sizes


def fixed_devices(sizes: Sequence[int]) -> int:
  """Devices the axes of a given size take together (`mesh_sizes`; a -1 axis takes the rest)."""
  return math.prod(s for s in sizes if s != -1)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh of Auto axes; a size of -1 takes the remaining devices.

  `mesh_config` has fields `data` and `fsdp` (ConfigDict, dataclass or dict).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = mesh_sizes(mesh_config)
  fixed = fixed_devices(sizes)
  if n % fixed:
    raise ValueError(
      f'Mesh data={sizes[0]} x fsdp={sizes[1]} does not divide the {n} available devices; '
      'set --config.mesh.data / --config.mesh.fsdp so their product divides the device count '
      '(use -1 for one axis to take the remaining devices).'
    )
  sizes = [n // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ValueError(
      f'Mesh data={sizes[0]} x fsdp={sizes[1]} uses {math.prod(sizes)} of {n} devices; '
      'the product must equal the device count (use -1 for one axis).'
    )
  return jax.make_mesh(
    tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def _is_logical_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec) or (
    isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  )


def _rule_table(rules: Sequence[tuple[str, MeshAxes]]) -> dict[str, MeshAxes]:
  table: dict[str, MeshAxes] = {}
  for name, axes in rules:
    table.setdefault(name, axes)  # first rule wins, as in flax
  return table


def logical_to_mesh(
  logical_spec_tree: Any, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES
) -> Any:
  """Maps a tree of logical specs (tuples of names / PartitionSpecs) to PartitionSpecs.

  Unknown names and None map to None (replicated). A mesh axis is used at most once per spec.
  Divisibility is not checked here (no shapes); `state_shardings` does that.
  """
  table = _rule_table(rules)

  def resolve(spec):
    used: set[str] = set()
    out = []
    for name in spec:
      axes = table.get(name) if name is not None else None
      flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
      if not flat or used.intersection(flat):
        out.append(None)
        continue
      used.update(flat)
      out.append(axes)
    return PartitionSpec(*out)

  return jax.tree.map(resolve, logical_spec_tree, is_leaf=_is_logical_spec)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
  if axes is None:
    return 1
  flat = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in flat)


def spec_for_shape(
  logical_axes: Sequence[str | None] | None,
  shape: Sequence[int],
  mesh: Mesh,
  rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
) -> PartitionSpec:
  """PartitionSpec for one array; dims the mesh axis size does not divide are replicated."""
  if not logical_axes or len(logical_axes) != len(shape):
    return PartitionSpec()  # no names, or a derived array of another rank (e.g. factored stats)
  spec = logical_to_mesh(tuple(logical_axes), rules)
  out = []
  for dim, axes in zip(shape, spec, strict=True):
    out.append(axes if axes is not None and dim % _axis_size(mesh, axes) == 0 else None)
  return PartitionSpec(*out)


def state_shardings(
  state: Any, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES
) -> Any:
  """NamedShardings matching `state` (an nnx.State, optimizer state, or any pytree).

  `nnx.Variable` leaves with `logical_axes` metadata are sharded by the rules (checked for
  divisibility); other Variables and plain arrays are replicated. Variables are kept (with
  the sharding as value) so the result has the same pytree structure as `state`.
  """

  def leaf_sharding(x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get(LOGICAL_AXES_KEY)
      value = x.get_value()
      shape = getattr(value, 'shape', ())
      return x.replace(NamedSharding(mesh, spec_for_shape(names, shape, mesh, rules)))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(leaf_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


STATE_LAYOUTS = ('auto', 'default', 'conv_ohwi')
_OHWI = (3, 0, 1, 2)  # major-to-minor of a [kh, kw, I, O] kernel stored [O, kh, kw, I]


def state_layout(how: str = 'auto') -> str:
  """'auto' -> 'conv_ohwi' on GPU, 'default' elsewhere (`state_formats`); others as given."""
  if how not in STATE_LAYOUTS:
    raise ValueError(f'state layout {how!r}: choose one of {", ".join(STATE_LAYOUTS)}.')
  if how == 'auto':
    return 'conv_ohwi' if jax.default_backend() == 'gpu' else 'default'
  return how


def state_formats(shardings: Any, abstract: Any, how: str = 'auto') -> Any:
  """`shardings` with, for 'conv_ohwi', every 4-D leaf stored [O, kh, kw, I] in memory.

  A convolution kernel is the logical array [kh, kw, I, O]; its EMA copy and optimizer moments
  have the same shape. cuDNN takes NHWC convolutions' filters, and returns their gradients,
  laid out [O, kh, kw, I]. With row-major storage XLA transposed every kernel for the forward
  pass and transposed parameter and both moments in and out of each AdamW update
  (`optim.settle_gradients`). 'conv_ohwi' gives those leaves that layout as a
  `jax.experimental.layout.Format` for jit's in/out shardings and `relayout`; logical shapes,
  values and shardings are unchanged. Measured on one H100 (bench/unet.py, base64 bf16 batch
  16, the same machine): the train step 0.1783 -> 0.1524 s, the bare step 0.1639 -> 0.139 s.
  'default' returns `shardings`; 'auto' (what training uses) is 'conv_ohwi' on GPU only:
  XLA:CPU's convolutions take row-major [kh, kw, I, O] kernels, and TPU is unmeasured.
  """
  if state_layout(how) == 'default':
    return shardings
  from jax.experimental.layout import Format, Layout

  ohwi = Layout(major_to_minor=_OHWI)

  def one(sh, leaf):
    return Format(ohwi, sh) if len(getattr(leaf, 'shape', ())) == 4 else sh

  return jax.tree.map(one, shardings, abstract)


def plain_shardings(formats: Any) -> Any:
  """`state_formats`' tree with each Format replaced by its sharding (for orbax, init jits)."""
  from jax.experimental.layout import Format

  return jax.tree.map(lambda f: f.sharding if isinstance(f, Format) else f, formats)


def relayout(tree: Any, formats: Any) -> Any:
  """`tree`'s arrays in the layouts of `formats` (a `state_formats` result), one leaf at a time.

  A leaf whose target is a Format with another layout is copied into it and its old buffer
  donated, so the peak is the tree plus its largest leaf, not two trees; other leaves are kept.
  Pass a tree whose buffers nothing else holds (a jit's or a restore's output): a donated
  buffer that `jax.device_put` shared with another array is deleted for that array too.
  """
  from jax.experimental.layout import Format

  leaves, treedef = jax.tree.flatten(tree)
  targets = treedef.flatten_up_to(formats)
  for i, (leaf, target) in enumerate(zip(leaves, targets, strict=True)):
    if not isinstance(target, Format):
      continue
    have = getattr(leaf, 'format', None)  # (its tiling reads () where the target's is None)
    same = have is not None and have.layout.major_to_minor == target.layout.major_to_minor
    if not (same and leaf.sharding == target.sharding):
      leaves[i] = jax.device_put(leaf, target, donate=True)
  return jax.tree.unflatten(treedef, leaves)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated over the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def sampler_inputs(mesh: Mesh, *arrays: np.ndarray) -> list[jax.Array]:
  """Host arrays of one batch (the same leading size, the whole arrays on every process) as
  global arrays for a sampler inside training: split by row over the mesh (`batch_sharding`)
  where its devices divide the batch, so each device samples its rows, else replicated (every
  device samples them all). The sampler's outputs are pinned replicated, so every host holds
  the whole result."""
  arrays = [np.asarray(a) for a in arrays]
  sh = batch_sharding(mesh) if len(arrays[0]) % mesh.size == 0 else replicated(mesh)
  return [jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx]) for a in arrays]


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes each device holds for `tree` (arrays or ShapeDtypeStructs) under `shardings` (or a
  `state_formats` tree)."""
  total = 0
  leaves = jax.tree.leaves(tree)
  is_sharding = lambda s: isinstance(s, jax.sharding.Sharding)
  shs = jax.tree.leaves(plain_shardings(shardings), is_leaf=is_sharding)
  for leaf, sh in zip(leaves, shs, strict=True):
    shard_shape = sh.shard_shape(leaf.shape)
    total += math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
  return total
