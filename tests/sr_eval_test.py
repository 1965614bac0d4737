"""SR evaluation (imagen_jax/evaluate/sr.py): PSNR / SSIM / consistency on known cases, held-out
examples, the comparison grid, and an SR training run whose periodic grid logs the metrics.

skimage is not a dependency; SSIM is checked against analytic cases and an independent float64
reference (scipy.ndimage's Gaussian filter, cropped to the 'valid' window positions, as skimage's
structural_similarity(gaussian_weights=True, use_sample_covariance=False) computes it).
"""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from configs import sr256
from imagen_jax import stage
from imagen_jax.data import preprocess
from imagen_jax.evaluate import sr
from tests.conftest import REPO_ROOT, cli_env


def _photo_like(rng, shape):
  """Smooth random images in [0, 1] with edges (blurred noise plus a bright square)."""
  x = ndimage.gaussian_filter(rng.random(shape), sigma=(0, 2, 2, 0))
  x = (x - x.min()) / (x.max() - x.min())
  x[:, 8:20, 10:22] = 0.9
  return x.astype(np.float32)


# ---- PSNR ----


@pytest.mark.unit
def test_psnr_identical_is_the_cap_and_known_mse_gives_known_db():
  a = np.full((2, 8, 8, 3), 0.5, np.float32)
  # MSE floored at (0.5 / 255)^2: identical images score 20 log10(510) dB, not +inf.
  assert sr.PSNR_CAP_DB == pytest.approx(20 * np.log10(510))
  np.testing.assert_allclose(np.asarray(sr.psnr(a, a)), sr.PSNR_CAP_DB, atol=1e-3)
  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB; MSE 0.0001 -> 40 dB.
  b = a + np.array([0.1, 0.01], np.float32)[:, None, None, None]
  np.testing.assert_allclose(np.asarray(sr.psnr(a, b)), [20.0, 40.0], atol=1e-3)
  # data_range scales the peak: images in [0, 255], MSE 25.5^2 -> 20 dB.
  np.testing.assert_allclose(np.asarray(sr.psnr(a * 255, b * 255, data_range=255.0))[0], 20.0)
  np.testing.assert_allclose(
    np.asarray(sr.psnr(a * 255, a * 255, data_range=255.0)), sr.PSNR_CAP_DB, atol=1e-3
  )


@pytest.mark.unit
def test_a_flat_or_exactly_reproduced_image_keeps_every_mean_finite_and_json_valid():
  # One flat white image among ordinary ones, reproduced exactly by the model and by bicubic:
  # its PSNRs are the cap, not +inf (an inf mean, a NaN gain, `Infinity` in the JSON line), and
  # a near-flat image's consistency PSNR (float32 noise only) is the cap too, not ~150 dB.
  rng = np.random.default_rng(0)
  real = np.clip(rng.normal(0, 0.5, (4, 16, 16, 3)), -1, 1).astype(np.float32)
  real[0] = 1.0
  low = np.asarray(sr.downsample(jnp.asarray(real), 8))
  low = np.round((low + 1) * 127.5) / 127.5 - 1  # the uint8 round trip of the pipeline
  bicubic = np.asarray(stage.upsample_lowres(jnp.asarray(low), resolution=16))
  output = np.clip(bicubic + 0.01 * rng.normal(size=bicubic.shape), -1, 1).astype(np.float32)
  output[0] = 1.0
  metrics = jax.device_get(sr.score(output=output, bicubic=bicubic, real=real, lowres=low))
  for k in sr.METRICS:
    assert np.all(np.isfinite(metrics[k])), (k, metrics[k])
    if 'psnr' in k:
      assert np.all(metrics[k] <= sr.PSNR_CAP_DB + 1e-3), (k, metrics[k])
  assert metrics['psnr'][0] == pytest.approx(sr.PSNR_CAP_DB, abs=1e-3)
  assert metrics['consistency_psnr'][0] == pytest.approx(sr.PSNR_CAP_DB, abs=1e-3)
  summary = sr.summarise(metrics)
  assert all(np.isfinite(v) for v in summary.values()), summary
  assert summary['gain_db'] == pytest.approx(summary['psnr'] - summary['psnr_bicubic'])
  json.dumps(summary, allow_nan=False)


# ---- SSIM ----


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Wang et al. 2004 in float64 through scipy: Gaussian sigma 1.5 truncated at 3.5 sigma (an
  11-tap window), population statistics, mean over the positions where the window fits."""
  c1, c2, pad = 0.01**2, 0.03**2, 5
  out = []
  for x, y in zip(a.astype(np.float64), b.astype(np.float64), strict=True):
    per_channel = []
    for c in range(x.shape[-1]):
      f = lambda v: ndimage.gaussian_filter(v, 1.5, truncate=3.5)[pad:-pad, pad:-pad]
      u, v = x[..., c], y[..., c]
      mu_u, mu_v = f(u), f(v)
      var_u, var_v = f(u * u) - mu_u**2, f(v * v) - mu_v**2
      cov = f(u * v) - mu_u * mu_v
      s = ((2 * mu_u * mu_v + c1) * (2 * cov + c2)) / (
        (mu_u**2 + mu_v**2 + c1) * (var_u + var_v + c2)
      )
      per_channel.append(s.mean())
    out.append(np.mean(per_channel))
  return np.asarray(out)


@pytest.mark.unit
def test_ssim_identical_is_one_and_constant_images_have_the_luminance_formula():
  rng = np.random.default_rng(0)
  x = _photo_like(rng, (2, 24, 24, 3))
  np.testing.assert_allclose(np.asarray(sr.ssim(x, x)), 1.0, atol=1e-5)
  # Constant images p, q: no variance, so SSIM = (2pq + C1) / (p^2 + q^2 + C1).
  p, q, c1 = 0.3, 0.6, 0.01**2
  a, b = np.full((1, 16, 16, 3), p, np.float32), np.full((1, 16, 16, 3), q, np.float32)
  want = (2 * p * q + c1) / (p**2 + q**2 + c1)
  np.testing.assert_allclose(np.asarray(sr.ssim(a, b)), [want], rtol=1e-5)


@pytest.mark.unit
def test_ssim_is_symmetric_below_one_for_noise_and_matches_a_float64_reference():
  rng = np.random.default_rng(1)
  x = _photo_like(rng, (3, 32, 32, 3))
  noisy = np.clip(x + rng.normal(0, [[[[0.02]]], [[[0.1]]], [[[0.3]]]], x.shape), 0, 1)
  noisy = noisy.astype(np.float32)
  got = np.asarray(sr.ssim(x, noisy))
  np.testing.assert_allclose(got, np.asarray(sr.ssim(noisy, x)), atol=1e-6)
  assert np.all(got < 1.0) and got[0] > got[1] > got[2] > 0.0  # more noise, lower SSIM
  np.testing.assert_allclose(got, _ssim_reference(x, noisy), atol=2e-5)
  # The Gaussian window is the normalised 11-tap sigma-1.5 one.
  w = sr.gaussian_window()
  assert w.shape == (11,) and abs(w.sum() - 1) < 1e-6 and w.argmax() == 5


@pytest.mark.unit
def test_ssim_of_images_smaller_than_the_window_uses_a_smaller_window():
  rng = np.random.default_rng(2)
  x = rng.random((1, 6, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(sr.ssim(x, x)), 1.0, atol=1e-5)
  assert float(sr.ssim(x, 1 - x)[0]) < 0.5


# ---- consistency ----


@pytest.mark.unit
def test_consistency_psnr_of_the_real_image_against_the_pipelines_lowres_is_high():
  """The pipeline makes the input with Pillow's antialiased bicubic on uint8; downsampling the
  real image back with jax's antialiased bicubic must agree closely (the metric's ceiling),
  while an image shifted by 0.1 scores exactly 20 dB."""
  rng = np.random.default_rng(3)
  real = (_photo_like(rng, (2, 32, 32, 3)) * 255).round().astype(np.uint8)
  lowres = np.stack(
    [np.asarray(Image.fromarray(im).resize((16, 16), Image.Resampling.BICUBIC)) for im in real]
  )
  real01, low01 = real / 255.0, lowres / 255.0
  ceiling = np.asarray(sr.consistency_psnr(real01, low01))
  assert np.all(ceiling > 40.0), ceiling
  flat = np.full((1, 32, 32, 3), 0.5, np.float32)
  np.testing.assert_allclose(
    np.asarray(sr.consistency_psnr(flat, flat[:, :16, :16] + 0.1)), 20.0, atol=1e-4
  )
  # A blurrier candidate (bicubic of the input) is less consistent than the real image.
  bicubic = jnp.clip(jax.image.resize(low01, real01.shape, 'bicubic'), 0, 1)
  assert np.all(np.asarray(sr.consistency_psnr(bicubic, low01)) < ceiling)


@pytest.mark.unit
def test_score_and_summary_of_a_perfect_output():
  rng = np.random.default_rng(4)
  real = _photo_like(rng, (2, 32, 32, 3)) * 2 - 1
  lowres = np.asarray(sr.downsample(jnp.asarray(real), 8))
  bicubic = np.asarray(stage.upsample_lowres(jnp.asarray(lowres), resolution=32))
  metrics = jax.device_get(sr.score(output=real, bicubic=bicubic, real=real, lowres=lowres))
  assert set(metrics) == set(sr.METRICS)
  np.testing.assert_allclose(metrics['psnr'], sr.PSNR_CAP_DB, atol=1e-3)
  assert np.allclose(metrics['ssim'], 1.0, atol=1e-5)
  assert np.all(metrics['psnr_bicubic'] < 40) and np.all(metrics['ssim_bicubic'] < 1)
  summary = sr.summarise(metrics)
  gain = sr.PSNR_CAP_DB - float(np.mean(metrics['psnr_bicubic']))
  assert summary['gain_db'] == pytest.approx(gain, abs=1e-3)
  assert summary['psnr_bicubic'] == pytest.approx(float(np.mean(metrics['psnr_bicubic'])))


# ---- grid and held-out examples ----


@pytest.mark.unit
def test_comparison_grid_rows_are_input_bicubic_output_real():
  lowres = -np.ones((2, 4, 4, 3), np.float32)
  lowres[1] = 1.0
  tiles = [np.full((2, 8, 8, 3), v, np.float32) for v in (-0.5, 0.0, 0.5)]
  grid = sr.comparison_grid(lowres=lowres, bicubic=tiles[0], output=tiles[1], real=tiles[2], pad=1)
  assert grid.shape == (2 * 9 + 1, 4 * 9 + 1, 3)
  first_row = [grid[1 + 4, 1 + 9 * c + 4, 0] for c in range(4)]
  assert first_row == [0, 64, 128, 191]  # -1, -0.5, 0, 0.5 in uint8
  assert grid[10 + 4, 1 + 4, 0] == 255  # second image's input is white


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  root = tmp_path_factory.mktemp('sr_eval')
  return {'root': root, 'text_cache': root / 'embeddings', 'render_cache': root / 'openmoji'}


def _tiny_config(shared):
  config = sr256.get_config('tiny')
  config.data.render_cache_dir = str(shared['render_cache'])
  config.text.cache_dir = str(shared['text_cache'])
  return config


@pytest.mark.unit
def test_openmoji_heldout_examples_follow_the_training_subset_and_are_fixed(shared):
  from imagen_jax.data import openmoji

  config = _tiny_config(shared)
  first = sr.heldout_examples(config, 3)
  again = sr.heldout_examples(config, 3)
  assert first.heldout and 'after the training subset' in first.origin
  np.testing.assert_array_equal(first.images, again.images)
  assert first.images.shape == (3, 32, 32, 3) and first.lowres.shape == (3, 8, 8, 3)
  trained = {caption for _, _, caption in openmoji.emoji_catalog()[: config.data.max_examples]}
  assert not set(first.captions) & trained
  # The low-res input is the pipeline's: Pillow bicubic of the high-res image.
  want = Image.fromarray(first.images[0]).resize((8, 8), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(first.lowres[0], np.asarray(want))


@pytest.mark.unit
def test_training_examples_for_sr_evaluation_span_the_whole_source(tmp_path, caplog):
  # A folder (no held-out split): the examples were the first `num` usable of 4 * num evenly
  # spaced candidates, so all from the first quarter of the source.
  for i in range(40):
    Image.new('RGB', (32, 32), (6 * i, 0, 0)).save(tmp_path / f'{i:02d}.png')
    (tmp_path / f'{i:02d}.txt').write_text(f'image {i:02d}')
  (tmp_path / '39.png').write_bytes(b'not an image')  # unusable: a stand-in takes its place
  config = sr256.get_config('tiny')
  config.data.source, config.data.path = 'folder', str(tmp_path)
  config.data.max_skip_fraction, config.data.max_examples = 0.5, 0
  held = sr.heldout_examples(config, 4)
  assert not held.heldout and 'training examples' in held.origin
  assert held.captions == ['image 00', 'image 13', 'image 26', 'image 03']
  assert sr._spaced_order(40, 4)[:4] == [0, 13, 26, 39]
  assert sorted(sr._spaced_order(5, 4)) == [0, 1, 2, 3, 4]


# ---- an SR training run with periodic grids ----


@pytest.fixture(scope='module')
def sr_tiny(shared):
  """A 2-step tiny SR run with an in-training grid at step 2: (workdir, train.py's process)."""
  workdir = shared['root'] / 'sr_tiny'
  cmd = [
    sys.executable,
    'train.py',
    '--config=configs/sr256.py:tiny',
    f'--workdir={workdir}',
    f'--config.text.cache_dir={shared["text_cache"]}',
    f'--config.data.render_cache_dir={shared["render_cache"]}',
    '--config.train.num_steps=2',
    '--config.train.sample_every=2',
    '--config.sample.steps=2',
  ]
  proc = subprocess.run(
    cmd, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


@pytest.mark.smoke
@pytest.mark.xdist_group('train')
def test_sr_training_logs_grid_and_metrics_of_heldout_images(shared, sr_tiny):
  workdir, proc = sr_tiny
  assert 'In-training sample grid at step 2: ' in proc.stderr  # with its compile's origin
  png = workdir / 'samples' / 'step_00000002.png'
  grid = np.asarray(Image.open(png))
  n = sr256.get_config('tiny').train.num_sample_prompts
  assert grid.shape == (n * (32 + 2) + 2, 4 * (32 + 2) + 2, 3)
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  sr_rows = [r for r in rows if 'sr/psnr' in r]
  assert [r['step'] for r in sr_rows] == [2]
  row = sr_rows[0]
  for key in ('psnr', 'ssim', 'psnr_bicubic', 'ssim_bicubic', 'consistency_psnr', 'gain_db'):
    assert np.isfinite(row[f'sr/{key}']), (key, row)
  assert -1.0 <= row['sr/ssim'] <= 1.0 and 0.0 < row['sr/ssim_bicubic'] < 1.0
  assert row['sr/gain_db'] == pytest.approx(row['sr/psnr'] - row['sr/psnr_bicubic'])
  # The logged bicubic baseline equals one computed here from the same held-out examples.
  heldout = sr.heldout_examples(_tiny_config(shared), n)
  lowres, real = preprocess.to_float(heldout.lowres), preprocess.to_float(heldout.images)
  bicubic = stage.upsample_lowres(jnp.asarray(lowres), resolution=32)
  want = float(np.mean(np.asarray(sr.psnr(sr.to_unit(bicubic), sr.to_unit(real)))))
  assert row['sr/psnr_bicubic'] == pytest.approx(want, abs=1e-3)
  # The grid's last column is the real image, the second the bicubic upsampling.
  np.testing.assert_array_equal(grid[2 : 2 + 32, 2 + 3 * 34 : 2 + 3 * 34 + 32], heldout.images[0])


@pytest.mark.smoke
@pytest.mark.xdist_group('train')
def test_sr_quality_bench_prints_its_line_before_the_grid(sr_tiny, tmp_path):
  # bench/sr_quality.py on the tiny run: one JSON line, then the comparison grid; a grid path
  # that cannot be written is one error line and exit 2, with the result line already printed.
  workdir, _ = sr_tiny
  args = [sys.executable, 'bench/sr_quality.py', f'--checkpoints={workdir}', '--num=2', '--steps=1']
  run = functools.partial(
    subprocess.run, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=600
  )
  proc = run([*args, f'--grid={tmp_path / "grid.png"}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = json.loads(proc.stdout.strip().splitlines()[-1])
  assert line['resolution'] == '8->32' and np.isfinite(line['gain_db']) and line['heldout']
  assert line['psnr_cap_db'] == round(sr.PSNR_CAP_DB, 2) >= line['psnr_model']
  assert Image.open(tmp_path / 'grid.png').size[0] > 4 * 32
  bad = tmp_path / 'a_file'
  bad.write_text('x')
  proc = run([*args, f'--grid={bad / "grid.png"}'])
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert f'error: cannot write --grid {bad / "grid.png"}' in proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1]).keys() == line.keys()
