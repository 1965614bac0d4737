"""3x3 convolutions of 64-wide images, two images side by side: the CPU path.

XLA:CPU (jaxlib 0.10) hands float32 convolutions to YNNPACK, which splits the output into
tiles and runs one tile per thread. With 64 channels its tiles are 64 output columns wide,
so a 64-wide image with 64 output channels is one tile and runs on one core however many
there are: small64's whole 64 px level, the forward pass and the input gradients that
produce 64 channels. On the 2-core development CPU (batch 4, 64x64 images, 64 -> 64
channels) that is 12 ms of wall and 12 ms of CPU, where the same work 128 columns wide
takes both cores (`python bench/cpu_conv.py` shows it per shape).

`conv_same` puts pairs of images side by side with one zero column after each, so that the
convolution sees [B/2, H, 2 (W + 1), C] (130 columns at W = 64: tiles of 64, 64 and 2) and the
zero column stands in for the 'SAME' padding at each image's edge, then takes the images
back apart. The sums are the same as the plain convolution's (equal to float32 rounding;
tested). The forward pass is folded when the output has 64 channels, the input gradient
when the input has; the kernel gradient, which YNNPACK tiles by channels and which the
wider image only slows down, always runs on the plain layout (a custom VJP). Measured on the
2-core AMD EPYC, batch 4, 64x64x64: forward 11.7 -> 7.6 ms, forward and both gradients
25.4 -> 20.5 ms; small64 b4 at 64 px, interleaved in one process: training step 4-7 %
faster, guided sampling step 9-11 %.

`wanted` keeps it to where it was measured to help: the CPU backend with one device (folding
the batch into the width would cross a batch-sharded mesh axis), float32, stride 1, even
batch, images 33-64 wide (narrower ones stay one tile once folded) and 64 input or output
channels (other widths tile differently: 24, 32, 40, 48 and 96 channels gained nothing).
Training on a CPU of two or more cores runs on two devices (`imagen_jax.cpu_devices`), whose
two streams of operations fill the cores between them, and so does sampling whose first batch
is even; this applies where a process has one device (IMAGEN_JAX_CPU_DEVICES=1, one core, or
sampling an odd first batch). Folded on two devices as well, small64's training step was no
faster (1.43-1.47 s against 1.38-1.44 s, interleaved runs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from imagen_jax.models.manual_axes import match_varying

# Output columns of one YNNPACK convolution tile at 64 channels (measured: bench/cpu_conv.py).
TILE = 64

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def plain(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """The ordinary 'SAME' convolution, NHWC x HWIO (`layers.Conv` off this path)."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME', dimension_numbers=_DIMS)


def _fold(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B/2, H, 2 (W + 1), C]: image pairs side by side, a zero column after
  each."""
  b, h, w, c = x.shape
  x = x.reshape(b // 2, 2, h, w, c)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1), (0, 0)))
  return x.transpose(0, 2, 1, 3, 4).reshape(b // 2, h, 2 * (w + 1), c)


def _unfold(y: jax.Array, w: int) -> jax.Array:
  """Inverse of `_fold` (drops the separator columns)."""
  half, h, _, c = y.shape
  y = y.reshape(half, h, 2, w + 1, c)[:, :, :, :w]
  return y.transpose(0, 2, 1, 3, 4).reshape(2 * half, h, w, c)


def _folded(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _unfold(plain(_fold(x), kernel), x.shape[2])


def _forward(x: jax.Array, kernel: jax.Array, fold: bool) -> jax.Array:
  return _folded(x, kernel) if fold else plain(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, fold_out, fold_in):
  return _forward(x, kernel, fold_out)


def _conv_fwd(x, kernel, fold_out, fold_in):
  return _forward(x, kernel, fold_out), (x, kernel)


def _conv_bwd(fold_out, fold_in, residuals, dy):
  x, kernel = residuals
  (dx,) = jax.vjp(lambda x: _forward(x, kernel, fold_in), x)[1](dy)
  (dk,) = jax.vjp(lambda k: plain(x, k), kernel)[1](dy)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def _check_3x3(kernel: jax.Array) -> None:
  """The one zero column between folded images is the 'SAME' padding of a 3-wide kernel only:
  a wider one read across into the other image (a 5x5 was off by 2.3 in values up to 8.6)."""
  if tuple(kernel.shape[:2]) != (3, 3):
    raise ValueError(f'cpu_conv takes 3x3 kernels only, got {tuple(kernel.shape[:2])}.')


def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' stride-1 3x3 convolution, NHWC x HWIO: the forward pass on image pairs side by
  side where the output has `TILE` channels, the input gradient where the input has."""
  _check_3x3(kernel)
  c_in, c_out = kernel.shape[2:]
  return _conv(*match_varying(x, kernel), c_out == TILE, c_in == TILE)


def fold_both(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_same` with the forward pass and the input gradient both folded, whatever the
  channels (bench/cpu_conv.py; the tests); 3x3 kernels only."""
  _check_3x3(kernel)
  return _conv(*match_varying(x, kernel), True, True)


def wanted(x: jax.Array, kernel: jax.Array, stride: int) -> bool:
  """Whether `conv_same` is the faster way to run this convolution here (see the module
  docstring)."""
  b, _, w, _ = x.shape
  kh, kw, c_in, c_out = kernel.shape
  return (
    stride == 1
    and kh == kw == 3  # one separator column is the padding of a 3-wide kernel
    and b % 2 == 0
    and TILE // 2 < w <= TILE  # one tile wide, two once folded
    and TILE in (c_in, c_out)
    and x.dtype == jnp.float32
    and kernel.dtype == jnp.float32
    and jax.default_backend() == 'cpu'
    and jax.device_count() == 1
  )
