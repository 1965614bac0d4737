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
    # The CPU gate (`make cascade`, bench/sr_quality.py): 32 -> 64 px (2x, not the stage's 4x,
    # to train in CPU minutes), so it chains after base64.py:demo (32 px); sr1024:demo is the same.
    # 1,500 steps took 13 min on the shared 2-core CPU (load 2-6); on 64 held-out emoji, DDIM 25
    # steps: PSNR 28.8 dB vs bicubic 20.5 (+8.2 dB), SSIM 0.933 vs 0.891.
    c = common.get_common(stage=stage, preset='tiny_sr', resolution=64, lowres_resolution=32)
    common.use_offline_text(c, max_length=32)
    c.model.dim = 32
    c.data.max_examples = 2048  # held-out images: the OpenMoji entries after these
    c.data.crop_size = 32  # train on 32 px crops (16 px low-res), sample whole 64 px images
    c.diffusion.aug_level_max = 0.3
    c.train.batch_size = 16
    c.train.num_steps = 1500
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.sample_every = 500
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.999
    c.sample.sampler = 'ddim'
    c.sample.guidance = 1.0
    c.sample.thresholding = 'static'
    c.sample.aug_level = 0.02  # sigma 0.06 on the input (linear aug schedule)
    return c
  if variant == 'tiny':
    c = common.get_common(stage=stage, preset='tiny_sr', resolution=8 * scale, lowres_resolution=8)
    common.use_tiny_run(c)
    if stage == 'sr1024':  # the crop path in the smoke tests: 16 of 32 px (4 of 8 low-res)
      c.data.crop_size = c.data.resolution // 2
    return c
  raise ValueError(f"Unknown variant '{arg}' of {stage}; choose '', 'demo' or 'tiny'.")
