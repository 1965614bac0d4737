"""Known-good CPU recipe: text -> 16x16 handwritten digits (scikit-learn's bundled scans).

  python train.py --config=configs/digits.py --workdir=runs/digits        # 2-core CPU, ~6 min
  python evaluate.py --checkpoints=runs/digits --num=500
  make quality                                                            # both, then the table
  python train.py --config=configs/digits.py:tiny --workdir=/tmp/t        # tests

Variants by argument (never by copying the file):
  ''    the recipe: a 2.4M-parameter U-Net, the offline t5-tiny-random encoder, 1,500 steps of
        batch 32, v objective WITHOUT min-SNR weighting, DPM-Solver++ 25 steps on the
        quadratic grid, guidance 1.5, static thresholding.
  tiny  the same recipe for a handful of steps (tests, CI).

What mattered (measured, see docs/quality.md): min-SNR weighting starves the low-SNR
steps where the prompt decides the class (x0-space weight min(snr, 5) ~ 0 there), so the model
learnt the images and ignored the text; the plain v loss (x0-space weight 1 + snr) learns the
prompt. Dynamic thresholding lifts the black background to grey; static clipping does not.
Guidance trades held-out adherence against FD.
The target is met at training seed 0, not at seeds 1-3 (held-out 0.61-0.73): the untrained
encoder's features of the held-out 'an image of the number {word}' are what fails
(docs/quality.md, "Training seeds"); judge a change here with `bench/quality.py --seeds=0,1,2,3`.
"""

from configs import common


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':  # noqa: F821
  variant = arg or 'recipe'
  if variant not in ('recipe', 'tiny'):
    raise ValueError(f"Unknown variant '{arg}' of digits; choose '' or 'tiny'.")
  c = common.get_common(stage='base64', preset='small64', resolution=16)
  c.data.source = 'digits'
  c.data.split = 'train'
  common.use_offline_text(c, max_length=32)  # digits captions are <= 31 bytes
  common.use_cpu_unet(c)

  c.diffusion.objective = 'v'
  c.diffusion.loss_weighting = 'none'

  c.train.batch_size = 32
  c.train.num_steps = 1500  # 2,500: held-out adherence 0.752, 4,500: 0.700 (docs/quality.md)
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.sample_every = 0
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.ema_decay = 0.995  # never acts: warm-up's (1 + t) / (10 + t) is below it to step 1,790

  c.sample.sampler = 'dpmpp_2m'
  c.sample.steps = 25
  c.sample.guidance = 1.5  # 3.0: held-out adherence +0.03, FD x2.5 (docs/quality.md)
  c.sample.thresholding = 'static'
  if variant == 'tiny':
    c.data.max_examples = 40
    c.train.batch_size = 4
    c.train.num_steps = 4
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.optim.warmup_steps = 2
    c.sample.steps = 4
  return c
