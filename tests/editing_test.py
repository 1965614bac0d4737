"""Editing: image-to-image and inpainting in the samplers against the Gaussian mixture's exact
denoiser, the same through real (tiny, untrained) U-Net stages, and the image / mask handling
of imagen_jax.editing. The CLI (upscaling, every mode, bad inputs) is in sample_test.py."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import base64 as base_cfg
from configs import sr256 as sr_cfg
from imagen_jax import cascade, editing, stage
from imagen_jax.diffusion import gaussian, samplers, schedules
from tests.diffusion_test import (
  MIX_MEANS,
  MIX_STDS,
  MIX_WEIGHTS,
  mixture_denoiser,
  mixture_stats,
)

pytestmark = pytest.mark.unit

N = 4000  # samples of the 2-D mixture per run


def grid(steps: int) -> jnp.ndarray:
  return schedules.logsnr_grid(schedules.get_schedule('cosine'), steps=steps)


def mixture_data(n: int = N, seed: int = 0) -> np.ndarray:
  """n draws of the mixture [n, 2]: plausible clean images to edit."""
  rng = np.random.default_rng(seed)
  k = rng.choice(3, size=n, p=MIX_WEIGHTS)
  return (MIX_MEANS[k] + MIX_STDS[k, None] * rng.normal(size=(n, 2))).astype(np.float32)


# ------------------------------------------------------------------------- image-to-image


def test_start_index():
  assert samplers.start_index(25, 1.0) == 0  # every step, from noise
  assert samplers.start_index(25, 0.5) == 12  # the last round(12.5) = 13 steps
  assert samplers.start_index(25, 0.2) == 20
  assert samplers.start_index(25, 1e-3) == 24  # at least one step
  for bad in (0.0, -0.1, 1.5, float('nan')):
    with pytest.raises(ValueError, match='strength'):
      samplers.start_index(25, bad)
  assert cascade.SamplingOptions(steps=10, strength=0.3).start == 7
  with pytest.raises(ValueError, match='strength'):
    cascade.SamplingOptions(strength=0.0)
  with pytest.raises(ValueError, match='resample'):
    cascade.SamplingOptions(resample=0)


@pytest.mark.parametrize('name', samplers.SAMPLERS)
def test_strength_one_is_plain_sampling(name):
  """Strength 1 starts from the very draw plain sampling starts from: bitwise the same result."""
  logsnrs = grid(10)
  kw = dict(denoise_fn=mixture_denoiser, logsnrs=logsnrs, shape=(500, 2), rng=jax.random.key(3))
  plain = samplers.sample(name, **kw)
  edited = samplers.sample(
    name, **kw, start=samplers.start_index(10, 1.0), x_init=jnp.asarray(mixture_data(500))
  )
  np.testing.assert_array_equal(np.asarray(edited), np.asarray(plain))  # same program, same key


@functools.cache
def run_img2img(name: str, strength: float, steps: int = 25) -> np.ndarray:
  fn = jax.jit(
    functools.partial(
      samplers.sample,
      name,
      denoise_fn=mixture_denoiser,
      shape=(N, 2),
      start=samplers.start_index(steps, strength),
    )
  )
  return np.asarray(fn(logsnrs=grid(steps), rng=jax.random.key(1), x_init=mixture_data()))


@pytest.mark.parametrize('name', samplers.SAMPLERS)
def test_small_strength_returns_the_input_and_strength_moves_away(name):
  """Strength 0.04 of 25 steps runs one step, from logsnr ~9.6 (noise s ~0.008): the exact
  denoiser hands back the input (measured: mean |diff| 0.0066, max 0.032 over 8000 values).
  More strength, further from the input (measured mean |diff| 0.12-0.15 at 0.3, 0.25-0.30 at
  0.5)."""
  x0 = mixture_data()
  diffs = []
  for strength in (0.04, 0.3, 0.5):
    x = run_img2img(name, strength)
    assert np.all(np.isfinite(x))
    diffs.append(float(np.abs(x - x0).mean()))
  near = np.abs(run_img2img(name, 0.04) - x0)
  assert near.mean() < 0.02 and near.max() < 0.1, (near.mean(), near.max())
  assert diffs[0] < diffs[1] < diffs[2] and diffs[1] > 0.05, diffs


@pytest.mark.parametrize('name', ['ddim', 'dpmpp_2m'])
def test_image_to_image_of_data_keeps_the_data_distribution(name):
  """Started from data noised to logsnrs[k] (exactly the forward marginal there), the exact
  denoiser's samples are again the data distribution: the start point is no approximation.
  Tolerances as the plain sampler tests (diffusion_test)."""
  x = run_img2img(name, 0.5)
  weights, means, stds = mixture_stats(x)
  np.testing.assert_allclose(weights, MIX_WEIGHTS, atol=0.03)
  np.testing.assert_allclose(means, MIX_MEANS, atol=0.06)
  np.testing.assert_allclose(stds, MIX_STDS, rtol=0.12)


# ----------------------------------------------------------------------------- inpainting


def test_renoise_is_the_forward_process():
  """q(z_t | z_s) after q(z_s | x) is q(z_t | x): mean alpha_t x, std sigma_t."""
  x = jnp.full((200_000,), 0.7)
  k1, k2 = jax.random.split(jax.random.key(0))
  logsnr_s, logsnr_t = jnp.float32(2.0), jnp.float32(-1.0)
  z_s = gaussian.q_sample(x=x, logsnr=logsnr_s, noise=jax.random.normal(k1, x.shape))
  z_t = samplers.renoise(
    z_s=z_s, logsnr_s=logsnr_s, logsnr_t=logsnr_t, noise=jax.random.normal(k2, x.shape)
  )
  alpha_t, sigma_t = gaussian.alpha_sigma(logsnr_t)
  # 200k draws: standard errors 0.0019 (mean) and 0.0013 (std); a wrong coefficient is >= 0.05.
  assert abs(float(z_t.mean()) - 0.7 * float(alpha_t)) < 0.01
  assert abs(float(z_t.std()) - float(sigma_t)) < 0.01
  # Equal log-SNRs: the identity (no noise).
  same = samplers.renoise(z_s=z_s, logsnr_s=logsnr_s, logsnr_t=logsnr_s, noise=z_s)
  np.testing.assert_allclose(same, z_s, rtol=1e-6)  # alpha ratio 1 up to an ulp


KNOWN = np.where(np.arange(N) < N // 2, 1.5, -1.5).astype(np.float32)  # coordinate 0 per row


@functools.cache
def run_inpaint(name: str, resample: int, steps: int = 50) -> np.ndarray:
  """Coordinate 0 known (1.5 in the first half of the rows, -1.5 in the second), 1 repainted."""
  logsnrs = grid(steps)
  x_known = jnp.stack([jnp.asarray(KNOWN), jnp.zeros(N)], axis=1)
  mask = jnp.tile(jnp.asarray([[0.0, 1.0]]), (N, 1))
  project = samplers.known_region_projection(x_known=x_known, mask=mask, logsnrs=logsnrs)
  fn = jax.jit(
    functools.partial(
      samplers.sample,
      name,
      denoise_fn=mixture_denoiser,
      shape=(N, 2),
      project=project,
      resample=resample,
    )
  )
  return np.asarray(fn(logsnrs=logsnrs, rng=jax.random.key(0)))


@pytest.mark.parametrize('name', samplers.SAMPLERS)
def test_inpainting_keeps_the_known_region_and_samples_the_conditional(name):
  """Known x_0 = 1.5 picks the component (1.5, 1) (std 0.5), x_0 = -1.5 the component (-1.5, 0)
  (std 0.3) (posterior weights 1 - 1e-10): the repainted x_1 must follow N(1, 0.5^2) and
  N(0, 0.3^2). With 10 RePaint takes per step, 50 steps, measured: means 0.97-0.99 and -0.00-0.01,
  stds 0.47-0.51 and 0.27-0.30 for every sampler. Tolerances: means +-0.06, stds 12 % (as the
  plain sampler tests), 2000 samples each."""
  x = run_inpaint(name, 10)
  np.testing.assert_array_equal(x[:, 0], KNOWN)  # exact: the last projection pastes x_known
  for rows, mean, std in ((slice(0, N // 2), 1.0, 0.5), (slice(N // 2, N), 0.0, 0.3)):
    repainted = x[rows, 1]
    assert abs(repainted.mean() - mean) < 0.06, (name, repainted.mean(), mean)
    assert abs(repainted.std() / std - 1.0) < 0.12, (name, repainted.std(), std)


def test_resampling_is_what_makes_the_repainted_region_fit():
  """Replacement alone (1 take) lets the repainted coordinate commit before the known one is
  visible through the noise: for known 1.5 its mean comes out ~0.6 (measured 0.59) instead of
  1.0. RePaint's takes fix it (previous test). The known region is exact either way."""
  x = run_inpaint('ddpm', 1)
  np.testing.assert_array_equal(x[:, 0], KNOWN)
  assert x[: N // 2, 1].mean() < 0.8


@pytest.mark.parametrize('name', samplers.SAMPLERS)
def test_every_edit_is_one_compiled_loop(name):
  """The step loop (and RePaint's loop of takes inside it) is traced once, whatever the number
  of steps: the denoiser's Python body runs a fixed number of times (Heun: 2, its corrector),
  never once per step."""
  x_known = jnp.zeros((8, 2))
  mask = jnp.tile(jnp.asarray([[0.0, 1.0]]), (8, 1))
  calls = {}
  for steps in (6, 30):
    count = [0]

    def denoise(z, logsnr, count=count):
      count[0] += 1
      return mixture_denoiser(z, logsnr)

    logsnrs = grid(steps)
    project = samplers.known_region_projection(x_known=x_known, mask=mask, logsnrs=logsnrs)
    fn = jax.jit(
      functools.partial(
        samplers.sample,
        name,
        denoise_fn=denoise,
        logsnrs=logsnrs,
        shape=(8, 2),
        project=project,
        resample=3,
        start=2,
        x_init=x_known,
      )
    )
    out = fn(rng=jax.random.key(0))
    assert out.shape == (8, 2)
    calls[steps] = count[0]
  assert calls[6] == calls[30] <= 2, calls


# ------------------------------------------------------------ through real (tiny) stages


@pytest.fixture(scope='module')
def tiny_stages():
  """An untrained tiny base stage (16 px) and SR stage (16 -> 32 px), 3 sampling steps."""
  base_config = base_cfg.get_config('tiny')
  sr_config = sr_cfg.get_config('tiny')
  sr_config.data.lowres_resolution = 16
  sr_config.data.resolution = 32
  built = []
  for i, config in enumerate((base_config, sr_config)):
    graphdef, _ = stage.abstract_model(config)
    params = jax.jit(lambda rng, config=config: stage.init_params(config, rng))(jax.random.key(i))
    built.append((config, graphdef, params))
  return built


def make_stage(built, **options) -> cascade.Stage:
  config, graphdef, params = built
  opts = cascade.SamplingOptions(steps=3, guidance=2.0, **options)
  return cascade.Stage(config=config, graphdef=graphdef, params=params, options=opts)


def text_inputs(config, batch: int):
  dim = int(config.model.text_dim)
  embs = jax.random.normal(jax.random.key(7), (batch, 4, dim))
  return embs, jnp.ones((batch, 4), bool)


def test_edit_plans(tiny_stages):
  """Which sizes each stage gets the image at, per mode (no compile)."""
  base, sr = make_stage(tiny_stages[0]), make_stage(tiny_stages[1])
  sizes = lambda plans: [(p.lowres, p.x_init, p.mask) for p in plans]
  assert sizes(editing.plan([sr], strength=None, inpaint=False)) == [(16, 0, 0)]  # upscale
  assert sizes(editing.plan([sr], strength=0.5, inpaint=False)) == [(16, 32, 0)]
  assert sizes(editing.plan([base, sr], strength=0.5, inpaint=False)) == [(0, 16, 0), (0, 0, 0)]
  assert sizes(editing.plan([base, sr], strength=1.0, inpaint=False)) == [(0, 0, 0), (0, 0, 0)]
  assert sizes(editing.plan([sr], strength=None, inpaint=True)) == [(16, 32, 32)]
  lines = editing.describe_plan(
    editing.pathlib.Path('a.png'),
    (40, 30),
    [base, sr],
    editing.plan([base, sr], strength=None, inpaint=True),
  )
  assert lines == [
    'a.png (40x30: centre 30x30 square kept (10 px of its width cut off)) resized down to 16x16 '
    '(bicubic) for base64 (the known region).',
    'a.png (40x30: centre 30x30 square kept (10 px of its width cut off)) resized up to 32x32 '
    '(bicubic) for sr256 (the known region).',
  ]


def test_stage_strength_one_equals_plain_and_strength_needs_an_image(tiny_stages):
  base = make_stage(tiny_stages[0])
  embs, text_mask = text_inputs(base.config, 2)
  x_init = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  plain = base.sample_fn(base.params, embs, text_mask, jax.random.key(5))
  with_image = base.sample_fn(base.params, embs, text_mask, jax.random.key(5), None, x_init)
  np.testing.assert_array_equal(np.asarray(with_image), np.asarray(plain))
  partial = make_stage(tiny_stages[0], strength=0.5)
  with pytest.raises(ValueError, match='needs the init image'):
    partial.sample_fn(partial.params, embs, text_mask, jax.random.key(5))


def test_cascade_inpainting_keeps_the_known_region_on_every_stage(tiny_stages):
  """Base (16 px) and SR (32 px) stages repaint the centre, with 2 RePaint takes; the known
  pixels of both outputs are exactly the init image's, the repainted ones are generated."""
  rng = np.random.default_rng(1)
  picture = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
  repaint = np.zeros((40, 40), bool)
  repaint[10:30, 12:28] = True
  stages = [make_stage(tiny_stages[0], resample=2), make_stage(tiny_stages[1], resample=2)]
  plans = editing.plan(stages, strength=None, inpaint=True)
  assert [(p.lowres, p.x_init, p.mask) for p in plans] == [(0, 16, 16), (0, 32, 32)]
  lowres, per_stage = editing.stage_arrays([picture, picture], [repaint, repaint], plans)
  assert lowres is None
  edits = [cascade.StageEdit(jnp.asarray(x), jnp.asarray(m)) for x, m in per_stage]
  embs, text_mask = text_inputs(stages[0].config, 2)
  outputs = cascade.run_cascade(
    stages, text_embs=[embs, embs], text_mask=[text_mask] * 2, rng=jax.random.key(0), edits=edits
  )
  for out, (x_init, mask) in zip(outputs, per_stage, strict=True):
    out, keep = np.asarray(out), mask[..., 0] == 0
    assert out.shape == x_init.shape
    np.testing.assert_array_equal(out[keep], x_init[keep])  # exact: pasted at the last step
    assert np.abs(out[~keep] - x_init[~keep]).mean() > 0.05  # the hole is not the original


# ---------------------------------------------------------------- images and masks (files)


def save(tmp_path, name, array_or_image, **kw):
  path = tmp_path / name
  image = array_or_image
  if isinstance(array_or_image, np.ndarray):
    image = Image.fromarray(array_or_image)
  image.save(path, **kw)
  return path


def test_fit_image_keeps_the_centre_square_of_any_size():
  """A 37x23 image whose 7 px left and right strips are red: the 23 px centre square is blue,
  resized to 16 px (and 64 px) it holds no red."""
  array = np.zeros((23, 37, 3), np.uint8)
  array[:, :, 2] = 255
  array[:, :7] = (255, 0, 0)
  array[:, -7:] = (255, 0, 0)
  image = Image.fromarray(array)
  for size in (16, 64):
    fitted = editing.fit_image(image, size)
    assert fitted.shape == (size, size, 3) and fitted.dtype == np.uint8
    assert fitted[..., 0].max() == 0 and fitted[..., 2].min() == 255
  line = editing.describe_fit(editing.pathlib.Path('p.png'), (37, 23), 16, "sr256's input")
  assert line == (
    'p.png (37x23: centre 23x23 square kept (14 px of its width cut off)) resized down to '
    "16x16 (bicubic) for sr256's input."
  )
  same = editing.describe_fit(editing.pathlib.Path('q.png'), (32, 32), 32, 'base64')
  assert same == 'q.png (32x32) used at its size for base64.'
  # At its own size an image is used pixel for pixel.
  np.testing.assert_array_equal(
    editing.fit_image(Image.fromarray(array[:, 7:30]), 23), array[:, 7:30]
  )


def test_fit_mask_repaints_every_pixel_that_touches_the_hole():
  repaint = np.zeros((64, 64), bool)
  repaint[17, 40] = True  # one pixel
  small = editing.fit_mask(repaint, 16)
  assert small.shape == (16, 16, 1) and small.sum() == 1 and small[17 // 4, 40 // 4, 0] == 1
  np.testing.assert_array_equal(editing.fit_mask(repaint, 64)[..., 0], repaint.astype(np.float32))


def test_a_folder_of_sample_output_is_read_without_its_grid(tmp_path):
  # Upscaling an earlier run's output folder took its grid.png as one more photo.
  rgb = np.full((8, 8, 3), 100, np.uint8)
  out, own = tmp_path / 'samples', tmp_path / 'photos'
  out.mkdir()
  own.mkdir()
  for folder in (out, own):
    save(folder, 'a.png', rgb)
    save(folder, 'grid.png', rgb)
  (out / 'a.json').write_text('{}')  # sample.py's sidecar
  assert editing.find_images([str(out)]) == [out / 'a.png']
  assert editing.find_images([str(own)]) == [own / 'a.png', own / 'grid.png']  # a user's own
  assert editing.find_images([str(out / 'grid.png')]) == [out / 'grid.png']  # named: taken


def test_load_image_refuses_grey_transparent_and_broken_files(tmp_path):
  rgb = np.full((8, 8, 3), 100, np.uint8)
  ok = editing.load_image(save(tmp_path, 'ok.png', rgb))
  assert ok.mode == 'RGB' and ok.size == (8, 8)
  palette = Image.fromarray(np.stack([rgb[..., 0], rgb[..., 1] * 2, rgb[..., 2]], -1)).convert('P')
  assert editing.load_image(save(tmp_path, 'pal.png', palette)).mode == 'RGB'
  # An alpha channel opaque everywhere (screenshots) carries nothing: the image is its RGB.
  opaque = editing.load_image(
    save(tmp_path, 'opaque.png', np.dstack([rgb, np.full((8, 8), 255, np.uint8)]))
  )
  assert opaque.mode == 'RGB'
  np.testing.assert_array_equal(np.asarray(opaque), rgb)
  cases = {
    'grey.png': (Image.fromarray(rgb[..., 0]), 'greyscale image (mode L)'),
    'grey16.png': (Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), 'greyscale'),
    'rgba.png': (Image.fromarray(np.dstack([rgb, np.eye(8, dtype=np.uint8) * 255])), 'alpha'),
    'la.png': (Image.fromarray(rgb[..., 0]).convert('LA'), 'greyscale image (mode LA)'),
  }
  for name, (image, message) in cases.items():
    with pytest.raises(editing.EditError, match=re.escape(message)):
      editing.load_image(save(tmp_path, name, image))
  # The transparent image's advice, followed: its inverted alpha as the mask repaints the
  # transparent part (the left half here), not the opaque one.
  rgba = np.dstack([rgb, np.where(np.arange(8) < 4, 0, 255).astype(np.uint8)[None].repeat(8, 0)])
  with pytest.raises(editing.EditError, match='inverted alpha') as info:
    editing.load_image(save(tmp_path, 'half.png', Image.fromarray(rgba)))
  assert '-alpha extract -negate' in str(info.value)
  mask = editing.load_mask(save(tmp_path, 'm.png', Image.fromarray(255 - rgba[..., 3])), (8, 8), '')
  assert mask[:, :4].all() and not mask[:, 4:].any()
  # A colour key (an RGB PNG's tRNS chunk) is transparency too: the keyed pixels were used as
  # that colour, where the same picture as RGBA was refused.
  keyed = Image.fromarray(
    np.where(np.eye(8, dtype=bool)[..., None], [0, 0, 255], rgb).astype(np.uint8)
  )
  keyed.save(tmp_path / 'keyed.png', transparency=(0, 0, 255))
  with pytest.raises(editing.EditError, match=r'has transparent pixels .*mode RGB'):
    editing.load_image(tmp_path / 'keyed.png')
  (tmp_path / 'text.png').write_text('not an image')
  with pytest.raises(editing.EditError, match='cannot be decoded'):
    editing.load_image(tmp_path / 'text.png')
  good = (tmp_path / 'ok.png').read_bytes()
  (tmp_path / 'cut.png').write_bytes(good[: len(good) // 2])  # truncated
  with pytest.raises(editing.EditError, match='cannot be decoded'):
    editing.load_image(tmp_path / 'cut.png')


def test_load_mask_refusals(tmp_path):
  hole = np.zeros((20, 30), np.uint8)
  hole[5:10, 10:20] = 255
  repaint = editing.load_mask(save(tmp_path, 'm.png', hole), (30, 20), 'img.png')
  assert repaint.dtype == bool and repaint.sum() == 50
  with pytest.raises(editing.EditError, match='is 30x20 but --init_image img.png is 40x20'):
    editing.load_mask(tmp_path / 'm.png', (40, 20), 'img.png')
  with pytest.raises(editing.EditError, match='has no white pixel inside the centre square'):
    editing.load_mask(save(tmp_path, 'black.png', np.zeros((20, 30), np.uint8)), (30, 20), 'i')
  # A grey "white" (100 of 255) was reported as all black.
  with pytest.raises(editing.EditError, match=r'no white pixel.*repaint \(white, >= 128 of 255'):
    editing.load_mask(save(tmp_path, 'grey.png', np.full((20, 30), 100, np.uint8)), (30, 20), 'i')
  with pytest.raises(editing.EditError, match='all white'):
    editing.load_mask(save(tmp_path, 'white.png', np.full((20, 30), 255, np.uint8)), (30, 20), 'i')
  outside = np.zeros((20, 30), np.uint8)
  outside[:, :3] = 255  # only in the strip cut off by the centre square
  with pytest.raises(editing.EditError, match='no white pixel inside the centre square'):
    editing.load_mask(save(tmp_path, 'out.png', outside), (30, 20), 'i')
  (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n')
  with pytest.raises(editing.EditError, match='--mask .* cannot be decoded'):
    editing.load_mask(tmp_path / 'bad.png', (30, 20), 'i')
  with pytest.raises(editing.EditError, match=r'--mask \S*nope.png does not exist; pass the mask'):
    editing.load_mask(tmp_path / 'nope.png', (30, 20), 'i')  # was 'cannot be decoded'


def test_a_16_bit_mask_is_white_from_half_its_range(tmp_path):
  # convert('L') clips a 16-bit mask instead of scaling it: every value from 128 of 65535 (0.2 %
  # grey) read as white, so a 12.5 % grey band that an 8-bit mask keeps was repainted.
  mask = np.zeros((20, 30), np.uint16)
  mask[5:10, 10:20] = 65535  # the hole
  mask[:2] = 0x2000  # 12.5 % grey: keep
  mask[15:, 12:18] = 0x8000  # half: repaint, as 128 of 255
  image = Image.fromarray(mask)
  assert image.mode.startswith('I')
  repaint = editing.load_mask(save(tmp_path, 'm16.png', image), (30, 20), 'img.png')
  assert repaint.sum() == 50 + 30 and repaint[5:10, 10:20].all() and not repaint[:2].any()
  eight = editing.load_mask(save(tmp_path, 'm8.png', (mask >> 8).astype(np.uint8)), (30, 20), 'i')
  np.testing.assert_array_equal(repaint, eight)  # the same mask in 8 bits
  # With a colour key (tRNS) it went through RGBA, which clips the same way: the 12.5 % grey
  # band was repainted. The keyed value is transparent: kept.
  image.save(tmp_path / 'keyed.png', transparency=0x8000)
  assert Image.open(tmp_path / 'keyed.png').info.get('transparency') == 0x8000
  keyed = editing.load_mask(tmp_path / 'keyed.png', (30, 20), 'img.png')
  np.testing.assert_array_equal(keyed, repaint & (mask != 0x8000))
  Image.fromarray(mask.astype(np.float32)).save(tmp_path / 'f.tiff')
  with pytest.raises(editing.EditError, match=r'floating-point image \(mode F\)'):
    editing.load_mask(tmp_path / 'f.tiff', (30, 20), 'i')


def test_init_images_and_masks_expand_the_home_folder(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  save(tmp_path, 'in.png', np.full((8, 8, 3), 100, np.uint8))
  assert editing.find_images(['~/in.png']) == [tmp_path / 'in.png']
  hole = np.zeros((8, 8), np.uint8)
  hole[2:4] = 255
  save(tmp_path, 'm.png', hole)
  assert editing.load_mask('~/m.png', (8, 8), 'in.png').sum() == 16


def test_find_images_in_files_and_folders(tmp_path):
  folder = tmp_path / 'pics'
  folder.mkdir()
  for name in ('b.png', 'a.JPG', 'notes.txt'):
    (folder / name).write_bytes(b'x')
  single = tmp_path / 'c.png'
  single.write_bytes(b'x')
  assert editing.find_images([str(folder), str(single)]) == [
    folder / 'a.JPG',
    folder / 'b.png',
    single,
  ]
  with pytest.raises(editing.EditError, match='does not exist'):
    editing.find_images([str(tmp_path / 'nope.png')])
  (tmp_path / 'empty').mkdir()
  with pytest.raises(editing.EditError, match='no image files'):
    editing.find_images([str(tmp_path / 'empty')])
