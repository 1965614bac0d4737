"""The CPU GroupNorm path (`imagen_jax.models.cpu_norm`): its hand-written backward pass gives
JAX's gradients of the plain GroupNorm + FiLM + SiLU, and `layers.GroupNorm` gives the same
result on both paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.models import cpu_norm, layers


def _reference(x, scale, bias, film_scale, film_shift, *, groups, eps, silu):
  """GroupNorm + FiLM + SiLU written plainly, differentiated by JAX."""
  b, c = x.shape[0], x.shape[-1]
  xg = x.astype(jnp.float32).reshape(b, -1, groups, c // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
  y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias
  if film_scale is not None:
    shape = (b,) + (1,) * (x.ndim - 2) + (c,)
    y = y * (1 + film_scale.reshape(shape)) + film_shift.reshape(shape)
  return jax.nn.silu(y) if silu else y


def _inputs(shape, seed=0, dtype=jnp.float32):
  b, c = shape[0], shape[-1]
  ks = jax.random.split(jax.random.key(seed), 6)
  x = (jax.random.normal(ks[0], shape) * 3 + 1).astype(dtype)  # mean and scale far from 0, 1
  scale = 1 + 0.3 * jax.random.normal(ks[1], (c,))
  bias = 0.3 * jax.random.normal(ks[2], (c,))
  film_scale = 0.3 * jax.random.normal(ks[3], (b, c))
  film_shift = 0.3 * jax.random.normal(ks[4], (b, c))
  d_out = jax.random.normal(ks[5], shape)
  return x, scale, bias, film_scale, film_shift, d_out


@pytest.mark.parametrize('film', [False, True])
@pytest.mark.parametrize('silu', [False, True])
@pytest.mark.parametrize('shape,groups', [((3, 5, 4, 12), 4), ((2, 7, 8), 2), ((2, 3, 3, 6), 6)])
def test_values_and_gradients_match_jax(shape, groups, film, silu):
  x, scale, bias, fs, fb, d_out = _inputs(shape)
  fs, fb = (fs, fb) if film else (None, None)
  kw = dict(groups=groups, eps=1e-5, silu=silu)

  def vjp(fn):
    def run(x, scale, bias, fs, fb):
      y, pull = jax.vjp(lambda *a: fn(*a, **kw), x, scale, bias, fs, fb)
      return y, pull(d_out)

    return jax.jit(run)(x, scale, bias, fs, fb)

  y_ref, g_ref = vjp(_reference)
  y, g = vjp(
    lambda x, s, b, fs, fb, **kw: cpu_norm.group_norm(x, s, b, film_scale=fs, film_shift=fb, **kw)
  )
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for name, got, want in zip(
    ('x', 'scale', 'bias', 'film_scale', 'film_shift'), g, g_ref, strict=True
  ):
    if want is None:
      assert got is None, name
      continue
    scale_of = float(jnp.max(jnp.abs(want))) + 1e-6
    np.testing.assert_allclose(got / scale_of, want / scale_of, rtol=0, atol=2e-5, err_msg=name)


def test_bfloat16_input_keeps_its_dtype_in_the_gradient():
  x, scale, bias, fs, fb, d_out = _inputs((2, 4, 4, 8), dtype=jnp.bfloat16)
  y, pull = jax.vjp(lambda x: cpu_norm.group_norm(x, scale, bias, groups=2, eps=1e-5, silu=True), x)
  assert y.dtype == jnp.float32
  (dx,) = pull(d_out)
  assert dx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dx.astype(jnp.float32))))


def test_film_needs_both_halves():
  x, scale, bias, fs, _, _ = _inputs((2, 4, 4, 8))
  with pytest.raises(ValueError, match='film_scale and film_shift'):
    cpu_norm.group_norm(x, scale, bias, groups=2, eps=1e-5, film_scale=fs)


@pytest.mark.parametrize('film', [False, True])
def test_group_norm_layer_same_on_both_paths(monkeypatch, film):
  """layers.GroupNorm on CPU (cpu_norm) and on the accelerators' path (plain JAX, with SiLU
  after the cast) agree in value and in every gradient, parameters included."""
  x, _, _, fs, fb, d_out = _inputs((2, 6, 6, 16), seed=3)
  layer = layers.GroupNorm(16, 4, pinit=layers.ParamInit(jax.random.key(0)))
  layer.scale[...] = 1 + 0.2 * jax.random.normal(jax.random.key(1), (16,))
  layer.bias[...] = 0.2 * jax.random.normal(jax.random.key(2), (16,))
  film_kw = dict(film_scale=fs, film_shift=fb) if film else {}

  def value_and_grads():
    graphdef, params = nnx.split(layer)

    def loss(params, x, film_kw):
      y = nnx.merge(graphdef, params)(x, silu=True, **film_kw)
      return jnp.sum(y * d_out)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(params, x, film_kw)

  assert cpu_norm.wanted()  # the suite runs on CPU
  cpu = value_and_grads()
  monkeypatch.setattr(cpu_norm, 'wanted', lambda: False)
  plain = value_and_grads()
  for got, want in zip(jax.tree.leaves(cpu), jax.tree.leaves(plain), strict=True):
    scale_of = float(jnp.max(jnp.abs(want))) + 1e-6
    np.testing.assert_allclose(got / scale_of, want / scale_of, rtol=0, atol=2e-5)
