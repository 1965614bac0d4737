"""Building blocks of the Efficient U-Net: dense/conv layers with logical axis names,
GroupNorm, FiLM residual blocks, attention, resampling and embeddings.

Every parameter is an `nnx.Param` in float32 carrying a `logical_axes` metadata tuple (one
name per dimension); `imagen_jax.sharding` maps those names onto mesh axes. The names are
kept as plain metadata (not flax's `out_sharding`) so that models can be created and
`nnx.eval_shape`-d with or without an active mesh. Computation runs in `dtype` (float32 or
bfloat16); normalisation statistics and softmax stay in float32.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
from collections.abc import Iterator

import jax
import jax.extend
import jax.extend.random
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.models import cpu_attention, cpu_conv, cpu_norm, tpu_attention

LOGICAL_AXES_KEY = 'logical_axes'

log = logging.getLogger(__name__)


class ParamInit:
  """Creates float32 `nnx.Param`s annotated with logical axis names; random ones are filled
  by a single truncated-normal draw in `finalize()`.

  Why one draw: every separate PRNG call costs XLA:CPU about a second of compile time
  (threefry), so initialising a few hundred tensors one by one took minutes to compile under
  `jit` and tens of seconds eagerly. Random params are created as zeros, remembered, and
  `finalize()` (called once by the model after building all submodules) fills them with the
  pieces of one flat truncated-normal vector, scaled. That vector is not materialised for
  large models (see `_truncated_normal_pieces`), with the same values bit for bit. XLA:CPU
  memory_analysis of base64's init under jit: temporaries 15.1 -> 4.7 GB on one device (6.4 GB
  of params); FSDP over 8 devices 11.7 -> 1.7 GB per device (0.8 GB of params each).
  Works eagerly, under `jit` and `nnx.eval_shape`.
  """

  def __init__(self, key: jax.Array):
    self._key = key
    self._pending: list[tuple[nnx.Param, float]] = []
    self._finalized = False

  def _make(self, value: jax.Array, logical_axes: tuple[str | None, ...]) -> nnx.Param:
    if len(value.shape) != len(logical_axes):
      raise ValueError(f'shape {value.shape} and logical_axes {logical_axes} differ in rank.')
    if self._finalized:
      raise RuntimeError('ParamInit.finalize() was already called; create a new ParamInit.')
    return nnx.Param(value, logical_axes=logical_axes)

  def zeros(self, shape: tuple[int, ...], logical_axes: tuple[str | None, ...]) -> nnx.Param:
    return self._make(jnp.zeros(shape, jnp.float32), logical_axes)

  def ones(self, shape: tuple[int, ...], logical_axes: tuple[str | None, ...]) -> nnx.Param:
    return self._make(jnp.ones(shape, jnp.float32), logical_axes)

  def normal(
    self, shape: tuple[int, ...], logical_axes: tuple[str | None, ...], std: float
  ) -> nnx.Param:
    """Truncated normal (at +-2 std) with standard deviation `std`."""
    param = self._make(jnp.zeros(shape, jnp.float32), logical_axes)
    self._pending.append((param, float(std)))
    return param

  def lecun(
    self, shape: tuple[int, ...], logical_axes: tuple[str | None, ...], fan_in: int
  ) -> nnx.Param:
    """LeCun normal: std 1/sqrt(fan_in)."""
    return self.normal(shape, logical_axes, 1.0 / math.sqrt(fan_in))

  def finalize(self) -> None:
    """Fills every pending random param from one PRNG draw."""
    self._finalized = True
    if not self._pending:
      return
    shapes = tuple(tuple(p.get_value().shape) for p, _ in self._pending)
    stds = tuple(std for _, std in self._pending)
    values = _truncated_normal_pieces(self._key, shapes, stds)
    for (param, _), value in zip(self._pending, values, strict=True):
      param.set_value(value)
    self._pending = []


# 1 / std of a standard normal truncated to [-2, 2].
_TRUNC_STD_CORRECTION = 1.0 / 0.87962566103423978

# Leaves with at least this many elements are drawn apart from the flat vector (see below).
_SEPARATE_DRAW_ELEMENTS = 1 << 20
# At most this many elements per batch of equal-size leaves drawn by one lax.map.
_MAP_ELEMENTS = 1 << 26


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _truncated_normal_pieces(
  key: jax.Array,
  shapes: tuple[tuple[int, ...], ...],
  stds: tuple[float, ...],
  separate_from: int = _SEPARATE_DRAW_ELEMENTS,
) -> list[jax.Array]:
  """Pieces of ONE truncated-normal vector of sum(sizes) elements, scaled and reshaped.

  The values are those of `jax.random.truncated_normal(key, -2, 2, (total,))` split at the
  pieces' offsets, but that vector is never formed: with threefry's partitionable counters
  (jax's default) element i depends only on (key, i), so each piece is drawn from its own
  counters. Small pieces share one draw; pieces of `separate_from` elements or more are drawn
  by a `lax.map` over equal-size pieces (one compiled body per size, at most `_MAP_ELEMENTS`
  elements per map). The temporaries are then about one copy of the random params (XLA:CPU
  keeps every stack alive until the end), where the flat vector cost ~2.4 copies (its
  counters, bits and floats), and under a mesh each device holds 1/devices of the stacks
  where the flat vector was replicated on every device.
  """
  sizes = [math.prod(s) for s in shapes]
  offsets = [0, *itertools.accumulate(sizes)][:-1]
  total = sum(sizes)
  done: set[int] = set()  # pieces already scaled and reshaped
  exact = (
    getattr(jax.config, 'jax_threefry_partitionable', True)
    and str(jax.random.key_impl(key)) == 'threefry2x32'
    and total < 2**32
  )
  if not exact or max(sizes, default=0) < separate_from:  # one flat draw, as jax makes it
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (total,), jnp.float32)
    pieces = jnp.split(flat, list(itertools.accumulate(sizes))[:-1]) if len(sizes) > 1 else [flat]
  else:
    pieces: list[jax.Array | None] = [None] * len(sizes)
    # Under a mesh (jax.set_mesh, as train_lib initialises), each device draws 1/devices of
    # every stack (threefry on iota counters partitions); the pieces then move to their shards.
    mesh = jax.sharding.get_abstract_mesh()
    spread = (
      (lambda x: x)
      if mesh.empty or mesh.size == 1
      else lambda x: jax.lax.with_sharding_constraint(
        x, jax.sharding.PartitionSpec(*([None] * (x.ndim - 1)), tuple(mesh.axis_names))
      )
    )
    small = [i for i, n in enumerate(sizes) if n < separate_from]
    if small:
      counters = jnp.concatenate(
        [jax.lax.iota(jnp.uint32, sizes[i]) + jnp.uint32(offsets[i]) for i in small]
      )
      drawn = _truncated_normal_at(key, spread(counters))
      starts = list(itertools.accumulate(sizes[i] for i in small))[:-1]
      for i, piece in zip(small, jnp.split(drawn, starts) if starts else [drawn], strict=True):
        pieces[i] = piece
    by_size: dict[int, list[int]] = {}
    for i, n in enumerate(sizes):
      if n >= separate_from:
        by_size.setdefault(n, []).append(i)
    for n, members in by_size.items():
      per_map = max(1, _MAP_ELEMENTS // n)
      for start in range(0, len(members), per_map):
        batch = members[start : start + per_map]
        starts = jnp.asarray([offsets[i] for i in batch], jnp.uint32)
        scales = jnp.asarray([stds[i] * _TRUNC_STD_CORRECTION for i in batch], jnp.float32)
        iota = jax.lax.iota(jnp.uint32, n)

        def draw(args, iota=iota):
          start, scale = args
          return _truncated_normal_at(key, iota + start) * scale

        stacked = spread(jax.lax.map(draw, (starts, scales)))  # [len(batch), n], scaled
        for j, i in enumerate(batch):
          pieces[i] = stacked[j].reshape(shapes[i])
          done.add(i)
  return [
    piece if i in done else (piece * (std * _TRUNC_STD_CORRECTION)).reshape(shape)
    for i, (piece, shape, std) in enumerate(zip(pieces, shapes, stds, strict=True))
  ]


def _truncated_normal_at(key: jax.Array, counters: jax.Array) -> jax.Array:
  """Elements `counters` (uint32, below 2**32) of jax.random.truncated_normal(key, -2, 2,
  (N,), float32) for any N above them: jax's own steps (partitionable threefry bits, the
  mantissa trick of `uniform` on [erf(-sqrt 2), erf(sqrt 2)), sqrt 2 * erfinv, the clip).
  tests/models_test.py checks equality with jax.random.truncated_normal bit for bit."""
  k1, k2 = jax.random.key_data(key)
  bits1, bits2 = jax.extend.random.threefry2x32_p.bind(k1, k2, jnp.zeros_like(counters), counters)
  bits = bits1 ^ bits2
  one = jnp.asarray(np.array(1.0, np.float32).view(np.uint32))
  floats = jax.lax.bitcast_convert_type((bits >> 9) | one, jnp.float32) - 1.0  # [0, 1)
  sqrt2 = np.float32(np.sqrt(2))
  lo = jax.lax.erf(jnp.float32(-2.0) / sqrt2)
  hi = jax.lax.erf(jnp.float32(2.0) / sqrt2)
  u = jax.lax.max(lo, floats * (hi - lo) + lo)
  out = sqrt2 * jax.lax.erf_inv(u)
  return jnp.clip(
    out,
    jax.lax.nextafter(jnp.float32(-2.0), jnp.float32(np.inf)),
    jax.lax.nextafter(jnp.float32(2.0), jnp.float32(-np.inf)),
  )


def as_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
  """'float32' | 'bfloat16' (or a dtype) -> a jnp dtype, with a clear error otherwise."""
  name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
  if name not in ('float32', 'bfloat16', 'float16'):
    raise ValueError(f"Unsupported compute dtype {dtype!r}; use 'float32' or 'bfloat16'.")
  return jnp.dtype(name)


class Dense(nnx.Module):
  """y = x @ W + b over the last axis."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    pinit: ParamInit,
    dtype: jnp.dtype = jnp.float32,
    use_bias: bool = True,
    zero_init: bool = False,
    axes: tuple[str, str] = ('embed', 'mlp'),
  ):
    shape = (in_features, out_features)
    self.kernel = pinit.zeros(shape, axes) if zero_init else pinit.lecun(shape, axes, in_features)
    self.bias = pinit.zeros((out_features,), (axes[1],)) if use_bias else None
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    assert x.shape[-1] == self.in_features, (x.shape, self.in_features)
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Conv(nnx.Module):
  """2-D convolution, NHWC activations, HWIO kernel, 'SAME' padding."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    pinit: ParamInit,
    stride: int = 1,
    dtype: jnp.dtype = jnp.float32,
    zero_init: bool = False,
  ):
    shape = (kernel_size, kernel_size, in_channels, out_channels)
    axes = ('conv_h', 'conv_w', 'conv_in', 'conv_out')
    fan_in = kernel_size * kernel_size * in_channels
    self.kernel = pinit.zeros(shape, axes) if zero_init else pinit.lecun(shape, axes, fan_in)
    self.bias = pinit.zeros((out_channels,), ('conv_out',))
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.stride = stride
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    assert x.ndim == 4 and x.shape[-1] == self.in_channels, (x.shape, self.in_channels)
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if kernel.shape[0] == 1 and self.stride == 1:  # 1x1: a plain matmul over channels
      y = jnp.dot(x, kernel[0, 0])
    elif cpu_conv.wanted(x, kernel, self.stride):
      y = cpu_conv.conv_same(x, kernel)
    else:
      y = cpu_conv.plain(x, kernel, self.stride)
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm with float32 statistics; output in the compute dtype."""

  def __init__(self, num_channels: int, num_groups: int, *, pinit: ParamInit, dtype=jnp.float32):
    if num_channels % num_groups:
      raise ValueError(
        f'GroupNorm: num_groups={num_groups} must divide the channel count {num_channels}; '
        'change UNetConfig.num_groups or the channel widths.'
      )
    self.scale = pinit.ones((num_channels,), ('norm',))
    self.bias = pinit.zeros((num_channels,), ('norm',))
    self.num_groups = num_groups
    self.dtype = dtype

  def __call__(
    self,
    x: jax.Array,
    eps: float = 1e-5,
    *,
    film_scale: jax.Array | None = None,
    film_shift: jax.Array | None = None,
    silu: bool = False,
  ) -> jax.Array:
    """x [B, ..., C] -> normalised x in the compute dtype. FiLM, when given (film_scale and
    film_shift [B, C]), is applied as y * (1 + film_scale) + film_shift in float32 before the
    cast, so that a bfloat16 model rounds once, after the modulation; `silu` applies SiLU
    after it (on CPU in float32 before the cast, with `cpu_norm`'s backward pass)."""
    c = x.shape[-1]
    if film_scale is not None:
      assert film_shift is not None and film_scale.shape == (x.shape[0], c), film_scale.shape
    if cpu_norm.wanted():
      y = cpu_norm.group_norm(
        x,
        self.scale[...],
        self.bias[...],
        groups=self.num_groups,
        eps=eps,
        film_scale=film_scale,
        film_shift=film_shift,
        silu=silu,
      )
      return y.astype(self.dtype)
    y = cpu_norm.normalize(
      x,
      self.scale[...],
      self.bias[...],
      film_scale,
      film_shift,
      groups=self.num_groups,
      eps=eps,
    )
    y = y.astype(self.dtype)
    return jax.nn.silu(y) if silu else y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with float32 statistics."""

  def __init__(self, num_features: int, *, pinit: ParamInit, dtype=jnp.float32):
    self.scale = pinit.ones((num_features,), ('norm',))
    self.bias = pinit.zeros((num_features,), ('norm',))
    self.dtype = dtype

  def __call__(self, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


def sinusoidal_embedding(values: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """[B] -> [B, dim] float32: [sin(v * f_i), cos(v * f_i)], f_i geometric in [1/max_period, 1]."""
  if dim % 2:
    raise ValueError(f'sinusoidal_embedding needs an even dim, got {dim}.')
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = values.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ScalarEmbedding(nnx.Module):
  """A scalar per example (log-SNR, aug level) -> sinusoids -> 2-layer MLP -> [B, cond_dim]."""

  def __init__(
    self, emb_dim: int, cond_dim: int, *, scale: float, pinit: ParamInit, dtype=jnp.float32
  ):
    self.emb_dim = emb_dim
    self.scale = scale
    self.dense_0 = Dense(emb_dim, cond_dim, pinit=pinit, dtype=dtype)
    self.dense_1 = Dense(cond_dim, cond_dim, pinit=pinit, dtype=dtype)

  def __call__(self, values: jax.Array) -> jax.Array:
    assert values.ndim == 1, values.shape
    emb = sinusoidal_embedding(values * self.scale, self.emb_dim)  # [B, E]
    return self.dense_1(jax.nn.silu(self.dense_0(emb)))  # [B, cond_dim]


# Custom-call targets of the fused attention kernels in compiled HLO text (bench/unet.py looks
# for them to report whether the fused kernel really runs). Every Pallas/Mosaic TPU kernel is a
# 'tpu_custom_call'; splash attention is the only one in this model.
FUSED_ATTENTION_MARKERS = {'cudnn': '__cudnn$fmha', 'splash': 'tpu_custom_call'}

_plan_records: list[dict] | None = None


@contextlib.contextmanager
def record_attention_plans() -> Iterator[list[dict]]:
  """Collects, while tracing inside the block, one dict per attention call: name, implementation,
  reason, q/k shapes, dtype (tests and bench/unet.py use it; tracing happens once per compile)."""
  global _plan_records
  previous, _plan_records = _plan_records, []
  try:
    yield _plan_records
  finally:
    _plan_records = previous


def _is_cuda_gpu() -> bool:
  if jax.default_backend() != 'gpu':
    return False
  # How jax's own cuDNN attention tells CUDA from ROCm.
  return 'cuda' in jax.extend.backend.get_backend().platform_version.lower()


def _cudnn_head_dim_limit() -> int:
  """cuDNN's flash attention takes head dims up to 256 on Hopper and later, 128 before."""
  try:
    major = int(str(getattr(jax.devices()[0], 'compute_capability', '0')).split('.')[0])
  except ValueError:
    major = 0
  return 256 if major >= 9 else 128


def plan_attention(
  *,
  backend: str,
  cuda: bool,
  dtype,
  q_len: int,
  head_dim: int,
  head_dim_limit: int,
  kv_len: int | None = None,
  batch_heads: int | None = None,
) -> tuple[str, str]:
  """(implementation, reason) for an attention with these properties (a pure function).

  'cudnn': cuDNN flash attention (CUDA GPU, 16-bit dtype, head dim a multiple of 8 within
  cuDNN's limit, more than one query). 'splash': the Pallas splash attention kernel (TPU,
  bfloat16 or float32, at least 128 queries and 128 keys (kv_len; None: as many as queries),
  head dim up to 256; see `tpu_attention.splash_unsupported_reason`). 'blocked': CPU, float32
  logits [B, H, T, S] (batch_heads = B * H; None: assumed large) over one cache-sized block:
  `cpu_attention.blocked_attention` (the same result in cache-sized blocks of queries, 3-4x
  faster there; below that size its loop and transposes cost more than they save). 'xla':
  jax's reference attention, which materialises the logits in float32: costly at full
  resolution.
  """
  if backend == 'tpu':
    why_not = tpu_attention.splash_unsupported_reason(
      dtype=dtype, q_len=q_len, kv_len=q_len if kv_len is None else kv_len, head_dim=head_dim
    )
    if why_not is not None:
      return 'xla', why_not
    return 'splash', 'Pallas splash attention, key/value lengths as segment ids'
  if backend == 'cpu':
    if q_len == 1:
      return 'xla', 'a single query (pooling): logits [B, H, 1, S] are tiny'
    logits_bytes = 4 * q_len * (q_len if kv_len is None else kv_len) * (batch_heads or 1 << 30)
    if logits_bytes <= cpu_attention.DEFAULT_BLOCK_BYTES:
      return 'xla', 'CPU: the float32 logits fit in one cache-sized block; nothing to split'
    return 'blocked', 'CPU: cache-sized query blocks, flash-style backward (cpu_attention)'
  if backend != 'gpu':
    return 'xla', f'no fused attention kernel wired for backend {backend!r}'
  if not cuda:
    return 'xla', 'GPU without CUDA/cuDNN'
  name = jnp.dtype(dtype).name
  if name not in ('bfloat16', 'float16'):
    return 'xla', f'{name}: cuDNN flash attention needs bfloat16 or float16'
  if head_dim % 8 or head_dim > head_dim_limit:
    return 'xla', f'head dim {head_dim}: cuDNN needs a multiple of 8 up to {head_dim_limit}'
  if q_len == 1:
    return 'xla', 'a single query (pooling): logits [B, H, 1, S] are tiny, nothing to fuse'
  return 'cudnn', 'cuDNN flash attention with key/value lengths'


def attention_plan(q: jax.Array, k: jax.Array) -> tuple[str, str]:
  """`plan_attention` for q [B, T, H, D] and k [B, S, H, D] on the default backend and device."""
  backend = jax.default_backend()
  cuda = _is_cuda_gpu()
  return plan_attention(
    backend=backend,
    cuda=cuda,
    dtype=q.dtype,
    q_len=q.shape[1],
    head_dim=q.shape[3],
    head_dim_limit=_cudnn_head_dim_limit() if cuda else 0,
    kv_len=k.shape[1],
    batch_heads=q.shape[0] * q.shape[2],
  )


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  kv_lengths: jax.Array | None,
  *,
  name: str = 'attention',
) -> jax.Array:
  """Multi-head attention over a prefix of the keys, via `jax.nn.dot_product_attention`.

  q [B, T, H, D], k/v [B, S, H, D], kv_lengths [B] int (keys [0, kv_lengths[b]) are attended;
  at least 1) or None (all keys). Passing lengths instead of a mask is what lets cuDNN's fused
  (flash) kernel run: it rejects a [B, 1, 1, S] mask turned into a bias. The implementation is
  chosen by `attention_plan` and logged when traced (once per compilation). If cuDNN or the
  splash path still declares the pattern unsupported (NotImplementedError, raised while
  tracing), a warning is logged and XLA's implementation is used; any other error propagates.
  Off TPU the splash kernel runs in Pallas interpret mode (only tests force that plan there).
  """
  assert q.ndim == 4 and k.shape == v.shape and q.shape[0] == k.shape[0], (q.shape, k.shape)
  if kv_lengths is not None:
    kv_lengths = kv_lengths.astype(jnp.int32)
  impl, reason = attention_plan(q, k)
  if impl == 'cudnn':
    try:
      out = jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=kv_lengths, implementation='cudnn'
      )
    except NotImplementedError as e:  # cuDNN: "unsupported pattern" (shapes/arch/version)
      log.warning('attention %s: cuDNN refused %s x %s (%s); using XLA.', name, q.shape, k.shape, e)
      impl, reason = 'xla', f'cuDNN refused: {e}'
  if impl == 'splash':
    try:
      out = tpu_attention.splash_attention(
        q, k, v, kv_lengths, interpret=jax.default_backend() != 'tpu'
      )
    except NotImplementedError as e:  # SplashUnsupportedError, or the kernel's own limits
      log.warning(
        'attention %s: splash refused %s x %s (%s); using XLA.', name, q.shape, k.shape, e
      )
      impl, reason = 'xla', f'splash refused: {e}'
  if impl == 'blocked':
    out = cpu_attention.blocked_attention(q, k, v, kv_lengths)
  if impl == 'xla':
    out = jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=kv_lengths, implementation='xla'
    )
  log.info(
    'attention %s: %s (%s), q %s k %s %s', name, impl, reason, q.shape, k.shape, q.dtype.name
  )
  if _plan_records is not None:
    _plan_records.append(
      dict(name=name, implementation=impl, reason=reason, q=q.shape, k=k.shape, dtype=q.dtype.name)
    )
  return out


class ResBlock(nnx.Module):
  """GroupNorm-SiLU-Conv, FiLM (scale/shift from the conditioning vector), GroupNorm-SiLU-
  (Dropout)-Conv(zero init), plus a (1x1-projected) residual."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    cond_dim: int,
    *,
    num_groups: int,
    dropout: float,
    pinit: ParamInit,
    rngs: nnx.Rngs | None = None,
    dtype=jnp.float32,
  ):
    if dropout > 0 and rngs is None:
      raise ValueError('ResBlock with dropout > 0 needs `rngs` (a "dropout" stream).')
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.norm_0 = GroupNorm(in_channels, num_groups, pinit=pinit, dtype=dtype)
    self.conv_0 = Conv(in_channels, out_channels, 3, pinit=pinit, dtype=dtype)
    # FiLM in float32 whatever the compute dtype: [B, cond] x [cond, 2C] costs nothing next to
    # the convolutions, and its scale/shift reach every pixel.
    self.film = Dense(cond_dim, 2 * out_channels, pinit=pinit, dtype=jnp.float32, zero_init=True)
    self.norm_1 = GroupNorm(out_channels, num_groups, pinit=pinit, dtype=dtype)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.conv_1 = Conv(out_channels, out_channels, 3, pinit=pinit, dtype=dtype, zero_init=True)
    self.skip = (
      Conv(in_channels, out_channels, 1, pinit=pinit, dtype=dtype)
      if in_channels != out_channels
      else None
    )

  def __call__(self, x: jax.Array, cond: jax.Array, deterministic: bool = True) -> jax.Array:
    b, h, w, c = x.shape
    assert c == self.in_channels, (x.shape, self.in_channels)
    assert cond.shape[0] == b, (cond.shape, x.shape)
    y = self.conv_0(self.norm_0(x, silu=True))  # [B, H, W, C_out]
    film = self.film(jax.nn.silu(cond.astype(jnp.float32)))  # [B, 2 C_out] float32
    scale, shift = jnp.split(film, 2, axis=-1)  # [B, C_out] each
    y = self.norm_1(y, film_scale=scale, film_shift=shift, silu=True)
    if self.dropout is not None:
      y = self.dropout(y, deterministic=deterministic)
    y = self.conv_1(y)
    skip = x if self.skip is None else self.skip(x)
    out = skip.astype(y.dtype) + y
    assert out.shape == (b, h, w, self.out_channels), out.shape
    return out


class SelfAttention(nnx.Module):
  """Pre-norm self-attention over pixels; optionally the text tokens (already projected to
  `text_width`) are appended to the keys/values (Imagen style), honouring their mask."""

  def __init__(
    self,
    channels: int,
    *,
    num_heads: int,
    head_dim: int,
    num_groups: int,
    text_width: int | None,
    pinit: ParamInit,
    dtype=jnp.float32,
    name: str = 'self_attn',
  ):
    inner = num_heads * head_dim
    self.channels = channels
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.name = name
    self.norm = GroupNorm(channels, num_groups, pinit=pinit, dtype=dtype)
    self.qkv = Dense(channels, 3 * inner, pinit=pinit, dtype=dtype, axes=('embed', 'heads'))
    self.text_kv = (
      Dense(text_width, 2 * inner, pinit=pinit, dtype=dtype, axes=('embed', 'heads'))
      if text_width
      else None
    )
    self.out = Dense(
      inner, channels, pinit=pinit, dtype=dtype, zero_init=True, axes=('heads', 'embed')
    )

  def __call__(
    self,
    x: jax.Array,
    text_tokens: jax.Array | None = None,
    text_lengths: jax.Array | None = None,
  ) -> jax.Array:
    """x [B, H, W, C]; text_tokens [B, L, text_width] whose first text_lengths [B] are valid."""
    b, h, w, c = x.shape
    assert c == self.channels, (x.shape, self.channels)
    n, nh, hd = h * w, self.num_heads, self.head_dim
    qkv = self.qkv(self.norm(x).reshape(b, n, c)).reshape(b, n, 3, nh, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, D]
    kv_lengths = None
    if self.text_kv is not None:
      assert text_tokens is not None and text_lengths is not None
      length = text_tokens.shape[1]
      text_kv = self.text_kv(text_tokens).reshape(b, length, 2, nh, hd)
      k = jnp.concatenate([k, text_kv[:, :, 0]], axis=1)  # [B, N + L, H, D]
      v = jnp.concatenate([v, text_kv[:, :, 1]], axis=1)
      kv_lengths = n + text_lengths  # all pixels, then the valid text prefix
    y = attention(q, k, v, kv_lengths, name=self.name).reshape(b, n, nh * hd)
    return x + self.out(y).reshape(b, h, w, c).astype(x.dtype)


class CrossAttention(nnx.Module):
  """Pre-norm cross-attention from pixels (queries) to text tokens (keys/values)."""

  def __init__(
    self,
    channels: int,
    *,
    num_heads: int,
    head_dim: int,
    num_groups: int,
    text_width: int,
    pinit: ParamInit,
    dtype=jnp.float32,
    name: str = 'cross_attn',
  ):
    inner = num_heads * head_dim
    self.channels = channels
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.name = name
    self.norm = GroupNorm(channels, num_groups, pinit=pinit, dtype=dtype)
    self.q = Dense(channels, inner, pinit=pinit, dtype=dtype, axes=('embed', 'heads'))
    self.kv = Dense(text_width, 2 * inner, pinit=pinit, dtype=dtype, axes=('embed', 'heads'))
    self.out = Dense(
      inner, channels, pinit=pinit, dtype=dtype, zero_init=True, axes=('heads', 'embed')
    )

  def __call__(self, x: jax.Array, text_tokens: jax.Array, text_lengths: jax.Array) -> jax.Array:
    """x [B, H, W, C]; text_tokens [B, L, text_width] whose first text_lengths [B] are valid."""
    b, h, w, c = x.shape
    assert c == self.channels, (x.shape, self.channels)
    n, nh, hd, length = h * w, self.num_heads, self.head_dim, text_tokens.shape[1]
    q = self.q(self.norm(x).reshape(b, n, c)).reshape(b, n, nh, hd)
    kv = self.kv(text_tokens).reshape(b, length, 2, nh, hd)
    y = attention(q, kv[:, :, 0], kv[:, :, 1], text_lengths, name=self.name)
    y = y.reshape(b, n, nh * hd)
    return x + self.out(y).reshape(b, h, w, c).astype(x.dtype)


class AttentionPool(nnx.Module):
  """Pools text tokens [B, L, W] into one vector [B, W] with a learned query (over the valid
  prefix of the tokens)."""

  def __init__(self, width: int, *, num_heads: int, pinit: ParamInit, dtype=jnp.float32):
    if width % num_heads:
      raise ValueError(f'AttentionPool: num_heads={num_heads} must divide width {width}.')
    self.width = width
    self.num_heads = num_heads
    self.query = pinit.normal((width,), ('embed',), std=1.0)
    self.kv = Dense(width, 2 * width, pinit=pinit, dtype=dtype, axes=('embed', 'heads'))
    self.out = Dense(width, width, pinit=pinit, dtype=dtype, axes=('heads', 'embed'))
    self.dtype = dtype

  def __call__(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """tokens [B, L, W] whose first lengths [B] (>= 1) are valid -> [B, W]."""
    b, length, wd = tokens.shape
    nh, hd = self.num_heads, wd // self.num_heads
    q = jnp.broadcast_to(self.query[...].astype(self.dtype).reshape(1, 1, nh, hd), (b, 1, nh, hd))
    kv = self.kv(tokens).reshape(b, length, 2, nh, hd)
    pooled = attention(q, kv[:, :, 0], kv[:, :, 1], lengths, name='text_pool').reshape(b, wd)
    return self.out(pooled)  # [B, W]


class Downsample(nnx.Module):
  """Stride-2 3x3 convolution (halves H and W, changes channels)."""

  def __init__(self, in_channels: int, out_channels: int, *, pinit: ParamInit, dtype=jnp.float32):
    self.conv = Conv(in_channels, out_channels, 3, stride=2, pinit=pinit, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    if h % 2 or w % 2:
      raise ValueError(f'Downsample needs even spatial dims, got {x.shape}.')
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2 then 3x3 convolution."""

  def __init__(self, in_channels: int, out_channels: int, *, pinit: ParamInit, dtype=jnp.float32):
    self.conv = Conv(in_channels, out_channels, 3, pinit=pinit, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return self.conv(x)
