"""Base stage: text -> 64x64 image.

  python train.py --config=configs/base64.py --workdir=runs/base64
  python train.py --config=configs/base64.py:small --workdir=runs/base64_small
  python train.py --config=configs/base64.py:demo --workdir=runs/demo     # CPU, minutes
  python train.py --config=configs/base64.py:tiny --workdir=/tmp/t        # tests

Variants by argument (never by copying the file):
  ''     full Imagen base: ~1.6B-parameter U-Net, T5-XXL embeddings, bfloat16, FSDP-ready.
  small  the small64 preset (speed comparisons), T5-base.
  demo   a small U-Net on 32 px OpenMoji with the offline t5-tiny-random encoder.
  tiny   the smallest thing that runs end to end (tests, CI).
"""

from configs import common


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':  # noqa: F821
  variant = arg or 'full'
  if variant == 'full':
    c = common.get_common(stage='base64', preset='base64', resolution=64)
    c.model.dtype = 'bfloat16'
    c.model.remat = True
    c.text.encoder = 'google/t5-v1_1-xxl'
    c.model.text_dim = 4096
    c.train.batch_size = 2048
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 10_000
    c.mesh.fsdp = -1
    c.mesh.data = 1
    return c
  if variant == 'small':
    c = common.get_common(stage='base64', preset='small64', resolution=64)
    c.text.encoder = 'google/t5-v1_1-base'
    c.model.text_dim = 768
    c.train.batch_size = 64
    c.optim.lr = 2e-4
    return c
  if variant == 'demo':
    c = common.get_common(stage='base64', preset='small64', resolution=32)
    common.use_cpu_unet(c)
    common.use_offline_text(c, max_length=32)
    c.data.max_examples = 256
    c.train.batch_size = 16
    c.train.num_steps = 800
    c.train.log_every = 25
    c.train.checkpoint_every = 400
    c.train.sample_every = 0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.995
    c.sample.steps = 25
    c.sample.guidance = 3.0
    return c
  if variant == 'tiny':
    c = common.get_common(stage='base64', preset='tiny', resolution=16)
    common.use_tiny_run(c)
    return c
  raise ValueError(f"Unknown variant '{arg}' of base64; choose '', 'small', 'demo' or 'tiny'.")
