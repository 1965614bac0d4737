"""Super-resolution quality: PSNR, SSIM, consistency with the input, held-out examples, grids.

  psnr(a, b)                  per-image PSNR of [0, 1] images, 10 log10(1 / MSE) dB, capped at
                              PSNR_CAP_DB (~54.15 dB: MSE floored at (0.5 / 255)^2)
  ssim(a, b)                  per-image Gaussian-window SSIM (Wang et al. 2004)
  consistency_psnr(x, low)    PSNR of x downsampled back to the input's size, against the input
  heldout_examples(config, n) fixed (high-res, low-res, caption) examples the stage did not train on
  make_sr_eval_fn(...)        one jit-able fn: sample a batch, score it and the bicubic baseline
  comparison_grid(...)        rows of (input nearest-upsampled | bicubic | output | real)

The metric functions are pure jnp (float32), take [B, H, W, C] images in [0, 1] and return [B].
Training (train_lib, every train.sample_every steps) and bench/sr_quality.py both use them.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax import cascade, images, stage

log = logging.getLogger(__name__)

# Wang et al. 2004: 11x11 circular-symmetric Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# PSNR's MSE floor, as a fraction of data_range^2: an RMS error of half an 8-bit level (an output
# that rounds to the reference's 8-bit image has at most this MSE). Caps every per-image PSNR at
# PSNR_CAP_DB = 20 log10(510) ~ 54.15 dB, so a flat or exactly reproduced image scores the cap,
# not +inf (an inf mean, a NaN gain) or ~150 dB (float32 noise that would dominate a mean).
MSE_FLOOR = (0.5 / 255.0) ** 2
PSNR_CAP_DB = float(10.0 * np.log10(1.0 / MSE_FLOOR))


def to_unit(x: jnp.ndarray) -> jnp.ndarray:
  """Images in [-1, 1] (the model's range) -> [0, 1]."""
  return (jnp.asarray(x, jnp.float32) + 1.0) / 2.0


def psnr(a: jnp.ndarray, b: jnp.ndarray, *, data_range: float = 1.0) -> jnp.ndarray:
  """PSNR = 10 log10(data_range^2 / max(MSE, MSE_FLOOR data_range^2)), MSE over each image's
  pixels and channels: at most PSNR_CAP_DB (~54.15 dB), which identical images score.

  a, b: [B, H, W, C]; returns [B] in dB (NaN where an image holds NaN).
  """
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f'psnr needs equal shapes, got {a.shape} and {b.shape}.')
  mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, MSE_FLOOR * data_range**2))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """The normalised 1-D Gaussian w_i ~ exp(-(i - (size - 1) / 2)^2 / (2 sigma^2)), [size]."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  w = np.exp(-(x**2) / (2.0 * sigma**2))
  return (w / w.sum()).astype(np.float32)


def _filter_valid(x: jnp.ndarray, window: np.ndarray) -> jnp.ndarray:
  """Separable 2-D filtering of [N, H, W, 1] by window (x) window, 'valid' borders."""
  k = len(window)
  dn = ('NHWC', 'HWIO', 'NHWC')
  prec = jax.lax.Precision.HIGHEST
  rows = jnp.asarray(window).reshape(k, 1, 1, 1)
  cols = jnp.asarray(window).reshape(1, k, 1, 1)
  x = jax.lax.conv_general_dilated(x, rows, (1, 1), 'VALID', dimension_numbers=dn, precision=prec)
  return jax.lax.conv_general_dilated(
    x, cols, (1, 1), 'VALID', dimension_numbers=dn, precision=prec
  )


def ssim(
  a: jnp.ndarray,
  b: jnp.ndarray,
  *,
  data_range: float = 1.0,
  window_size: int = SSIM_WINDOW,
  sigma: float = SSIM_SIGMA,
  k1: float = SSIM_K1,
  k2: float = SSIM_K2,
) -> jnp.ndarray:
  """Mean SSIM (Wang et al. 2004) per image, each channel separately, then averaged:

    SSIM(x, y) = (2 mu_x mu_y + C1) (2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)
                 (sigma_x^2 + sigma_y^2 + C2)),   C1 = (K1 L)^2, C2 = (K2 L)^2,
  with local means, variances and covariance weighted by a Gaussian window (11 x 11, sigma 1.5),
  averaged over the window positions inside the image ('valid', as the paper's code and
  skimage's `structural_similarity(gaussian_weights=True)` do). Images smaller than the window
  use the largest odd window that fits. a, b: [B, H, W, C] in [0, data_range]; returns [B].
  """
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f'ssim needs two [B, H, W, C] arrays of one shape, got {a.shape}, {b.shape}.')
  batch, height, width, channels = a.shape
  size = min(window_size, height, width)
  size -= 1 - size % 2  # odd
  window = gaussian_window(size, sigma)

  def planes(x):  # [B, H, W, C] -> [B * C, H, W, 1]
    return x.transpose(0, 3, 1, 2).reshape(batch * channels, height, width, 1)

  x, y = planes(a), planes(b)
  blur = lambda v: _filter_valid(v, window)
  mu_x, mu_y = blur(x), blur(y)
  # Second moments of the values less each plane's mean (shift-invariant; much less float32
  # cancellation in E[v^2] - E[v]^2, so a flat patch gets a variance of 0, not ~1e-8).
  off_x = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  off_y = jnp.mean(y, axis=(1, 2, 3), keepdims=True)
  xc, yc, mxc, myc = x - off_x, y - off_y, mu_x - off_x, mu_y - off_y
  var_x = blur(xc * xc) - mxc**2
  var_y = blur(yc * yc) - myc**2
  cov = blur(xc * yc) - mxc * myc
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
  den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
  per_plane = jnp.mean(num / den, axis=(1, 2, 3))  # [B * C]
  return jnp.mean(per_plane.reshape(batch, channels), axis=1)


def downsample(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """[B, H, W, C] -> [B, size, size, C]: antialiased bicubic, as the data pipeline makes the
  low-res input (Pillow's BICUBIC resize, which widens the kernel by the scale factor)."""
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, size, size, c), method='bicubic', antialias=True)


def consistency_psnr(output: jnp.ndarray, lowres: jnp.ndarray) -> jnp.ndarray:
  """PSNR of the output downsampled back to the input's resolution, against the input.

  output [B, H, W, C], lowres [B, h, w, C], both in [0, 1]; returns [B]. A faithful SR output
  scores high (the real high-res image scores the ceiling: only the 8-bit rounding and the
  resampler's small differences from Pillow's separate it from the input).
  """
  down = jnp.clip(downsample(jnp.asarray(output, jnp.float32), lowres.shape[1]), 0.0, 1.0)
  return psnr(down, lowres)


# ------------------------------------------------------------------------ held-out examples


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Fixed evaluation examples of an SR stage."""

  images: np.ndarray  # [N, R, R, 3] uint8, the real high-res images
  lowres: np.ndarray  # [N, r, r, 3] uint8, their low-res versions (as the pipeline makes them)
  captions: list[str]
  origin: str  # where they come from, in words
  heldout: bool  # False when they are training examples (no held-out data available)


def _options(config: ml_collections.ConfigDict):
  from imagen_jax.data import preprocess

  d = config.data
  return preprocess.PreprocessOptions(
    resolution=int(d.resolution),
    lowres_resolution=int(d.lowres_resolution),
    random_crop=bool(d.random_crop),
    small_images=str(d.small_images),
  )


def _collect(records, options, num: int, seed: int) -> tuple[list, list, list]:
  """Preprocess (record index, image data, caption) triples until `num` are usable; every random
  crop draws from a generator seeded by (seed, index), so the examples are fixed."""
  from imagen_jax.data import preprocess

  his, lows, captions = [], [], []
  for index, data, caption in records:
    try:
      rng = np.random.default_rng([seed, index])
      hi, low = preprocess.load_and_preprocess(data, options, rng)
    except preprocess.SkipExample as e:
      log.info('SR held-out examples: skipping example %d (%s).', index, e)
      continue
    his.append(hi)
    lows.append(low)
    captions.append(caption)
    if len(his) == num:
      break
  return his, lows, captions


def _openmoji_after_training(config, num: int):
  """Records of the OpenMoji emoji that follow the training subset (data.max_examples) in the
  catalog, rendered like the training folder; None when the training run uses them all."""
  from imagen_jax.data import openmoji

  start = int(config.data.get('max_examples', 0))
  catalog = openmoji.emoji_catalog()
  if start <= 0 or start >= len(catalog):
    return None

  def records():
    for index in range(start, len(catalog)):
      _, text, caption = catalog[index]
      image = openmoji.render_emoji(text, int(config.data.resolution))
      if image is not None:
        yield index, image, caption

  return records(), f'openmoji catalog entries from #{start} (after the training subset)'


def _other_split(config, num: int):
  """Records of the 'validation' (else 'test') split of an hf / tfds / digits source."""
  from imagen_jax.data import sources

  d = config.data
  for split in ('validation', 'test'):
    if split == d.get('split', 'train'):
      continue
    data = ml_collections.ConfigDict(d.to_dict())
    data.split = split
    data.max_examples = 0
    try:
      source = sources.build_source(data)
    except sources.DataError as e:
      log.info('SR held-out examples: no %r split (%s).', split, ' '.join(str(e).split())[:200])
      continue
    indices = range(min(len(source), 4 * num + 16))
    records = ((i, r['image'], r['caption']) for i in indices for r in [source[i]])
    return records, f'{source.name} (the {split} split)'
  return None


def _spaced_order(size: int, num: int) -> list[int]:
  """Indices to try, in order: `num` evenly spaced over [0, size), then 3 * num more evenly
  spaced ones as stand-ins for unusable examples. (Trying 4 * num spaced indices in order took
  the first `num` usable of them: the first quarter of the source.)"""
  first = [int(i) for i in np.unique(np.linspace(0, size - 1, min(size, num)).round())]
  more = np.unique(np.linspace(0, size - 1, min(size, 4 * num)).round())
  taken = set(first)
  return first + [int(i) for i in more if int(i) not in taken]


def heldout_examples(config: ml_collections.ConfigDict, num: int) -> HeldOut:
  """`num` fixed examples for SR evaluation, preprocessed exactly like training examples.

  Where they come from, first that applies:
  * data.source='openmoji' with data.max_examples = M > 0 (a subset): the emoji that follow
    the first M in the catalog (code-point order), rendered like the training folder; never
    seen in training.
  * 'digits', 'hf', 'tfds': the first examples of the 'validation' split, else the 'test'
    split (whichever exists and differs from data.split). Note the digits are bicubic
    upsamplings of 8x8 scans, so SR on them is nearly trivial.
  * otherwise (folders, shards, all of OpenMoji): `num` evenly spaced examples of the training
    source itself (`heldout` is then False: these are seen in training; a warning says so).
  Random crops (SR stages) are drawn from a generator seeded by (config.seed, index).
  """
  from imagen_jax.data import sources

  if num < 1:
    raise ValueError(f'num must be >= 1, got {num}.')
  options, seed = _options(config), int(config.seed)
  kind = config.data.source
  found = None
  if kind == 'openmoji':
    found = _openmoji_after_training(config, num)
  elif kind in ('digits', 'hf', 'tfds'):
    found = _other_split(config, num)
  heldout = found is not None
  if found is None:
    source = sources.build_source(config.data)
    order = _spaced_order(len(source), num)
    records = ((i, r['image'], r['caption']) for i in order for r in [source[i]])
    found = records, f'{source.name} (training examples: no held-out data for this source)'
    log.warning(
      'SR evaluation uses %d fixed TRAINING examples of %s: the source has no held-out split.',
      num,
      source.name,
    )
  records, origin = found
  his, lows, captions = _collect(records, options, num, seed)
  if not his:
    raise sources.DataError(f'No usable example for SR evaluation in {origin}.')
  if len(his) < num:
    log.warning('SR evaluation: only %d usable examples in %s (asked %d).', len(his), origin, num)
  return HeldOut(
    images=np.stack(his), lowres=np.stack(lows), captions=captions, origin=origin, heldout=heldout
  )


def text_for(captions: list[str], config: ml_collections.ConfigDict, text_cache=None):
  """(text_embs [N, L, D] float32, text_mask [N, L] bool) of the captions as training saw them:
  from the training cache when it holds them all, else encoded once with the stage's encoder
  (held-out captions are usually not in the cache; this loads the encoder once)."""
  if text_cache is not None and all(c in text_cache for c in captions):
    return text_cache.lookup(captions)
  from imagen_jax import sample_lib

  embs, mask = sample_lib.encode_text(list(captions), config)
  return embs.astype(np.float32), mask


# ------------------------------------------------------------------------------- scoring

METRICS = (
  'psnr',
  'psnr_bicubic',
  'ssim',
  'ssim_bicubic',
  'consistency_psnr',
  'consistency_psnr_bicubic',
  'consistency_psnr_real',
)


def score(
  *, output: jnp.ndarray, bicubic: jnp.ndarray, real: jnp.ndarray, lowres: jnp.ndarray
) -> dict[str, jnp.ndarray]:
  """Per-image metrics [B] (names in METRICS) of the output and of bicubic upsampling against
  the real image, and consistency with the input; every image in [-1, 1]."""
  output, bicubic, real, lowres = map(to_unit, (output, bicubic, real, lowres))
  return {
    'psnr': psnr(output, real),
    'psnr_bicubic': psnr(bicubic, real),
    'ssim': ssim(output, real),
    'ssim_bicubic': ssim(bicubic, real),
    'consistency_psnr': consistency_psnr(output, lowres),
    'consistency_psnr_bicubic': consistency_psnr(bicubic, lowres),
    'consistency_psnr_real': consistency_psnr(real, lowres),
  }


def make_sr_eval_fn(config: ml_collections.ConfigDict, graphdef, options: cascade.SamplingOptions):
  """fn(params, text_embs, text_mask, rng, lowres, real) -> (output, bicubic, metrics).

  lowres [B, r, r, 3] and real [B, R, R, 3] in [-1, 1]; output and bicubic [B, R, R, 3] in
  [-1, 1]; metrics: score(...)'s dict of [B] arrays. Pure: jit it (train_lib pins replicated
  out_shardings). Bicubic is the stage's own upsampling of its input (stage.upsample_lowres).
  """
  if not stage.is_super_resolution(config):
    raise ValueError(f'{config.stage} is not a super-resolution stage.')
  sample_fn = cascade.make_stage_sampler(config, graphdef, options)
  resolution = int(config.data.resolution)

  def eval_fn(params, text_embs, text_mask, rng, lowres, real):
    output = sample_fn(params, text_embs, text_mask, rng, lowres)
    bicubic = stage.upsample_lowres(lowres, resolution=resolution)
    return output, bicubic, score(output=output, bicubic=bicubic, real=real, lowres=lowres)

  return eval_fn


def summarise(metrics: dict[str, np.ndarray]) -> dict[str, float]:
  """Means over images of the per-image metrics, plus gain_db = psnr - psnr_bicubic (finite for
  finite images: every PSNR is capped at PSNR_CAP_DB)."""
  out = {k: float(np.mean(np.asarray(v, np.float64))) for k, v in metrics.items()}
  out['gain_db'] = out['psnr'] - out['psnr_bicubic']
  return out


def nearest_upsample(x: np.ndarray, resolution: int) -> np.ndarray:
  """[B, h, w, C] -> [B, resolution, resolution, C] by pixel repetition (integer factor)."""
  factor = resolution // x.shape[1]
  if factor * x.shape[1] != resolution:
    raise ValueError(f'{x.shape[1]} px does not divide {resolution} px.')
  return np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)


COLUMNS = ('input (nearest)', 'bicubic', 'output', 'real')


def comparison_grid(
  *, lowres: np.ndarray, bicubic: np.ndarray, output: np.ndarray, real: np.ndarray, pad: int = 2
) -> np.ndarray:
  """uint8 grid, one row per image: input nearest-upsampled | bicubic | output | real (COLUMNS).

  Every argument is [B, ., ., 3] in [-1, 1] (lowres at its own size); returns [H', W', 3] uint8.
  """
  resolution = real.shape[1]
  tiles = [nearest_upsample(np.asarray(lowres), resolution), bicubic, output, real]
  tiles = [images.to_uint8(np.asarray(t)) for t in tiles]
  rows = np.stack(tiles, axis=1).reshape(-1, *tiles[0].shape[1:])  # [B * 4, R, R, 3]
  return images.make_grid(rows, columns=len(COLUMNS), pad=pad)
