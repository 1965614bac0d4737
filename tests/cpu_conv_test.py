"""The CPU convolution path (`imagen_jax.models.cpu_conv`): image pairs side by side give the
plain convolution's values and gradients, and the U-Net's layers take it only where wanted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models import cpu_conv, layers


def _inputs(b, h, w, c_in, c_out, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (b, h, w, c_in), jnp.float32)
  k = jax.random.normal(ks[1], (3, 3, c_in, c_out), jnp.float32) / np.sqrt(9 * c_in)
  dy = jax.random.normal(ks[2], (b, h, w, c_out), jnp.float32)
  return x, k, dy


def _value_and_grads(conv, x, k, dy):
  y, vjp = jax.vjp(conv, x, k)
  return (y, *vjp(dy))


def _plain(x, k):
  return jax.lax.conv_general_dilated(
    x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


@pytest.mark.parametrize(
  'b,h,w,c_in,c_out',
  [
    (2, 5, 7, 3, 4),  # odd width, H != W; one zero column between the pair's images
    (4, 6, 6, 2, 5),  # two pairs
    (6, 3, 2, 4, 1),  # narrow images, one output channel
  ],
)
def test_folded_equals_plain_convolution(b, h, w, c_in, c_out):
  x, k, dy = _inputs(b, h, w, c_in, c_out)
  want = jax.jit(lambda x, k, dy: _value_and_grads(_plain, x, k, dy))(x, k, dy)
  got = jax.jit(lambda x, k, dy: _value_and_grads(cpu_conv.fold_both, x, k, dy))(x, k, dy)
  for name, g, r in zip(('y', 'dx', 'dk'), got, want, strict=True):
    assert g.shape == r.shape, name
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)
  # The images really are side by side: the folded program convolves B/2 images 2 (W + 1) wide.
  hlo = jax.jit(cpu_conv.fold_both).lower(x, k).as_text()
  assert f'tensor<{b // 2}x{h}x{2 * (w + 1)}x{c_in}xf32>' in hlo


@pytest.mark.parametrize('c_in,c_out', [(64, 64), (128, 64), (64, 128)])
def test_model_shapes_fold_only_the_64_channel_side(c_in, c_out):
  """At small64's 64 px shapes, conv_same folds the forward pass when 64 channels come out and
  the input gradient when 64 go in, and matches the plain convolution either way."""
  x, k, dy = _inputs(2, 64, 64, c_in, c_out)
  want = jax.jit(lambda x, k, dy: _value_and_grads(_plain, x, k, dy))(x, k, dy)
  got = jax.jit(lambda x, k, dy: _value_and_grads(cpu_conv.conv_same, x, k, dy))(x, k, dy)
  for name, g, r in zip(('y', 'dx', 'dk'), got, want, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=name)
  # Compiled (dead code gone): a 130-column array exists where a pass is folded.
  forward = jax.jit(cpu_conv.conv_same).lower(x, k).compile().as_text()
  input_grad = jax.jit(lambda x, k, dy: jax.vjp(cpu_conv.conv_same, x, k)[1](dy)[0])
  backward = input_grad.lower(x, k, dy).compile().as_text()
  assert (',64,130,' in forward) == (c_out == 64)
  assert (',64,130,' in backward) == (c_in == 64)


@pytest.fixture
def one_device(monkeypatch):
  """The suite runs on 8 fake CPU devices (conftest); the folded path is for one."""
  assert jax.device_count() > 1
  x, k = jnp.zeros((4, 64, 64, 64), jnp.float32), jnp.zeros((3, 3, 64, 64), jnp.float32)
  assert not cpu_conv.wanted(x, k, 1)  # several devices: the batch may be sharded
  monkeypatch.setattr(jax, 'device_count', lambda: 1)


def test_wanted_only_where_it_helps(one_device):
  x = jnp.zeros((4, 64, 64, 64), jnp.float32)
  k = jnp.zeros((3, 3, 64, 64), jnp.float32)
  assert cpu_conv.wanted(x, k, 1)
  assert cpu_conv.wanted(x[:, :, :40], k, 1)  # 40 wide: 82 folded, two tiles
  assert not cpu_conv.wanted(x[:3], k, 1)  # odd batch: no pairs
  assert not cpu_conv.wanted(x, k, 2)  # stride 2
  assert not cpu_conv.wanted(x[:, :, :32], k, 1)  # 32 wide: 66 columns folded, no gain measured
  assert not cpu_conv.wanted(x[..., :48], k[:, :, :48, :48], 1)  # other channel widths
  assert not cpu_conv.wanted(x, jnp.zeros((5, 5, 64, 64), jnp.float32), 1)  # 5x5 kernel
  assert not cpu_conv.wanted(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), 1)


def test_conv_layer_uses_the_folded_path_and_keeps_its_result(one_device):
  layer = layers.Conv(64, 64, 3, pinit=layers.ParamInit(jax.random.key(0)))
  x, kernel, _ = _inputs(2, 64, 64, 64, 64, seed=1)
  layer.kernel[...] = kernel
  layer.bias[...] = jnp.linspace(-1, 1, 64)
  want = _plain(x, layer.kernel[...]) + layer.bias[...]
  hlo = jax.jit(lambda x: layer(x)).lower(x).as_text()
  assert 'tensor<1x64x130x64xf32>' in hlo
  assert float(jnp.abs(want).max()) > 0.5
  np.testing.assert_allclose(layer(x), want, rtol=1e-4, atol=1e-4)
  # The same layer on a batch of 3 has no pairs: the plain convolution.
  assert 'x130x' not in jax.jit(lambda x: layer(x)).lower(x[:1].repeat(3, 0)).as_text()


def test_kernels_other_than_3x3_are_refused():
  # One zero column between the folded images pads a 3-wide kernel only: a 5x5 read across into
  # the other image and was wrong by 2.3 in values up to 8.6, without a word.
  x = jnp.ones((2, 5, 40, 64), jnp.float32)
  for fn in (cpu_conv.conv_same, cpu_conv.fold_both):
    with pytest.raises(ValueError, match=r'3x3 kernels only, got \(5, 5\)'):
      fn(x, jnp.ones((5, 5, 64, 64), jnp.float32))
