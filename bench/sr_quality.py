"""Does the SR stage beat bicubic? PSNR / SSIM on held-out images, one JSON line (train-free).

  python bench/sr_quality.py --checkpoints runs/sr_demo                 # the gate (make cascade)
  python bench/sr_quality.py --checkpoints runs/sr_demo --grid docs/sr_grid.png
  python bench/sr_quality.py --checkpoints runs/sr_demo@1000 --aug_level 0.1 --sampler heun

Restores the run's EMA params (RUN or RUN@STEP), takes --num fixed held-out examples
(imagen_jax.evaluate.sr.heldout_examples: for the OpenMoji demo, the emoji that follow the
training subset in the catalog, never trained on), samples each from its low-res version with
the run's sampling settings (or the flags' overrides), and prints ONE JSON line:

  psnr_model, psnr_bicubic, gain_db  mean PSNR (dB, [0, 1] images) of the output and of bicubic
                                     upsampling against the real image, and their difference;
                                     each image's PSNR is capped at psnr_cap_db (~54.15 dB: MSE
                                     floored at (0.5/255)^2), so a flat or exact one stays finite
  ssim_model, ssim_bicubic           mean Gaussian-window SSIM (Wang et al. 2004)
  consistency_psnr                   the output downsampled back against the input (the
                                     real image's own value, consistency_psnr_real, is the ceiling)
  num_images, steps, sampler, grid, aug_level, guidance, step, seconds (sampling + scoring),
  heldout (True when the images were never trained on), gate_met (gain_db >= 1.5)

A value that is not finite (a model whose output holds NaN) is written as null.

--grid also writes a PNG: one row per image, input (nearest) | bicubic | output | real. An
existing file there is refused before the sampling unless --overwrite is given.
"""

import json
import math
import pathlib
import sys
import time

from absl import app, flags

from imagen_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoints', None, 'SR run folder (RUN or RUN@STEP).', required=True)
flags.DEFINE_integer('num', 64, 'Held-out images to score.')
flags.DEFINE_integer('batch_size', 16, 'Images sampled per call.')
flags.DEFINE_integer(
  'seed', 0, 'Noise seed (image i draws from fold_in(fold_in(key(seed), i), 0)).'
)
flags.DEFINE_string('sampler', None, "Override the run's sample.sampler.")
flags.DEFINE_integer('steps', None, "Override the run's sample.steps.")
flags.DEFINE_string('sample_grid', None, "Override the run's sample.grid (logsnr spacing).")
flags.DEFINE_float('aug_level', None, "Override the run's sample.aug_level.")
flags.DEFINE_float('guidance', None, "Override the run's sample.guidance.")
flags.DEFINE_string('thresholding', None, "Override the run's sample.thresholding.")
flags.DEFINE_string('grid', None, 'Also write the comparison grid PNG here.')
flags.DEFINE_integer('grid_rows', 8, 'Images (rows) in the --grid PNG.')
flags.DEFINE_integer('grid_scale', 2, 'Nearest-neighbour magnification of the --grid PNG.')
flags.DEFINE_bool('overwrite', False, 'Replace an existing --grid PNG.')

GATE_DB = 1.5


def _not_sr(run: str, stage_name) -> str:
  return (
    f'{run} is a {stage_name} run, not a super-resolution stage: give --checkpoints an SR run '
    '(e.g. one trained with configs/sr256.py).'
  )


def evaluate(
  run: str,
  *,
  num: int,
  batch_size: int = 16,
  seed: int = 0,
  overrides: dict | None = None,
  grid_rows: int = 0,
) -> tuple[dict, dict]:
  """(the JSON summary, arrays for the grid) of one SR run on `num` held-out images."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from imagen_jax import cascade, checkpoints, sample_lib, stage
  from imagen_jax.data import preprocess
  from imagen_jax.evaluate import sr

  saved = checkpoints.peek_config(run)  # the saved config, read before the (long) restore
  try:
    not_sr = saved is not None and not stage.is_super_resolution(saved)
  except (AttributeError, KeyError, TypeError, ValueError):  # unverified: the restore checks it
    not_sr = False
  if not_sr:
    raise ValueError(_not_sr(run, saved.get('stage')))
  st = sample_lib.restore_stage(run, overrides or {}, True)
  if not stage.is_super_resolution(st.config):
    raise ValueError(_not_sr(run, st.config.stage))
  start = time.perf_counter()
  heldout = sr.heldout_examples(st.config, num)
  text_embs, text_mask = sr.text_for(heldout.captions, st.config)
  lowres, real = preprocess.to_float(heldout.lowres), preprocess.to_float(heldout.images)
  eval_fn = jax.jit(sr.make_sr_eval_fn(st.config, st.graphdef, st.options))
  per_image: dict[str, list] = {}
  kept = {'lowres': [], 'bicubic': [], 'output': [], 'real': []}
  n = len(heldout.captions)
  for lo in range(0, n, batch_size):
    hi = min(n, lo + batch_size)
    pad = batch_size - (hi - lo)  # one compiled shape: the last batch is padded, then cut
    args = [
      jnp.asarray(np.concatenate([a[lo:hi]] + [a[hi - 1 : hi]] * pad))
      for a in (text_embs, text_mask, lowres, real)
    ]
    keys = jnp.asarray(cascade.image_keys(seed, range(lo, lo + batch_size)))  # image i's noise
    output, bicubic, metrics = jax.device_get(eval_fn(st.params, *args[:2], keys, *args[2:]))
    for k, v in metrics.items():
      per_image.setdefault(k, []).extend(np.asarray(v)[: hi - lo].tolist())
    if lo < grid_rows:
      m = min(hi, grid_rows) - lo
      kept['lowres'].append(lowres[lo : lo + m])
      kept['real'].append(real[lo : lo + m])
      kept['bicubic'].append(np.asarray(bicubic)[:m])
      kept['output'].append(np.asarray(output)[:m])
  seconds = time.perf_counter() - start
  summary = sr.summarise({k: np.asarray(v) for k, v in per_image.items()})
  opts = st.options
  out = {
    'psnr_model': round(summary['psnr'], 3),
    'psnr_cap_db': round(sr.PSNR_CAP_DB, 2),
    'psnr_bicubic': round(summary['psnr_bicubic'], 3),
    'gain_db': round(summary['gain_db'], 3),
    'ssim_model': round(summary['ssim'], 4),
    'ssim_bicubic': round(summary['ssim_bicubic'], 4),
    'consistency_psnr': round(summary['consistency_psnr'], 3),
    'consistency_psnr_bicubic': round(summary['consistency_psnr_bicubic'], 3),
    'consistency_psnr_real': round(summary['consistency_psnr_real'], 3),
    'num_images': n,
    'steps': opts.steps,
    'sampler': opts.sampler,
    'grid': getattr(opts, 'spacing', getattr(opts, 'grid', 'quad')),
    'aug_level': opts.aug_level,
    'guidance': opts.guidance,
    'thresholding': opts.thresholding,
    'resolution': f'{st.config.data.lowres_resolution}->{st.config.data.resolution}',
    'step': st.step,
    'heldout': heldout.heldout,
    'seconds': round(seconds, 1),
  }
  out['gate_met'] = bool(heldout.heldout and summary['gain_db'] >= GATE_DB)  # unrounded
  arrays = {k: np.concatenate(v) for k, v in kept.items() if v}
  print(f'held-out images: {heldout.origin}', file=sys.stderr)
  return out, arrays


def write_grid(arrays: dict, path: str, *, scale: int = 1) -> None:
  import numpy as np

  from imagen_jax import images
  from imagen_jax.evaluate import sr

  grid = sr.comparison_grid(**arrays)
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  images.save_png(grid, path, overwrite=True)
  print(f'grid: {path} (columns: {", ".join(sr.COLUMNS)})', file=sys.stderr)


def main(argv) -> None:
  del argv
  for name in ('num', 'batch_size', 'grid_rows', 'grid_scale'):
    if getattr(FLAGS, name) < 1:
      cli.fail(f'--{name} must be a positive integer, got {getattr(FLAGS, name)}.')
  if FLAGS.grid:  # before the sampling
    cli.check_output_png('--grid', FLAGS.grid, FLAGS.overwrite)
  from imagen_jax import sample_lib

  if not 0 <= FLAGS.seed < sample_lib.SEEDS:  # seed s and s + 2**32 drew the same noise
    cli.fail(
      f'--seed must be in [0, {sample_lib.SEEDS}) (a JAX key takes 32 bits), got {FLAGS.seed}.'
    )
  overrides = {
    'sampler': FLAGS.sampler,
    'steps': FLAGS.steps,
    'grid': FLAGS.sample_grid,
    'aug_level': FLAGS.aug_level,
    'guidance': FLAGS.guidance,
    'thresholding': FLAGS.thresholding,
  }
  try:
    out, arrays = evaluate(
      FLAGS.checkpoints,
      num=FLAGS.num,
      batch_size=FLAGS.batch_size,
      seed=FLAGS.seed,
      overrides={k: v for k, v in overrides.items() if v is not None},
      grid_rows=FLAGS.grid_rows if FLAGS.grid else 0,
    )
  except ValueError as e:  # SampleError, DataError: a bad run folder, step or setting
    cli.fail(' '.join(str(e).split()))
  out = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}
  print(json.dumps(out, allow_nan=False), flush=True)  # first: a grid write error keeps the line
  if FLAGS.grid:
    try:
      write_grid(arrays, FLAGS.grid, scale=FLAGS.grid_scale)
    except OSError as e:
      cli.fail(f'cannot write --grid {FLAGS.grid}: {e.strerror or e}.')


if __name__ == '__main__':
  app.run(main)
