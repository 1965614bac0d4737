"""Prefix attention through the Pallas splash attention kernel (TPU; interpret mode on CPU).

`splash_attention(q, k, v, kv_lengths)` computes what
`jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths)` computes, but with
jax's TPU flash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), which streams
over key blocks with an online softmax instead of materialising the [B, H, T, S] float32
logits in HBM. The kernel has no notion of key lengths, no softmax scale, works on one
example at a time in a [H, T, D] layout and wants sequence lengths in whole 128-wide blocks,
so this module adapts our calls to it:

- the key prefix becomes segment ids: every query is in segment 0, key j of example b is in
  segment 0 when j < kv_lengths[b] and in segment 1 otherwise (the kernel only lets a query
  see keys of its own segment);
- T and S are padded up to multiples of 128. Padded keys get segment 1 (never attended);
  padded queries get segment 0 (they see the real keys, so no row is fully masked) and are
  sliced off the output;
- the head dim is zero-padded to a multiple of 128 (the TPU lane width; zeros change neither
  q.k nor the real output columns), and q is multiplied by 1/sqrt(D) of the original D first;
- [B, T, H, D] is transposed to [B, H, T, D] and the per-example kernel is vmapped over B;
- under an active mesh (`jax.set_mesh`) with more than one device, the kernel runs inside a
  `shard_map` over the batch: a Mosaic kernel cannot be partitioned by XLA itself.

The kernel's custom VJP (its own backward kernels) makes it differentiable once; higher-order
derivatives are not supported by it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import AxisType, PartitionSpec

# TPU vector lane width: the kernel's block sizes along T and S must be multiples of it (its
# segment-id masking tiles ids over 128 lanes), and the head dim is padded to it.
LANES = 128
# Fewer queries or keys than one block: much of the padded block would be wasted work, and
# the [B, H, T, S] logits of so small an attention are cheap to materialise anyway.
MIN_SEQ_LEN = LANES
# Widest head dim sent to the kernel (larger ones have not been tried; VMEM per block grows
# with it).
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = ('bfloat16', 'float32')
# Block sizes tried, largest first, for each padded length (all multiples of LANES).
_BLOCK_CHOICES = (512, 384, 256, 128)


class SplashUnsupportedError(NotImplementedError):
  """Raised at trace time for shapes or dtypes the splash path does not take."""


def splash_unsupported_reason(*, dtype, q_len: int, kv_len: int, head_dim: int) -> str | None:
  """Why the splash kernel does not apply to an attention with these properties, or None when
  it does (a pure function; `layers.plan_attention` uses it for the TPU plan)."""
  name = jnp.dtype(dtype).name
  if name not in SUPPORTED_DTYPES:
    return f'{name}: the splash path takes {" or ".join(SUPPORTED_DTYPES)}'
  if q_len == 1:
    return 'a single query (pooling): logits [B, H, 1, S] are tiny, nothing to fuse'
  if q_len < MIN_SEQ_LEN or kv_len < MIN_SEQ_LEN:
    return (
      f'{q_len} queries x {kv_len} keys: below one {LANES}-wide kernel block, the logits are '
      'small and padding would waste work'
    )
  if head_dim > MAX_HEAD_DIM:
    return f'head dim {head_dim} > {MAX_HEAD_DIM}: not tried with the splash kernel'
  return None


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _block(padded_len: int) -> int:
  """The largest block size in `_BLOCK_CHOICES` that divides `padded_len` (a multiple of 128)."""
  return next(b for b in _BLOCK_CHOICES if padded_len % b == 0)


def _kernel(num_heads: int, q_len: int, kv_len: int, interpret: bool):
  """The per-example splash kernel for [H, q_len, D] x [H, kv_len, D] (padded lengths): a full
  mask (the key prefix is expressed by segment ids), forward and backward blocks."""
  bq, bkv = _block(q_len), _block(kv_len)
  block_sizes = splash.BlockSizes(
    block_q=bq,
    block_kv=bkv,
    block_kv_compute=bkv,
    block_q_dkv=bq,
    block_kv_dkv=bkv,
    block_kv_dkv_compute=bkv,
    block_q_dq=bq,
    block_kv_dq=bkv,
  )
  mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len))] * num_heads)
  return splash.make_splash_mha(
    mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def _local_splash(q, k, v, kv_lengths, *, interpret: bool) -> jax.Array:
  """`splash_attention` on the batch this device holds (kv_lengths [B] int32, not None)."""
  b, t, h, d = q.shape
  s = k.shape[1]
  t_pad, s_pad, d_pad = _round_up(t, LANES), _round_up(s, LANES), _round_up(d, LANES)
  # The kernel computes softmax(q k^T) v: fold the 1/sqrt(D) of the original D into q.
  q = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q.dtype)

  def to_kernel_layout(x, length):  # [B, L, H, D] -> [B, H, L_pad, D_pad], zero padded
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - d)))
    return x.transpose(0, 2, 1, 3)

  q, k, v = to_kernel_layout(q, t_pad), to_kernel_layout(k, s_pad), to_kernel_layout(v, s_pad)
  segment_ids = splash.SegmentIds(
    q=jnp.zeros((b, t_pad), jnp.int32),  # padded queries too: they attend, then are dropped
    kv=(jnp.arange(s_pad, dtype=jnp.int32)[None, :] >= kv_lengths[:, None]).astype(jnp.int32),
  )
  kernel = _kernel(h, t_pad, s_pad, interpret)
  out = jax.vmap(kernel)(q, k, v, segment_ids)  # [B, H, T_pad, D_pad]
  return out.transpose(0, 2, 1, 3)[:, :t, :, :d]


def _mesh_axes() -> tuple[str, ...]:
  """The active mesh's axes of size > 1 that are not already manual (inside a shard_map); ()
  for no mesh or one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(
    name
    for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
    if mesh.shape[name] > 1 and kind != AxisType.Manual
  )


def _batch_axes(batch: int) -> tuple[str, ...]:
  """`_mesh_axes()` when their devices divide the batch (it is split over them), else ()."""
  axes = _mesh_axes()
  mesh = jax.sharding.get_abstract_mesh()
  if not axes or batch % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes


def splash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  kv_lengths: jax.Array | None,
  *,
  interpret: bool = False,
) -> jax.Array:
  """Attention of q [B, T, H, D] over the first kv_lengths[b] (>= 1; None: all) of the keys
  k and values v [B, S, H, D] with the splash kernel -> [B, T, H, D] in q's dtype; the same
  result as `jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths)`.

  `interpret=True` runs the kernel in Pallas interpret mode (any backend, e.g. CPU tests).
  Raises SplashUnsupportedError (at trace time) where `splash_unsupported_reason` says no.
  """
  assert q.ndim == 4 and k.shape == v.shape and q.shape[0] == k.shape[0], (q.shape, k.shape)
  assert q.shape[2:] == k.shape[2:] and q.dtype == k.dtype == v.dtype, (q.shape, k.shape)
  b, t, _, d = q.shape
  reason = splash_unsupported_reason(dtype=q.dtype, q_len=t, kv_len=k.shape[1], head_dim=d)
  if reason is not None:
    raise SplashUnsupportedError(reason)
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), k.shape[1], jnp.int32)
  kv_lengths = kv_lengths.astype(jnp.int32)
  run = lambda *args: _local_splash(*args, interpret=interpret)
  if _mesh_axes():
    # XLA cannot partition a Mosaic kernel over several devices (lowering refuses it), so under
    # a mesh it always runs in a shard_map: each device on its slice of the batch, or, for a
    # batch the devices do not divide, on the whole batch. check_vma off since the Pallas call
    # does not annotate how its outputs vary over the mesh axes.
    spec = PartitionSpec(_batch_axes(b) or None)
    run = jax.shard_map(run, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)
  return run(q, k, v, kv_lengths)
