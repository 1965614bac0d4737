"""Super-resolution stage: 256x256 -> 1024x1024, with noise-conditioning augmentation.

  python train.py --config=configs/sr1024.py --workdir=runs/sr1024
  python train.py --config=configs/sr1024.py:tiny --workdir=/tmp/t_sr1024   # tests

Same recipe as sr256 (see configs/sr256.py), bigger images, no self-attention (sr1024 preset).
"""

from configs import sr256


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':  # noqa: F821
  return sr256.sr_config(arg, stage='sr1024', preset='sr1024', resolution=1024, lowres=256)
