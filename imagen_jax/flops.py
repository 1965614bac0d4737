"""Model FLOPs of the U-Net, counted from its config and input shapes, and MFU / HFU.

Why count by hand: `compiled.cost_analysis()` is no measure of model FLOPs. On GPU it counts
cuDNN convolutions, cuBLAS matmuls and fused attention (custom calls) as zero; on TPU it counts
the recomputation that remat adds. The count here is what the model does:

  convolution  2 * H_out * W_out * k * k * C_in * C_out   (1x1 convolutions included)
  dense        2 * tokens * in * out
  attention    2 * T * S * H * D for q.k and again for p.v (S = all key slots: padded text
               tokens are computed by every kernel we use, so they count)

per example; norms, activations, softmax, FiLM application and the optimizer are left out
(under 3% of the total once channels reach 64; see tests/flops_test.py, which checks the
count against XLA:CPU's cost_analysis, exact for convolutions and dots, with remat off).

Training: model FLOPs per example = 3 x forward (backward = 2 x forward: the gradients with
respect to the activations and to the weights), the usual MFU convention. With remat the
backward pass runs each rematerialised block's forward again, except its last linear op (a
ResBlock's second convolution and 1x1 skip, an attention block's output projection, a down- or
upsampling convolution), whose output no gradient needs: hardware FLOPs = model FLOPs + that
recomputation (HFU; about 46 % of the blocks' forward on these U-Nets, as XLA:CPU's
cost_analysis counts it with remat on and off, tests/flops_test.py). MFU = model FLOPs per
second / peak; HFU = hardware FLOPs per second / peak.
"""

from __future__ import annotations

import dataclasses
import re

from imagen_jax.models.unet import UNetConfig


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Forward FLOPs of one U-Net call on a batch, split by kind; `remat` is the part of the
  rematerialised blocks that the backward pass runs again (what a remat model computes twice)."""

  conv: float
  dense: float
  attention: float
  remat: float

  @property
  def forward(self) -> float:
    return self.conv + self.dense + self.attention

  @property
  def train(self) -> float:
    """Model FLOPs of a training step (forward + backward), the MFU numerator."""
    return 3.0 * self.forward

  def train_hardware(self, remat: bool) -> float:
    """FLOPs a training step executes: model FLOPs plus the remat recomputation."""
    return self.train + (self.remat if remat else 0.0)


def _taps(size: int, k: int, stride: int) -> int:
  """Kernel taps that land inside the image, summed over the outputs of one spatial dimension
  of a 'SAME' convolution on `size` inputs (k * size / stride when padding counts)."""
  out = -(-size // stride)
  pad_lo = max((out - 1) * stride + k - size, 0) // 2
  return sum(sum(1 for t in range(k) if 0 <= o * stride - pad_lo + t < size) for o in range(out))


class _Counter:
  def __init__(self, count_padding: bool):
    self.conv = self.dense = self.attention = self.remat = 0.0
    self.in_block = False
    self.count_padding = count_padding

  def _add(self, kind: str, flops: float, last: bool) -> None:
    """last: a block's last linear op, which the remat backward does not run again (its
    gradients need its input and the output's gradient, never its output)."""
    setattr(self, kind, getattr(self, kind) + flops)
    if self.in_block and not last:
      self.remat += flops

  def conv2d(
    self, in_hw: int, k: int, c_in: int, c_out: int, stride: int = 1, last: bool = False
  ) -> None:
    if self.count_padding:
      taps = k * (-(-in_hw // stride))  # per dimension: every output, every tap
    else:
      taps = _taps(in_hw, k, stride)
    self._add('conv', 2.0 * taps * taps * c_in * c_out, last)

  def linear(self, tokens: int, d_in: int, d_out: int, last: bool = False) -> None:
    self._add('dense', 2.0 * tokens * d_in * d_out, last)

  def attend(self, t: int, s: int, inner: int) -> None:
    self._add('attention', 2.0 * 2.0 * t * s * inner, False)  # q.k and p.v


def unet_flops(
  config: UNetConfig,
  *,
  batch: int,
  resolution: int,
  text_len: int,
  count_padding: bool = True,
) -> FlopCount:
  """Forward FLOPs of `UNet(config)` on x [batch, resolution, resolution, C] with text
  [batch, text_len, text_dim] (mirrors imagen_jax.models.unet.UNet block by block).

  count_padding: a 3x3 'SAME' convolution counts all k * k taps at every output (what the
  kernels compute, the usual convention); False counts only the taps that fall inside the
  image, as XLA's cost_analysis does (fewer at the small resolutions of the lowest levels).
  """
  c = config
  n = _Counter(count_padding)
  width, inner, L = c.cond_dim, c.num_heads * c.head_dim, text_len
  chans, blocks = c.channels(), c.blocks_per_level()

  # Conditioning: log-SNR (and aug level) MLPs, text projection, attention pooling.
  for _ in range(2 if c.lowres_cond else 1):
    n.linear(1, c.dim, c.cond_dim)
    n.linear(1, c.cond_dim, c.cond_dim)
  n.linear(L, c.text_dim, width)  # text_proj
  n.linear(L, width, 2 * width)  # text_pool.kv
  n.attend(1, L, width)  # one learned query
  n.linear(1, width, width)  # text_pool.out
  n.linear(1, width, c.cond_dim)  # text_pool_proj
  n.conv2d(resolution, 3, c.image_channels * (2 if c.lowres_cond else 1), chans[0])

  def res_block(size: int, c_in: int, c_out: int) -> None:
    n.conv2d(size, 3, c_in, c_out)
    n.linear(1, c.cond_dim, 2 * c_out)  # FiLM
    n.conv2d(size, 3, c_out, c_out, last=True)
    if c_in != c_out:
      n.conv2d(size, 1, c_in, c_out, last=True)

  def attention_blocks(level: int, size: int, ch: int) -> None:
    pixels = size * size
    if level in c.attn_levels:
      n.linear(pixels, ch, 3 * inner)
      keys = pixels
      if c.text_in_self_attn:
        n.linear(L, width, 2 * inner)
        keys += L
      n.attend(pixels, keys, inner)
      n.linear(pixels, inner, ch, last=True)
    if level in c.cross_attn_levels:
      n.linear(pixels, ch, inner)
      n.linear(L, width, 2 * inner)
      n.attend(pixels, L, inner)
      n.linear(pixels, inner, ch, last=True)

  n.in_block = True  # every block below runs through UNet._run (remat when configured)
  for i, ch in enumerate(chans):
    size = resolution >> i
    if i > 0:
      n.conv2d(2 * size, 3, chans[i - 1], ch, stride=2, last=True)  # to this level's size
    for _ in range(blocks[i]):
      res_block(size, ch, ch)
      attention_blocks(i, size, ch)
  low = c.num_levels - 1
  size = resolution >> low
  res_block(size, chans[low], chans[low])
  attention_blocks(low, size, chans[low])
  res_block(size, chans[low], chans[low])
  for i in reversed(range(c.num_levels)):
    ch, size = chans[i], resolution >> i
    for j in range(blocks[i]):
      res_block(size, 2 * ch if j == 0 else ch, ch)
      attention_blocks(i, size, ch)
    if i > 0:
      n.conv2d(2 * size, 3, ch, chans[i - 1], last=True)  # nearest x2, then a 3x3 convolution
  n.in_block = False
  n.conv2d(resolution, 3, chans[0], c.image_channels)

  return FlopCount(
    conv=batch * n.conv,
    dense=batch * n.dense,
    attention=batch * n.attention,
    remat=batch * n.remat if c.remat else 0.0,
  )


# Dense (no 2:4 sparsity) bfloat16 peak FLOP/s per device (one jax device) from the vendors'
# spec sheets; NVIDIA's sheets quote "with sparsity" figures, halved here.
#   H100 SXM 1,979 / PCIe 1,513 / NVL 1,671 TFLOPS sparse: NVIDIA H100 Tensor Core GPU datasheet,
#     https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
#   H200 SXM 1,979 / NVL 1,671 sparse: https://www.nvidia.com/en-us/data-center/h200/
#   B200 4.5 PFLOPS sparse per GPU (HGX B200 36 PF / 8): https://www.nvidia.com/en-us/data-center/hgx/
#   A100 312 dense (624 sparse), all SXM4/PCIe variants: NVIDIA A100 datasheet,
#     https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
#   L4 242 sparse: https://www.nvidia.com/en-us/data-center/l4/
#   TPU v4 275, v5e 197, v5p 459, v6e (Trillium) 918 bf16 TFLOPS per chip (one jax device):
#     https://cloud.google.com/tpu/docs/v4 , /v5e , /v5p , /v6e
#   GH200 (Grace Hopper): its Hopper GPU's 1,979 sparse, as H100 SXM:
#     https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/
# GPU rows match when every listed word is a word of jax's `device_kind` (lower case, split at
# anything but letters and digits: an 'RTX A1000' is no 'A100'); the first matching row wins, so
# the more specific rows come first. L4 and the TPUs match the exact
# string (an 'L40S' is no L4). An unlisted device gets None (MFU left out), never a guess.
_GPU_PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
  (('gb200',), None),  # a Grace Blackwell GPU is not an HGX B200 (other clocks): unlisted
  (('gh200',), 989e12),
  (('h100', 'pcie'), 756e12),
  (('h100', 'nvl'), 835e12),
  (('h100',), 989e12),  # 'NVIDIA H100 80GB HBM3' (SXM)
  (('h200', 'nvl'), 835e12),
  (('h200',), 989e12),
  (('b200',), 2250e12),
  (('a100',), 312e12),
)
_EXACT_PEAK_BF16_FLOPS = {
  'nvidia l4': 121e12,
  'tpu v4': 275e12,
  'tpu v5 lite': 197e12,  # v5e
  'tpu v5e': 197e12,
  'tpu v5': 459e12,  # v5p reports 'TPU v5'
  'tpu v5p': 459e12,
  'tpu v6 lite': 918e12,  # v6e (Trillium)
  'tpu v6e': 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Dense bfloat16 peak FLOP/s of one device of this `device_kind`, or None if unknown."""
  kind = ' '.join(device_kind.lower().split())
  if kind in _EXACT_PEAK_BF16_FLOPS:
    return _EXACT_PEAK_BF16_FLOPS[kind]
  if kind.startswith('tpu'):
    return None
  tokens = set(re.split(r'[^a-z0-9]+', kind))
  for words, flops in _GPU_PEAK_BF16_FLOPS:
    if all(w in tokens for w in words):
      return flops  # None for a row that only keeps a device from matching a later one
  return None


def utilization(
  flops_per_step: float, step_seconds: float, num_devices: int, device_kind: str
) -> float | None:
  """flops_per_step / (step_seconds * num_devices * peak), or None for an unknown device."""
  peak = peak_flops(device_kind)
  if peak is None or step_seconds <= 0:
    return None
  return flops_per_step / (step_seconds * num_devices * peak)
