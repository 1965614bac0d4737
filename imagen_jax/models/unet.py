"""The Efficient U-Net of Imagen (Saharia et al. 2022, appendix B), in Flax NNX.

Layout (level i works at resolution H / 2**i with `dim * channel_mults[i]` channels):

  input_conv
  down_i: [downsample (i > 0)] -> num_res_blocks[i] x (res [-> self-attn] [-> cross-attn])
          -> skip_i                       (downsample BEFORE the convolutions)
  mid:    res -> [self-attn] -> [cross-attn] -> res   (attention as at the lowest level)
  up_i:   concat(h, skip_i / sqrt(2)) -> num_res_blocks[i] x (res [-> attn] [-> cross])
          -> [upsample (i > 0)]           (upsample AFTER the convolutions)
  output_norm -> SiLU -> output_conv (zero init)

Conditioning vector [B, cond_dim] = MLP(sinusoids(logsnr)) + Dense(attention-pooled text)
(+ MLP(sinusoids(aug_level)) for super-resolution); it drives FiLM in every residual block.
Text tokens are projected to `cond_dim` and used by cross-attention and (optionally) appended
to self-attention keys/values. Examples with `drop_text` (or an all-False text mask) use a
learned null text token instead, so their output does not depend on the text inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.models import layers

_SKIP_SCALE = 1.0 / math.sqrt(2.0)
_LOGSNR_SCALE = 25.0  # log-SNR in about [-20, 20] -> sinusoid inputs in about [-500, 500]
_AUG_SCALE = 1000.0  # aug level in [0, 1]


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of the U-Net; every field is a plain int/float/str/bool/tuple."""

  dim: int = 64  # base channels
  channel_mults: tuple[int, ...] = (1, 2, 4)
  num_res_blocks: int | tuple[int, ...] = 2  # per level
  attn_levels: tuple[int, ...] = ()  # level indices (0 = full res) with self-attention
  cross_attn_levels: tuple[int, ...] = ()
  num_heads: int = 4
  head_dim: int = 32
  cond_dim: int = 256
  text_dim: int = 768  # width of the text embeddings fed in
  text_in_self_attn: bool = True  # append text tokens to self-attn keys/values
  num_groups: int = 8  # GroupNorm groups (must divide channels)
  image_channels: int = 3
  lowres_cond: bool = False  # SR variant
  dropout: float = 0.0
  dtype: str = 'float32'  # compute dtype: 'float32' | 'bfloat16'
  remat: bool = False
  pool_heads: int = 8  # heads of the text attention pooling (must divide cond_dim)

  def __post_init__(self):
    def is_size(value) -> bool:  # a whole number >= 1 (a bool is not one)
      return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    sizes = ('dim', 'num_heads', 'head_dim', 'cond_dim', 'text_dim', 'num_groups')
    sizes += ('image_channels', 'pool_heads')
    not_positive = [f'{n}={getattr(self, n)!r}' for n in sizes if not is_size(getattr(self, n))]
    if not all(is_size(m) for m in self.channel_mults):
      not_positive.append(f'channel_mults={self.channel_mults!r}')
    if not_positive:  # a zero width trained zero-size layers (or divided by zero) silently
      raise ValueError(
        f'Invalid UNetConfig: {", ".join(not_positive)}: sizes must be whole numbers >= 1.'
      )
    problems = []
    levels = len(self.channel_mults)
    if levels < 1:
      problems.append('channel_mults must have at least one level')
    # Whole numbers only: a level 0.5 matched none (attention silently gone), a block count 2.5
    # was a TypeError traceback at the first step.
    blocks = self.num_res_blocks
    for name, values in (
      ('num_res_blocks', blocks if isinstance(blocks, tuple) else (blocks,)),
      ('attn_levels', self.attn_levels),
      ('cross_attn_levels', self.cross_attn_levels),
    ):
      if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        problems.append(f'{name}={getattr(self, name)!r} must hold whole numbers')
    if problems:
      raise ValueError('Invalid UNetConfig: ' + '; '.join(problems) + '.')
    if isinstance(blocks, tuple) and len(blocks) not in (1, levels):
      problems.append(
        f'num_res_blocks {self.num_res_blocks} must be an int, one entry (every level) or one '
        f'entry per level ({levels} levels from channel_mults {self.channel_mults})'
      )
    else:
      blocks = self.num_res_blocks
      if any(n < 1 for n in (blocks if isinstance(blocks, tuple) else (blocks,))):
        problems.append(
          f'num_res_blocks {blocks} must be at least 1 on every level (a level brings its skip '
          'back to its width in its up blocks)'
        )
    for name in ('attn_levels', 'cross_attn_levels'):
      bad = [i for i in getattr(self, name) if not 0 <= i < levels]
      if bad:
        problems.append(f'{name} {getattr(self, name)} has levels {bad} outside [0, {levels})')
    if self.dim % 2:  # the log-SNR embedding's sinusoids: dim / 2 frequencies
      problems.append(f'dim={self.dim} must be even (the log-SNR embedding has dim / 2 sinusoids)')
    for mult in self.channel_mults:
      if (self.dim * mult) % self.num_groups:
        problems.append(
          f'num_groups={self.num_groups} does not divide channels dim*mult={self.dim * mult}'
        )
    if self.cond_dim % self.pool_heads:
      problems.append(f'pool_heads={self.pool_heads} must divide cond_dim={self.cond_dim}')
    if self.dtype not in ('float32', 'bfloat16'):
      problems.append(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    if not 0.0 <= self.dropout < 1.0:
      problems.append(f'dropout must be in [0, 1), got {self.dropout}')
    if problems:
      raise ValueError('Invalid UNetConfig: ' + '; '.join(problems) + '.')

  @property
  def num_levels(self) -> int:
    return len(self.channel_mults)

  def blocks_per_level(self) -> tuple[int, ...]:
    if isinstance(self.num_res_blocks, int):
      return (self.num_res_blocks,) * self.num_levels
    if len(self.num_res_blocks) == 1:  # every level: `--config.model.num_res_blocks=2` on a
      return tuple(self.num_res_blocks) * self.num_levels  # preset that holds a tuple gives (2,)
    return tuple(self.num_res_blocks)

  def channels(self) -> tuple[int, ...]:
    return tuple(self.dim * m for m in self.channel_mults)


PRESETS: dict[str, UNetConfig] = {
  # Tests: a few thousand params, two levels, every kind of block.
  'tiny': UNetConfig(
    dim=16,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attn_levels=(1,),
    cross_attn_levels=(1,),
    num_heads=2,
    head_dim=8,
    cond_dim=32,
    text_dim=32,
    num_groups=4,
    pool_heads=2,
  ),
  'tiny_sr': UNetConfig(
    dim=16,
    channel_mults=(1, 2),
    num_res_blocks=(1, 2),
    attn_levels=(),
    cross_attn_levels=(1,),
    num_heads=2,
    head_dim=8,
    cond_dim=32,
    text_dim=32,
    num_groups=4,
    lowres_cond=True,
    pool_heads=2,
  ),
  # Single-machine base model at 64x64 (T5-base width text).
  'small64': UNetConfig(
    dim=64,
    channel_mults=(1, 2, 4),
    num_res_blocks=2,
    attn_levels=(1, 2),
    cross_attn_levels=(1, 2),
    num_heads=4,
    head_dim=32,
    cond_dim=256,
    text_dim=768,
    num_groups=8,
  ),
  # Imagen's 64x64 base model (~1.6B params), T5-XXL text (4096).
  'base64': UNetConfig(
    dim=512,
    channel_mults=(1, 2, 3, 4),
    num_res_blocks=3,
    attn_levels=(1, 2, 3),
    cross_attn_levels=(1, 2, 3),
    num_heads=16,
    head_dim=64,
    cond_dim=1536,
    text_dim=4096,
    num_groups=32,
    pool_heads=16,
  ),
  # 64 -> 256 super-resolution (~0.7B): attention only at the lowest resolution.
  'sr256': UNetConfig(
    dim=128,
    channel_mults=(1, 2, 4, 8),
    num_res_blocks=(2, 4, 8, 8),
    attn_levels=(3,),
    cross_attn_levels=(3,),
    num_heads=8,
    head_dim=64,
    cond_dim=2048,
    text_dim=4096,
    num_groups=32,
    lowres_cond=True,
  ),
  # 256 -> 1024 super-resolution (~0.7B): no self-attention, cross-attention at the lowest level.
  'sr1024': UNetConfig(
    dim=128,
    channel_mults=(1, 2, 4, 8),
    num_res_blocks=(2, 4, 8, 8),
    attn_levels=(),
    cross_attn_levels=(3,),
    num_heads=8,
    head_dim=64,
    cond_dim=2048,
    text_dim=4096,
    num_groups=32,
    lowres_cond=True,
  ),
}


def config_from_dict(d: Mapping[str, Any]) -> UNetConfig:
  """UNetConfig from a dict or ml_collections.ConfigDict (lists become tuples)."""
  if hasattr(d, 'to_dict'):
    d = d.to_dict()
  known = {f.name for f in dataclasses.fields(UNetConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(
      f'Unknown U-Net config keys {unknown}; valid keys are {sorted(known)}. '
      'Remove them or fix their spelling.'
    )
  fields = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in d.items()}
  return UNetConfig(**fields)


def count_params(model_or_state: Any) -> int:
  """Number of scalars in the `nnx.Param`s of a module or state (abstract shapes work)."""
  if isinstance(model_or_state, nnx.Module):
    tree = nnx.state(model_or_state, nnx.Param)
  elif isinstance(model_or_state, nnx.State):
    tree = model_or_state.filter(nnx.Param)
  else:  # a plain pytree of arrays / ShapeDtypeStructs
    tree = model_or_state
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


class UNet(nnx.Module):
  """Efficient U-Net denoiser: (z_t, logsnr, text) [+ lowres, aug_level] -> [B, H, W, C]."""

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    dtype = layers.as_dtype(c.dtype)
    chans, blocks = c.channels(), c.blocks_per_level()
    width = c.cond_dim  # text tokens are projected to this width
    pinit = layers.ParamInit(rngs.params())
    kw = dict(pinit=pinit, dtype=dtype)
    dropout_rngs = rngs if c.dropout > 0 else None
    norm_kw = dict(num_groups=c.num_groups, dropout=c.dropout, rngs=dropout_rngs, **kw)

    # Conditioning.
    self.logsnr_emb = layers.ScalarEmbedding(c.dim, c.cond_dim, scale=_LOGSNR_SCALE, **kw)
    self.aug_emb = (
      layers.ScalarEmbedding(c.dim, c.cond_dim, scale=_AUG_SCALE, **kw) if c.lowres_cond else None
    )
    self.text_proj = layers.Dense(c.text_dim, width, **kw)
    self.text_norm = layers.LayerNorm(width, **kw)
    self.null_text = pinit.normal((width,), ('embed',), std=1.0)
    self.text_pool = layers.AttentionPool(width, num_heads=c.pool_heads, **kw)
    self.text_pool_proj = layers.Dense(width, c.cond_dim, **kw)

    in_channels = c.image_channels * (2 if c.lowres_cond else 1)
    # The input convolution runs in float32 even in a bfloat16 model: near the clean end
    # (high log-SNR) the noise in z_t is below bfloat16's resolution (8 bits of mantissa) and
    # rounding the input would erase it. It is 3 (6) input channels: its cost is negligible.
    self.input_conv = layers.Conv(in_channels, chans[0], 3, pinit=pinit, dtype=jnp.float32)

    def attn_blocks(prefix: str, suffix: str, level: int, ch: int):
      if level in c.attn_levels:
        text_width = width if c.text_in_self_attn else None
        setattr(
          self,
          f'{prefix}attn{suffix}',
          layers.SelfAttention(
            ch,
            num_heads=c.num_heads,
            head_dim=c.head_dim,
            num_groups=c.num_groups,
            text_width=text_width,
            name=f'{prefix}attn{suffix}',
            **kw,
          ),
        )
      if level in c.cross_attn_levels:
        setattr(
          self,
          f'{prefix}cross{suffix}',
          layers.CrossAttention(
            ch,
            num_heads=c.num_heads,
            head_dim=c.head_dim,
            num_groups=c.num_groups,
            text_width=width,
            name=f'{prefix}cross{suffix}',
            **kw,
          ),
        )

    # Down path.
    for i, ch in enumerate(chans):
      if i > 0:
        setattr(self, f'down_{i}_downsample', layers.Downsample(chans[i - 1], ch, **kw))
      for j in range(blocks[i]):
        setattr(self, f'down_{i}_res_{j}', layers.ResBlock(ch, ch, c.cond_dim, **norm_kw))
        attn_blocks(f'down_{i}_', f'_{j}', i, ch)

    # Middle, with the attention of the lowest level.
    low = c.num_levels - 1
    self.mid_res_0 = layers.ResBlock(chans[low], chans[low], c.cond_dim, **norm_kw)
    attn_blocks('mid_', '', low, chans[low])
    self.mid_res_1 = layers.ResBlock(chans[low], chans[low], c.cond_dim, **norm_kw)

    # Up path.
    for i in reversed(range(c.num_levels)):
      ch = chans[i]
      for j in range(blocks[i]):
        in_ch = 2 * ch if j == 0 else ch
        setattr(self, f'up_{i}_res_{j}', layers.ResBlock(in_ch, ch, c.cond_dim, **norm_kw))
        attn_blocks(f'up_{i}_', f'_{j}', i, ch)
      if i > 0:
        setattr(self, f'up_{i}_upsample', layers.Upsample(ch, chans[i - 1], **kw))

    self.output_norm = layers.GroupNorm(chans[0], c.num_groups, **kw)
    self.output_conv = layers.Conv(chans[0], c.image_channels, 3, zero_init=True, **kw)
    pinit.finalize()  # one PRNG draw for all random params

  # ----------------------------------------------------------------------------------------
  def _run(self, block: nnx.Module, *args, deterministic: bool = True) -> jax.Array:
    """Calls `block(*args)`, under `nnx.remat` when configured."""
    if isinstance(block, layers.ResBlock):
      fn = lambda m, *a: m(*a, deterministic=deterministic)
    else:
      fn = lambda m, *a: m(*a)
    if self.config.remat:
      fn = nnx.remat(fn)
    return fn(block, *args)

  def _attend(self, prefix: str, suffix: str, h, text_tokens, text_lengths) -> jax.Array:
    attn = getattr(self, f'{prefix}attn{suffix}', None)
    if attn is not None:
      if attn.text_kv is not None:
        h = self._run(attn, h, text_tokens, text_lengths)
      else:
        h = self._run(attn, h)
    cross = getattr(self, f'{prefix}cross{suffix}', None)
    if cross is not None:
      h = self._run(cross, h, text_tokens, text_lengths)
    return h

  def _check_inputs(self, x, logsnr, text_embs, text_mask, lowres, aug_level) -> None:
    c = self.config
    if x.ndim != 4 or x.shape[-1] != c.image_channels:
      raise ValueError(f'x must be [B, H, W, {c.image_channels}], got {x.shape}.')
    b, h, w, _ = x.shape
    factor = 2 ** (c.num_levels - 1)
    if h % factor or w % factor:
      raise ValueError(
        f'Image size {h}x{w} must be divisible by {factor} for {c.num_levels} U-Net levels.'
      )
    if logsnr.shape != (b,):
      raise ValueError(f'logsnr must be [B]=[{b}], got {logsnr.shape}.')
    if text_embs.ndim != 3 or text_embs.shape[0] != b or text_embs.shape[2] != c.text_dim:
      raise ValueError(
        f'text_embs must be [B, L, text_dim]=[{b}, L, {c.text_dim}], got {text_embs.shape}; '
        'set UNetConfig.text_dim to the text encoder width.'
      )
    if text_mask.shape != text_embs.shape[:2]:
      raise ValueError(f'text_mask must be [B, L]={text_embs.shape[:2]}, got {text_mask.shape}.')
    if text_embs.shape[1] < 1:
      raise ValueError('text_embs needs at least one token (L >= 1).')
    if c.lowres_cond:
      if lowres is None or aug_level is None:
        raise ValueError('A super-resolution U-Net (lowres_cond=True) needs lowres and aug_level.')
      if lowres.shape != x.shape:
        raise ValueError(
          f'lowres must be upsampled to x.shape={x.shape} by the caller, got {lowres.shape}.'
        )
      if aug_level.shape != (b,):
        raise ValueError(f'aug_level must be [B]=[{b}], got {aug_level.shape}.')
    elif lowres is not None or aug_level is not None:
      raise ValueError('lowres/aug_level given to a U-Net built with lowres_cond=False.')

  def __call__(
    self,
    x: jax.Array,
    logsnr: jax.Array,
    text_embs: jax.Array,
    text_mask: jax.Array,
    *,
    lowres: jax.Array | None = None,
    aug_level: jax.Array | None = None,
    drop_text: jax.Array | None = None,
    deterministic: bool = True,
  ) -> jax.Array:
    """x [B,H,W,C], logsnr [B], text_embs [B,L,text_dim], text_mask [B,L] -> [B,H,W,C] f32."""
    c = self.config
    self._check_inputs(x, logsnr, text_embs, text_mask, lowres, aug_level)
    dtype = layers.as_dtype(c.dtype)
    b, height, width, _ = x.shape
    length = text_embs.shape[1]
    text_mask = text_mask.astype(bool)

    # Text tokens; dropped examples (and examples without any valid token) get the null token.
    drop = ~jnp.any(text_mask, axis=-1)  # [B]
    if drop_text is not None:
      drop = drop | drop_text.astype(bool).reshape(b)
    tokens = self.text_norm(self.text_proj(text_embs))  # [B, L, W]
    null = self.null_text[...].astype(tokens.dtype)
    tokens = jnp.where(drop[:, None, None], null[None, None, :], tokens)
    first_only = jnp.arange(length)[None, :] == 0  # [1, L]
    text_mask = jnp.where(drop[:, None], first_only, text_mask)  # [B, L]
    # Attention sees the valid tokens as a prefix of length text_lengths (what cuDNN's fused
    # kernel takes instead of a mask). Text masks are prefixes already (right-padded captions;
    # a dropped caption keeps only its first token, the null token): the stable sort below is
    # then the identity. Any other mask is made a prefix by moving its valid tokens first,
    # which attention, blind to key order, does not notice.
    text_lengths = jnp.sum(text_mask, axis=-1, dtype=jnp.int32)  # [B], >= 1
    order = jnp.argsort(~text_mask, axis=-1, stable=True)  # [B, L]: valid tokens first
    tokens = jnp.take_along_axis(tokens, order[:, :, None], axis=1)

    # Conditioning vector.
    cond = self.logsnr_emb(logsnr)  # [B, cond_dim]
    cond = cond + self.text_pool_proj(self.text_pool(tokens, text_lengths))
    if self.aug_emb is not None:
      cond = cond + self.aug_emb(aug_level)
    assert cond.shape == (b, c.cond_dim), cond.shape

    h = x if lowres is None else jnp.concatenate([x, lowres.astype(x.dtype)], axis=-1)
    h = self.input_conv(h.astype(jnp.float32)).astype(dtype)  # [B, H, W, ch0]
    chans, blocks = c.channels(), c.blocks_per_level()
    skips = []
    for i in range(c.num_levels):
      if i > 0:
        h = self._run(getattr(self, f'down_{i}_downsample'), h)
      for j in range(blocks[i]):
        h = self._run(getattr(self, f'down_{i}_res_{j}'), h, cond, deterministic=deterministic)
        h = self._attend(f'down_{i}_', f'_{j}', h, tokens, text_lengths)
      assert h.shape == (b, height >> i, width >> i, chans[i]), (i, h.shape)
      skips.append(h)

    h = self._run(self.mid_res_0, h, cond, deterministic=deterministic)
    h = self._attend('mid_', '', h, tokens, text_lengths)
    h = self._run(self.mid_res_1, h, cond, deterministic=deterministic)

    for i in reversed(range(c.num_levels)):
      skip = skips.pop()
      h = jnp.concatenate([h, (skip * _SKIP_SCALE).astype(h.dtype)], axis=-1)
      for j in range(blocks[i]):
        h = self._run(getattr(self, f'up_{i}_res_{j}'), h, cond, deterministic=deterministic)
        h = self._attend(f'up_{i}_', f'_{j}', h, tokens, text_lengths)
      assert h.shape == (b, height >> i, width >> i, chans[i]), (i, h.shape)
      if i > 0:
        h = self._run(getattr(self, f'up_{i}_upsample'), h)

    h = self.output_norm(h, silu=True)
    out = self.output_conv(h.astype(dtype))
    assert out.shape == x.shape, (out.shape, x.shape)
    return out.astype(jnp.float32)
