"""GroupNorm, FiLM and SiLU with a hand-written backward pass: the CPU path.

Differentiated by JAX, a GroupNorm with FiLM and SiLU after it makes several passes over its
activation in the backward pass (the group statistics' gradients, then the per-channel
sums of the scale, bias and FiLM gradients, each a reduction of its own), and XLA:CPU runs
each as a memory-bound loop. All of those gradients come from two sums per example and
channel over the pixels, P = sum(g) and Q = sum(g * x_hat), where g is the gradient at the
norm's output (through SiLU) and x_hat the normalised input:

  d film_shift = P,  d film_scale = scale Q + bias P,
  d scale = sum_b (1 + film_scale) Q,  d bias = sum_b (1 + film_scale) P,
  dx = rstd (g a - sum_group(a P) / n - x_hat sum_group(a Q) / n),  a = scale (1 + film_scale),

with sum_group over the channels of x's group and n its pixels times channels. So
`group_norm`'s backward is one reduction pass (P and Q together, x_hat and the SiLU
gradient recomputed on the fly from x and the saved per-group mean and 1/std) and one
elementwise pass (dx). The forward pass is `normalize`, which `layers.GroupNorm` also runs
off the CPU (there JAX differentiates it). Measured on the 2-core AMD EPYC, batch 4, forward
and backward of GroupNorm + FiLM + SiLU: 64x64x64 7.5 -> 4.4 ms, 32x32x128 4.4 -> 1.0 ms,
16x16x256 1.4 -> 0.6 ms; gradients equal to JAX's to float32 rounding (tested).

Used on the CPU backend only (`wanted`): GPUs and TPUs keep XLA's own fusion of the
differentiated graph, which this has not been measured against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from imagen_jax.models.manual_axes import match_varying


def wanted() -> bool:
  return jax.default_backend() == 'cpu'


def _grouped(x: jax.Array, groups: int) -> jax.Array:
  """[B, ..., C] -> float32 [B, ..., G, C / G]."""
  *lead, c = x.shape
  return x.astype(jnp.float32).reshape(*lead, groups, c // groups)


def _reduce_axes(xg: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)  # all but batch and group


def _per_channel(v: jax.Array, ndim: int) -> jax.Array:
  """[B, C] -> [B, 1, ..., 1, C] broadcasting against a rank-`ndim` activation."""
  return v.reshape((v.shape[0],) + (1,) * (ndim - 2) + (v.shape[1],))


def _normalize(x, scale, bias, film_scale, film_shift, groups, eps):
  """float32 (GroupNorm(x) * scale + bias, then FiLM when film_scale is not None), and the
  per-group mean and 1/std [B, 1.., G, 1]."""
  xg = _grouped(x, groups)
  axes = _reduce_axes(xg)
  mean = jnp.mean(xg, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
  rstd = jax.lax.rsqrt(var + eps)
  y = ((xg - mean) * rstd).reshape(x.shape) * scale + bias
  if film_scale is not None:
    y = y * (1 + _per_channel(film_scale, x.ndim)) + _per_channel(film_shift, x.ndim)
  return y, (mean, rstd)


def normalize(x, scale, bias, film_scale=None, film_shift=None, *, groups: int, eps: float):
  """The forward computation of `group_norm` without SiLU, left for JAX to differentiate:
  `layers.GroupNorm`'s path off the CPU (one definition of the forward for both paths)."""
  if film_scale is not None:
    film_scale, film_shift = film_scale.astype(jnp.float32), film_shift.astype(jnp.float32)
  return _normalize(x, scale, bias, film_scale, film_shift, groups, eps)[0]


def _forward(x, scale, bias, film_scale, film_shift, groups, eps, film, silu):
  y, stats = _normalize(
    x, scale, bias, film_scale if film else None, film_shift if film else None, groups, eps
  )
  return (jax.nn.silu(y) if silu else y), stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _group_norm(x, scale, bias, film_scale, film_shift, groups, eps, film, silu):
  return _forward(x, scale, bias, film_scale, film_shift, groups, eps, film, silu)[0]


def _group_norm_fwd(x, scale, bias, film_scale, film_shift, groups, eps, film, silu):
  out, (mean, rstd) = _forward(x, scale, bias, film_scale, film_shift, groups, eps, film, silu)
  return out, (x, scale, bias, film_scale, film_shift, mean, rstd)


def _group_norm_bwd(groups, eps, film, silu, residuals, d_out):
  del eps
  x, scale, bias, film_scale, film_shift, mean, rstd = residuals
  nd = x.ndim
  x_hat = ((_grouped(x, groups) - mean) * rstd).reshape(x.shape)
  one_plus = 1 + _per_channel(film_scale, nd) if film else None
  g = d_out.astype(jnp.float32)
  if silu:  # recompute the pre-activation; d silu(u) = s (1 + u (1 - s)), s = sigmoid(u)
    u = x_hat * scale + bias
    if film:
      u = u * one_plus + _per_channel(film_shift, nd)
    s = jax.nn.sigmoid(u)
    g = g * s * (1 + u * (1 - s))
  pixel_axes = tuple(range(1, nd - 1))
  p = jnp.sum(g, axis=pixel_axes)  # [B, C]
  q = jnp.sum(g * x_hat, axis=pixel_axes)  # [B, C]
  a = scale * (1 + film_scale) if film else jnp.broadcast_to(scale, p.shape)  # [B, C]
  b, c = p.shape
  n = x.size // (b * groups)  # pixels x channels per group
  mean_ap = jnp.sum((a * p).reshape(b, groups, c // groups), axis=-1) / n  # [B, G]
  mean_aq = jnp.sum((a * q).reshape(b, groups, c // groups), axis=-1) / n

  def per_group(v):  # [B, G] -> broadcast against x's channels
    return _per_channel(jnp.repeat(v, c // groups, axis=1), nd)

  rstd_c = per_group(rstd.reshape(b, groups))
  dx = rstd_c * (g * _per_channel(a, nd) - per_group(mean_ap) - x_hat * per_group(mean_aq))
  if film:
    d_scale = jnp.sum((1 + film_scale) * q, axis=0)
    d_bias = jnp.sum((1 + film_scale) * p, axis=0)
    d_film_scale = scale * q + bias * p
    d_film_shift = p
  else:
    d_scale, d_bias = jnp.sum(q, axis=0), jnp.sum(p, axis=0)
    d_film_scale = d_film_shift = jnp.zeros_like(film_scale)
  return (
    dx.astype(x.dtype),
    d_scale.astype(scale.dtype),
    d_bias.astype(bias.dtype),
    d_film_scale.astype(film_scale.dtype),
    d_film_shift.astype(film_shift.dtype),
  )


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  *,
  groups: int,
  eps: float,
  film_scale: jax.Array | None = None,
  film_shift: jax.Array | None = None,
  silu: bool = False,
) -> jax.Array:
  """GroupNorm of x [B, ..., C] over each example's groups of C / groups channels and all
  pixels, then * scale + bias [C], then FiLM (y * (1 + film_scale) + film_shift, [B, C]) when
  given, then SiLU when `silu`; float32 result."""
  film = film_scale is not None
  if film != (film_shift is not None):
    raise ValueError('group_norm: give both film_scale and film_shift, or neither.')
  b, c = x.shape[0], x.shape[-1]
  if not film:  # placeholders with no gradient path; the static `film` flag ignores them
    film_scale = film_shift = jnp.zeros((b, c), jnp.float32)
  return _group_norm(
    *match_varying(  # inside shard_map (manual_axes)
      x,
      scale.astype(jnp.float32),
      bias.astype(jnp.float32),
      film_scale.astype(jnp.float32),
      film_shift.astype(jnp.float32),
    ),
    groups,
    eps,
    film,
    silu,
  )
