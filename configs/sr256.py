"""Super-resolution stage: 64x64 -> 256x256, with noise-conditioning augmentation.

  python train.py --config=configs/sr256.py --workdir=runs/sr256
  python train.py --config=configs/sr256.py:tiny --workdir=/tmp/t_sr        # tests

Trains on random crops of real images with their downsampled versions as the low-res input,
so it trains independently of (and at the same time as) the base stage.
Variants: '' full (~0.7B U-Net, T5-XXL, bfloat16, Adafactor); 'demo' (CPU minutes); 'tiny'.
"""

from configs import common


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':  # noqa: F821
  return sr_config(arg, stage='sr256', preset='sr256', resolution=256, lowres=64)


def sr_config(arg: str, *, stage: str, preset: str, resolution: int, lowres: int):
  """Shared by sr256 and sr1024: the variants differ only in sizes."""
  variant = arg or 'full'
  if variant == 'full':
    c = common.get_common(
      stage=stage, preset=preset, resolution=resolution, lowres_resolution=lowres
    )
    # The unshifted cosine (as Imagen's SR stages): the input already fixes the global layout,
    # so the high-SNR band where detail is made is what to learn. The resolution shift (-2.77
    # log-SNR here, -5.55 for sr1024) put the median training example at logsnr -5.6 on sr1024
    # and the last of 25 sampling calls at -0.33: blurry posterior means.
    c.diffusion.schedule = 'cosine'
    c.model.dtype = 'bfloat16'
    c.model.remat = True
    c.model.text_dim = 4096
    c.text.encoder = 'google/t5-v1_1-xxl'
    c.optim.optimizer = 'adafactor'
    if stage == 'sr1024':  # Imagen: 256 px crops, 64 px low-res crops (no self-attention)
      c.data.crop_size = resolution // 4
    c.train.batch_size = 512
    c.mesh.fsdp = -1
    c.mesh.data = 1
    return c
  scale = resolution // lowres
  if variant == 'demo':
    c = common.get_common(
      stage=stage, preset='tiny_sr', resolution=32 * scale, lowres_resolution=32
    )
    common.use_offline_text(c, max_length=32)
    c.data.max_examples = 256
    c.train.batch_size = 8
    c.train.num_steps = 500
    c.train.log_every = 25
    c.train.checkpoint_every = 250
    c.train.sample_every = 0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.ema_decay = 0.995
    return c
  if variant == 'tiny':
    c = common.get_common(stage=stage, preset='tiny_sr', resolution=8 * scale, lowres_resolution=8)
    common.use_tiny_run(c)
    if stage == 'sr1024':  # the crop path in the smoke tests: 16 of 32 px (4 of 8 low-res)
      c.data.crop_size = c.data.resolution // 2
    return c
  raise ValueError(f"Unknown variant '{arg}' of {stage}; choose '', 'demo' or 'tiny'.")
