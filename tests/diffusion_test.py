"""Diffusion math against NumPy references, and every sampler against an analytic denoiser."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import gaussian, guidance, losses, samplers, schedules

pytestmark = pytest.mark.unit


def np_alpha_sigma(logsnr):
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


# ----------------------------------------------------------------------------- schedules


def test_cosine_schedule_matches_numpy():
  t = np.linspace(0.02, 0.98, 49)
  s = 0.008
  f = lambda t: np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
  alpha_bar = f(t) / f(0.0)
  expected = np.log(alpha_bar / (1 - alpha_bar))
  # f32 log(tan^2) against float64: cancellation near the ends, measured 5.3e-6 on values up to
  # 6.9; 1e-4 leaves ~20x, a wrong offset s or scale is off by >= 1e-2.
  np.testing.assert_allclose(schedules.logsnr_cosine(t), expected, rtol=1e-4, atol=1e-4)


def test_schedules_clip_and_decrease():
  t = jnp.linspace(0.0, 1.0, 101)
  for name in ('cosine', 'linear', 'shifted_cosine'):
    fn = schedules.get_schedule(name, resolution=256, logsnr_min=-15.0, logsnr_max=15.0)
    logsnr = np.asarray(fn(t))
    assert np.all(np.isfinite(logsnr)), name
    assert logsnr.min() >= -15.0 and logsnr.max() <= 15.0, name
    # f32 logsnr up to 15 has an ulp of 9.5e-7: the old 1e-6 slack was one ulp on the flat
    # (clipped) ends; 1e-5 is ~10 ulp, while a real increase over a 0.01 step is far larger.
    assert np.all(np.diff(logsnr) <= 1e-5), f'{name} must decrease with t'


def test_linear_schedule_matches_numpy():
  t = np.linspace(0.0, 1.0, 11)
  expected = np.clip(-np.log(np.expm1(1e-4 + 10 * t**2)), -20, 20)
  # f32 expm1/log against float64, values up to 10 (clipped at 20): measured 7.5e-7; 1e-4 abs.
  np.testing.assert_allclose(schedules.logsnr_linear(t), expected, rtol=1e-5, atol=1e-4)


def test_shifted_cosine_is_cosine_plus_shift():
  t = np.linspace(0.1, 0.9, 9)
  shifted = schedules.logsnr_shifted_cosine(t, resolution=256, base_resolution=64)
  # Same f32 cosine plus a constant: one extra rounding (~5e-7 at |x| ~ 6.5), 1e-5 is ~20 ulp.
  np.testing.assert_allclose(
    shifted, schedules.logsnr_cosine(t) + 2 * np.log(64 / 256), rtol=1e-5, atol=1e-5
  )


def test_the_clean_end_of_the_cosine_is_its_logsnr_max_at_any_shift():
  # The float32 u - u0 at t = 0 was 4e-10, not 0: an unclipped logsnr of 24.5, which the sr1024
  # shift (-5.55) moved to 18.9, below logsnr_max = 20 (17.5 at 2048 px).
  for resolution in (64, 256, 1024, 2048):
    end = schedules.logsnr_shifted_cosine(jnp.zeros(1), resolution=resolution)
    assert float(end[0]) == 20.0, resolution
  # Near t = 0, against the float64 formula: the direct u - u0 keeps the small-t values exact.
  t = np.array([1e-6, 1e-4, 1e-3, 0.04])
  u = np.pi / 2 * (t + 0.008) / 1.008
  alpha_bar = np.cos(u) ** 2 / np.cos(np.pi / 2 * 0.008 / 1.008) ** 2
  expected = np.log(alpha_bar / (1 - alpha_bar))
  got = schedules.logsnr_cosine(t, logsnr_min=-jnp.inf, logsnr_max=jnp.inf)
  # f32 logs of values up to 17: a few ulp (~2e-6 each); the cancelling form was 7e-3 off at 1e-6.
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_unknown_schedule_names_choices():
  with pytest.raises(ValueError, match='cosine'):
    schedules.get_schedule('quadratic')


def test_logsnr_grid_rejects_zero_steps():
  with pytest.raises(ValueError, match='steps'):
    schedules.logsnr_grid(schedules.logsnr_cosine, steps=0)
  with pytest.raises(ValueError, match='quad'):
    schedules.logsnr_grid(schedules.logsnr_cosine, steps=4, spacing='uniform')


@pytest.mark.parametrize('spacing', schedules.SPACINGS)
def test_logsnr_grid_spans_the_schedule_and_increases(spacing):
  schedule = schedules.get_schedule('cosine', logsnr_min=-15.0, logsnr_max=12.0)
  grid = np.asarray(schedules.logsnr_grid(schedule, steps=25, spacing=spacing))
  assert grid.shape == (26,)
  # The first point is the schedule's noise end (karras: clipped below at sigma 80, logsnr
  # -8.76; f32 exp/log round trip ~1e-6 relative at |15|); the last is the clean image.
  first = schedules.KARRAS_LOGSNR_MIN if spacing == 'karras' else -15.0
  np.testing.assert_allclose(grid[0], first, atol=1e-4)
  assert grid[-1] == np.inf and np.all(np.isfinite(grid[:-1])) and grid[-2] < 12.0
  assert np.all(np.diff(grid) > 0), spacing


@pytest.mark.parametrize('schedule_name', ['linear', 'cosine'])
@pytest.mark.parametrize('spacing', schedules.SPACINGS)
@pytest.mark.parametrize('name', samplers.SAMPLERS)
def test_every_sampler_ends_at_the_clean_image(name, spacing, schedule_name):
  """The grid's last point is sigma 0, so a denoiser that knows the image exactly (data: one
  point) gets it back exactly: the last step returns the x0 estimate. Ending at schedule(0)
  instead left sigma_N times the predicted noise in it: up to 0.035 here with the linear
  schedule (sigma 0.01, 1.3 grey levels per unit noise), 1.6e-4 with the cosine (sigma 4.5e-5)."""
  x_star = jnp.asarray([[0.3, -0.7, 0.99, -1.0]])
  grid = schedules.logsnr_grid(schedules.get_schedule(schedule_name), steps=7, spacing=spacing)
  x = samplers.sample(
    name,
    denoise_fn=lambda z, logsnr: jnp.broadcast_to(x_star, z.shape),
    logsnrs=grid,
    shape=(5, 4),
    rng=jax.random.key(0),
    eta=1.0,  # DDIM's stochastic form too
  )
  # Heun's Euler step y + (0 - s) (y - D) / s rounds: 9e-8 measured.
  np.testing.assert_allclose(np.asarray(x), np.broadcast_to(x_star, (5, 4)), rtol=0, atol=1e-6)


def test_logsnr_spacing_is_uniform_in_logsnr():
  schedule = schedules.get_schedule('cosine', logsnr_min=-15.0, logsnr_max=12.0)
  grid = np.asarray(schedules.logsnr_grid(schedule, steps=27, spacing='logsnr'))
  # f32 affine interpolation of values <= 15: a few ulp; a non-uniform grid is off by >= 1e-1.
  # The last point, the clean end, is +inf (not spaced).
  np.testing.assert_allclose(np.diff(grid[:-1]), 1.0, atol=1e-5)


def test_default_spacing_per_sampler():
  assert schedules.default_spacing('heun') == 'karras'
  for name in ('ddpm', 'ddim', 'dpmpp_2m'):
    assert schedules.default_spacing(name) == 'quad'


def test_dpmpp_2m_survives_equal_consecutive_logsnrs():
  """A grid clipped at logsnr_max repeats its last value; DPM-Solver++ used to divide 0 by 0.

  Repeated log-SNRs are zero-length steps: the sample must be finite and equal to the one on
  the grid without the repeats (the steps after a repeat are first order, hence the tolerance).
  """
  schedule = schedules.get_schedule('cosine')
  grid = schedules.logsnr_grid(schedule, steps=20)
  # Two equal pairs: one in the middle (h = 0, then h_prev = 0) and one at the last call
  # before the clean end (a schedule clipped at logsnr_max).
  repeated = jnp.concatenate([grid[:10], grid[9:10], grid[10:-1], grid[-2:]])
  kw = dict(denoise_fn=mixture_denoiser, shape=(4000, 2), rng=jax.random.key(3))
  x = np.asarray(samplers.sample_dpmpp_2m(logsnrs=repeated, **kw))
  assert np.all(np.isfinite(x))
  ref = np.asarray(samplers.sample_dpmpp_2m(logsnrs=grid, **kw))
  # The step after a repeat is first order instead of second, which moves samples a little
  # (measured median 0.004, 90th percentile 0.016; a few near a component boundary by 0.23); a
  # NaN, a skipped or a doubled step moves most of them by O(0.1-1).
  diff = np.abs(x - ref)
  assert np.median(diff) < 0.02, np.median(diff)
  weights, means, _ = mixture_stats(x)
  np.testing.assert_allclose(weights, MIX_WEIGHTS, atol=0.03)
  np.testing.assert_allclose(means, MIX_MEANS, atol=0.06)


def test_logsnr_grid_spacings():
  schedule = schedules.get_schedule('cosine')
  t = jnp.linspace(1.0, 0.0, 26)
  time = schedules.logsnr_grid(schedule, steps=25, spacing='time')
  np.testing.assert_array_equal(time[:-1], schedule(t)[:-1])
  quad = schedules.logsnr_grid(schedule, steps=25, spacing='quad')
  np.testing.assert_array_equal(quad[:-1], schedule(t**2)[:-1])
  assert time[-1] == quad[-1] == np.inf
  # Karras: s = exp(-logsnr / 2) is uniform in s^(1/7) between the endpoints.
  karras = np.asarray(schedules.logsnr_grid(schedule, steps=25, spacing='karras'), np.float64)
  root = np.exp(-karras[:-1] / 14.0)
  np.testing.assert_allclose(np.diff(root), np.diff(root).mean(), rtol=1e-3)
  # The point of both non-uniform grids: the last network call sees far less noise than the
  # time-uniform cosine grid's (logsnr ~5.2 at 25 steps).
  assert float(time[-2]) < 6.0 and float(quad[-2]) > 9.0 and float(karras[-2]) > 9.0


# ------------------------------------------------------------------ process, conversions


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
  eps = rng.normal(size=x.shape).astype(np.float32)
  logsnr = np.array([-6.0, -1.0, 0.0, 2.5, 7.0], np.float32)
  return x, eps, logsnr


def test_q_sample_and_conversions_round_trip(batch):
  x, eps, logsnr = batch
  a, s = np_alpha_sigma(logsnr)
  a, s = a[:, None, None, None], s[:, None, None, None]
  z = gaussian.q_sample(x=x, logsnr=logsnr, noise=eps)
  # f32 a x + s eps with |terms| up to ~4: where they cancel, the error is an ulp of the terms
  # (4.8e-7), so the old atol=1e-6 was ~2 ulp; 1e-5 (~20 ulp) holds across ISAs and FMA
  # contraction, while a wrong alpha or sigma is off by >= 1e-2. Measured 2.4e-7.
  np.testing.assert_allclose(z, a * x + s * eps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-6)  # NumPy f32: 1 ulp measured, 1e-6 ~ 8
  v = gaussian.v_from_x_eps(x=x, eps=eps, logsnr=logsnr)
  np.testing.assert_allclose(v, a * eps - s * x, rtol=1e-5, atol=1e-5)  # as z above
  # Round trips in f32: dividing by alpha (0.05 at logsnr -6) or sigma amplifies the ~5e-7 error
  # of z by up to 20x (measured 3.5e-6); 1e-3 (1e-4 where nothing is divided) leaves >= 30x.
  np.testing.assert_allclose(gaussian.x_from_v(z=z, v=v, logsnr=logsnr), x, atol=1e-4)
  np.testing.assert_allclose(gaussian.eps_from_v(z=z, v=v, logsnr=logsnr), eps, atol=1e-4)
  np.testing.assert_allclose(gaussian.x_from_eps(z=z, eps=eps, logsnr=logsnr), x, atol=1e-3)
  np.testing.assert_allclose(gaussian.eps_from_x(z=z, x=x, logsnr=logsnr), eps, atol=1e-3)
  for objective in ('eps', 'v', 'x0'):
    target = gaussian.target_for(objective=objective, x=x, eps=eps, logsnr=logsnr)
    recovered = gaussian.pred_to_x(pred=target, z=z, logsnr=logsnr, objective=objective)
    np.testing.assert_allclose(recovered, x, atol=1e-3, err_msg=objective)


def test_posterior_matches_textbook_formula(batch):
  """Against q(z_s|z_t,x) written with alpha_{t|s}, sigma_{t|s} (Kingma et al. 2021, eq. 29)."""
  x, eps, logsnr_t = batch
  logsnr_s = logsnr_t + np.array([0.5, 2.0, 1.0, 3.0, 0.1], np.float32)
  z_t = np.asarray(gaussian.q_sample(x=x, logsnr=logsnr_t, noise=eps), np.float64)
  a_t, s_t = np_alpha_sigma(logsnr_t.astype(np.float64))
  a_s, s_s = np_alpha_sigma(logsnr_s.astype(np.float64))
  a_ts = a_t / a_s
  var_ts = s_t**2 - a_ts**2 * s_s**2
  b = lambda v: v[:, None, None, None]
  mean = b(a_ts * s_s**2 / s_t**2) * z_t + b(a_s * var_ts / s_t**2) * x
  var = var_ts * s_s**2 / s_t**2
  got_mean, got_var = gaussian.posterior(z_t=z_t, x=x, logsnr_t=logsnr_t, logsnr_s=logsnr_s)
  # f32 posterior (exp, sigmoid, a few products) against float64: measured 4e-7 on means up to
  # 3.2 and 4e-8 on variances up to 0.39, both < 1 % of the allowance; a wrong coefficient is
  # off by >= 1e-2.
  np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_var)[:, 0, 0, 0], var, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------- loss


def test_loss_shape_zero_for_perfect_model_and_weighting(batch):
  x, eps, logsnr = batch
  for objective in ('eps', 'v', 'x0'):
    target = gaussian.target_for(objective=objective, x=x, eps=eps, logsnr=logsnr)
    loss = losses.diffusion_loss(
      model_fn=lambda z, l, target=target: target,
      x=x,
      logsnr=logsnr,
      noise=eps,
      objective=objective,
    )
    assert loss.shape == (5,)
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)  # exact: target - target is 0

  # A model that predicts zeros pays the weighted mean square of the target. f32 mean of 48
  # squares times a weight: ~sqrt(48) ulp (measured 2e-7 relative), rtol 1e-5 is 50x that.
  snr = np.exp(logsnr)
  expected_w = {
    'eps': np.minimum(snr, 5) / snr,
    'v': np.minimum(snr, 5) / (snr + 1),
    'x0': np.minimum(snr, 5),
  }
  for objective, w in expected_w.items():
    target = np.asarray(gaussian.target_for(objective=objective, x=x, eps=eps, logsnr=logsnr))
    loss = losses.diffusion_loss(
      model_fn=lambda z, l: jnp.zeros_like(z), x=x, logsnr=logsnr, noise=eps, objective=objective
    )
    np.testing.assert_allclose(loss, w * (target**2).mean(axis=(1, 2, 3)), rtol=1e-5)
    unweighted = losses.diffusion_loss(
      model_fn=lambda z, l: jnp.zeros_like(z),
      x=x,
      logsnr=logsnr,
      noise=eps,
      objective=objective,
      weighting='none',
    )
    np.testing.assert_allclose(unweighted, (target**2).mean(axis=(1, 2, 3)), rtol=1e-5)


def test_min_snr_weights_are_the_same_x0_weighting():
  """Each objective's min-SNR weight equals min(snr, gamma) once expressed as an x0-space MSE."""
  logsnr = jnp.linspace(-8, 8, 17)
  snr = np.exp(np.asarray(logsnr))
  # ||eps err||^2 = snr ||x err||^2 ; ||v err||^2 = (1 + snr) ||x err||^2 (at fixed z).
  to_x0_factor = {'eps': snr, 'v': 1 + snr, 'x0': np.ones_like(snr)}
  for objective, factor in to_x0_factor.items():
    w = losses.loss_weight(logsnr=logsnr, objective=objective, weighting='min_snr')
    # f32 exp / min / divide: a few ulp (measured 1e-7 relative); rtol 1e-5 leaves 100x.
    np.testing.assert_allclose(np.asarray(w) * factor, np.minimum(snr, 5.0), rtol=1e-5)


def test_unknown_objective_and_weighting_rejected():
  with pytest.raises(ValueError, match='objective'):
    losses.loss_weight(logsnr=jnp.zeros(2), objective='score', weighting='min_snr')
  with pytest.raises(ValueError, match='weighting'):
    losses.loss_weight(logsnr=jnp.zeros(2), objective='v', weighting='p2')


# ----------------------------------------------------------------- guidance, thresholding


def test_cfg_scale_one_is_exactly_conditional():
  rng = np.random.default_rng(1)
  cond, uncond = rng.normal(size=(2, 3, 8)).astype(np.float32)
  out = guidance.classifier_free_guidance(pred_cond=cond, pred_uncond=uncond, scale=1.0)
  np.testing.assert_array_equal(out, cond)  # exact: cond + (1 - 1) * (cond - uncond)
  out = guidance.classifier_free_guidance(pred_cond=cond, pred_uncond=uncond, scale=3.0)
  # f32 with intermediates up to ~9 (ulp 9.5e-7): where the result cancels to ~0 the old
  # atol=1e-6 was one ulp; 1e-5 (~10 ulp) allows any evaluation order, a wrong scale is O(1).
  np.testing.assert_allclose(out, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_guided_prediction_uses_one_batched_call():
  calls = []

  def model_fn(z, logsnr, drop):
    calls.append(z.shape[0])
    return jnp.where(drop[:, None], -1.0, 1.0) * jnp.ones_like(z)

  z, logsnr = jnp.zeros((3, 2)), jnp.zeros(3)
  out = guidance.guided_prediction(model_fn=model_fn, z=z, logsnr=logsnr, scale=4.0)
  assert calls == [6]
  # Exact: small integers (cond 1, uncond -1) are exact in f32 under any evaluation order.
  np.testing.assert_allclose(out, 1.0 + 3.0 * 2.0)  # cond + (s - 1)(cond - uncond)
  out = guidance.guided_prediction(model_fn=model_fn, z=z, logsnr=logsnr, scale=1.0)
  assert calls == [6, 3]
  np.testing.assert_array_equal(out, 1.0)


def test_thresholding_bounds_and_identity_inside_range():
  rng = np.random.default_rng(2)
  inside = rng.uniform(-0.99, 0.99, size=(4, 8, 8, 3)).astype(np.float32)
  # Exact: inside [-1, 1] both thresholds clip nothing and divide by exactly 1.
  np.testing.assert_array_equal(guidance.dynamic_threshold(inside), inside)
  np.testing.assert_array_equal(guidance.static_threshold(inside), inside)
  wild = 5.0 * rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
  for method in ('dynamic', 'static'):
    out = np.asarray(guidance.threshold(wild, method=method))
    assert out.min() >= -1.0 and out.max() <= 1.0, method
  # Dynamic: the p-quantile of |x0| maps to 1, and sign and ordering are kept.
  out = np.asarray(guidance.dynamic_threshold(wild, percentile=0.9))
  s = np.quantile(np.abs(wild.reshape(4, -1)), 0.9, axis=1)
  # f32 quantile (interpolated) and divide vs NumPy: a few ulp (measured 1.2e-7), rtol 1e-5.
  np.testing.assert_allclose(
    out,
    np.clip(wild, -s[:, None, None, None], s[:, None, None, None]) / s[:, None, None, None],
    rtol=1e-5,
  )
  # The upper clamp c caps the threshold: s = min(quantile, c) -> saturates more.
  capped = np.asarray(guidance.dynamic_threshold(wild, percentile=0.9, max_threshold=1.5))
  # f32 clip and one division (XLA may multiply by 1/1.5: 1 ulp); rtol 1e-6 is ~8 ulp.
  np.testing.assert_allclose(capped, np.clip(wild, -1.5, 1.5) / 1.5, rtol=1e-6)
  np.testing.assert_array_equal(guidance.threshold(wild, method='none'), wild)


def test_noise_condition_aug_levels():
  lowres = jnp.ones((3, 4, 4, 3))
  noise = jax.random.normal(jax.random.key(0), lowres.shape)
  schedule = schedules.get_schedule('cosine')
  aug, level = guidance.noise_condition_aug(
    lowres=lowres, aug_level=0.2, noise=noise, schedule=schedule
  )
  assert level.shape == (3,)
  # f32(0.2) against 0.2: representation error 1.5e-8 only, so the old default rtol=1e-7 held
  # by 7x; 1e-6 also allows arithmetic on the level, a wrong level is off by >= 1e-3.
  np.testing.assert_allclose(level, [0.2, 0.2, 0.2], rtol=1e-6)
  a, s = gaussian.alpha_sigma(schedule(jnp.float32(0.2)))
  # Same f32 formula both sides (measured 1.2e-7); atol covers results that cancel near 0.
  np.testing.assert_allclose(aug, a * lowres + s * noise, rtol=1e-5, atol=1e-6)
  clean, _ = guidance.noise_condition_aug(
    lowres=lowres, aug_level=0.0, noise=noise, schedule=schedule
  )
  # Not rounding but math: at level 0 sigma = exp(-logsnr_max / 2) is tiny, not 0 (measured
  # 1.2e-4); 1e-3 bounds it, any real augmentation is >= 1e-2.
  np.testing.assert_allclose(clean, lowres, atol=1e-3)
  levels = guidance.training_aug_levels(jax.random.key(1), batch_size=1000, max_level=0.5)
  assert levels.shape == (1000,) and 0 <= levels.min() and levels.max() <= 0.5
  assert abs(float(levels.mean()) - 0.25) < 0.03  # U(0, 0.5), n=1000: 6.5 standard errors
  levels = guidance.training_aug_levels(
    jax.random.key(1), batch_size=1000, min_level=0.1, max_level=0.3
  )
  assert 0.1 <= levels.min() and levels.max() <= 0.3
  assert abs(float(levels.mean()) - 0.2) < 0.012  # U(0.1, 0.3), n=1000: 6.6 standard errors


def test_aug_schedule_is_imagen_pytorchs_linear_and_the_same_for_every_stage():
  """--aug_level 0.2 keeps alpha 0.82 of the low-res image (imagen-pytorch's default level and
  schedule), on every SR stage, whatever the stage's own diffusion schedule."""
  aug = guidance.aug_schedule()
  alphas = [float(gaussian.alpha_sigma(aug(jnp.float32(a)))[0]) for a in (0.1, 0.2, 0.3, 0.5)]
  # Reference values of the continuous DDPM-linear schedule, float64, rounded to 3 digits.
  np.testing.assert_allclose(alphas, [0.951, 0.819, 0.638, 0.286], atol=1e-3)


# ------------------------------------------- samplers against an analytic Gaussian mixture

MIX_WEIGHTS = np.array([0.5, 0.3, 0.2])
MIX_MEANS = np.array([[-1.5, 0.0], [1.5, 1.0], [0.0, -1.5]])
MIX_STDS = np.array([0.3, 0.5, 0.2])


def mixture_denoiser(z, logsnr):
  """E[x | z] for x ~ sum_k w_k N(mu_k, s_k^2 I), z = alpha x + sigma eps (closed form)."""
  alpha, sigma = gaussian.alpha_sigma(logsnr[:, None, None])  # [B, 1, 1]
  mu, s2 = jnp.asarray(MIX_MEANS)[None], jnp.asarray(MIX_STDS)[None, :, None] ** 2  # [1, K, .]
  var = alpha**2 * s2 + sigma**2  # [B, K, 1]
  diff = z[:, None, :] - alpha * mu  # [B, K, D]
  log_resp = (
    jnp.log(jnp.asarray(MIX_WEIGHTS))[None]
    - 0.5 * z.shape[-1] * jnp.log(var[..., 0])
    - 0.5 * jnp.sum(diff**2, -1) / var[..., 0]
  )
  resp = jax.nn.softmax(log_resp, axis=1)[..., None]  # [B, K, 1]
  cond_mean = mu + alpha * s2 / var * diff  # [B, K, D]
  return jnp.sum(resp * cond_mean, axis=1)


def mixture_stats(x):
  """(weights [K], means [K, D], stds [K]) of samples, assigned to their likeliest component."""
  d2 = ((x[:, None, :] - MIX_MEANS[None]) ** 2).sum(-1)
  loglik = np.log(MIX_WEIGHTS) - 2 * np.log(MIX_STDS) - 0.5 * d2 / MIX_STDS**2
  k = loglik.argmax(1)
  weights = np.array([(k == i).mean() for i in range(3)])
  means = np.stack([x[k == i].mean(0) for i in range(3)])
  stds = np.array([x[k == i].std(0).mean() for i in range(3)])
  return weights, means, stds


@functools.cache
def run_sampler(name: str, steps: int, spacing: str = 'quad') -> np.ndarray:
  logsnrs = schedules.logsnr_grid(schedules.get_schedule('cosine'), steps=steps, spacing=spacing)
  fn = jax.jit(
    functools.partial(samplers.sample, name, denoise_fn=mixture_denoiser, shape=(4000, 2), eta=0.0)
  )
  return np.asarray(fn(logsnrs=logsnrs, rng=jax.random.key(123)))


@pytest.mark.parametrize(
  'name,steps,spacing',
  [
    ('ddpm', 1000, 'quad'),
    ('ddim', 1000, 'quad'),
    ('dpmpp_2m', 1000, 'quad'),
    ('heun', 1000, 'quad'),
    # First-order DDIM at 25 steps wants the time grid's denser middle: on the (default)
    # quadratic grid one component mean is off by 0.083 (measured), on the time grid 0.049.
    ('ddim', 25, 'time'),
    ('dpmpp_2m', 25, 'quad'),
    ('dpmpp_2m', 25, 'time'),
    ('heun', 25, 'quad'),
    ('heun', 25, 'karras'),
    ('dpmpp_2m', 25, 'logsnr'),
  ],
)
def test_sampler_matches_gaussian_mixture(name, steps, spacing):
  """Samples from the exact denoiser must reproduce the data distribution.

  Tolerances (4000 samples): mixture weights +-0.03 (about 4 standard errors), component
  means +-0.06, component spreads within 12 % of the truth. The draws are fixed by the key (same
  threefry bits on every backend); float differences across CPUs or GPU move these statistics by
  ~1e-5, while a sign error in a sampler update ruins them. What fills the margins is each
  sampler's own discretisation bias at 25 steps (measured worst mean errors: 0.049 ddim/time,
  0.058 dpmpp_2m/logsnr, 0.020-0.030 the others; 0.012-0.020 at 1000 steps, the sampling
  noise), so the uniform log-SNR grid, which places few steps at the clean end, gets +-0.09.
  """
  x = run_sampler(name, steps, spacing)
  assert np.all(np.isfinite(x))
  weights, means, stds = mixture_stats(x)
  np.testing.assert_allclose(weights, MIX_WEIGHTS, atol=0.03)
  np.testing.assert_allclose(means, MIX_MEANS, atol=0.09 if spacing == 'logsnr' else 0.06)
  np.testing.assert_allclose(stds, MIX_STDS, rtol=0.12)


def noisy_guided_denoiser(z, logsnr):
  """The exact denoiser plus the x0 error of an eps model that is imperfect where the noise is
  small (logsnr > 3): eps error std 3 (guidance 3 on independent cond / uncond errors), i.e. an
  x0 error of std 3 sigma / alpha."""
  alpha, sigma = gaussian.alpha_sigma(logsnr[:, None])
  key = jax.random.fold_in(jax.random.key(5), (logsnr[0] * 1000).astype(jnp.int32))
  err = jnp.where(logsnr[:, None] > 3.0, 3.0 * sigma / alpha, 0.0)
  return mixture_denoiser(z, logsnr) + err * jax.random.normal(key, z.shape)


@pytest.mark.parametrize('name', ['dpmpp_2m', 'ddim'])
def test_default_grid_keeps_prediction_error_out_of_the_samples(name):
  """An ODE sampler's last step returns its last x0 estimate, error included, as the sample.

  On the time-uniform cosine grid (25 steps) that call is at logsnr ~5.2, where the error above
  is ~0.2 per coordinate: the mixture's components (stds 0.2-0.5) come out far wider. The
  default (quadratic) grid's last call sees ~8x less noise: less than 60 % of that excess.
  """
  schedule = schedules.get_schedule('cosine')
  spread = {}
  for spacing in ('time', None):
    kw = {} if spacing is None else {'spacing': spacing}
    logsnrs = schedules.logsnr_grid(schedule, steps=25, **kw)
    x = samplers.sample(
      name,
      denoise_fn=noisy_guided_denoiser,
      logsnrs=logsnrs,
      shape=(4000, 2),
      rng=jax.random.key(123),
    )
    _, _, stds = mixture_stats(np.asarray(x))
    spread[spacing] = stds / MIX_STDS - 1.0
  # Measured (dpmpp_2m): time +44 / +44 / +94 %, default +29 / +12 / +45 %.
  assert spread['time'].mean() > 0.3, spread
  assert spread[None].mean() < 0.6 * spread['time'].mean(), spread


def test_samplers_deterministic_given_key():
  a = run_sampler('ddpm', 1000)
  logsnrs = schedules.logsnr_grid(schedules.get_schedule('cosine'), steps=1000)
  b = samplers.sample_ancestral(
    denoise_fn=mixture_denoiser, logsnrs=logsnrs, shape=(4000, 2), rng=jax.random.key(123)
  )
  # jit(sample('ddpm')) and the direct call are two XLA programs over the same f32 ops and key:
  # equal today, but fusion may round differently; a key mix-up would be O(1) off, not 1e-5.
  np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-5)
  c = samplers.sample_ancestral(
    denoise_fn=mixture_denoiser, logsnrs=logsnrs, shape=(4000, 2), rng=jax.random.key(7)
  )
  assert not np.allclose(a, np.asarray(c))  # another key: O(1) apart


@pytest.mark.parametrize('name', samplers.SAMPLERS)
def test_per_image_keys_make_each_image_independent_of_its_batch(name):
  """With per-image keys image b draws all of its noise from its own key: the start, every
  stochastic step (ddpm; ddim at eta 1), and inpainting's projections and RePaint renoising. So
  an image is the same alone, in a batch, and at another place in the batch (the denoiser here
  works row by row, as a U-Net does; only float rounding could differ, none is seen)."""
  logsnrs = schedules.logsnr_grid(schedules.get_schedule('cosine'), steps=6)
  x_known = jnp.asarray([[0.5, -0.5], [1.0, 0.0], [-1.0, 0.5], [0.0, 0.25]])
  mask = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # 1 = generate

  def run(rows, rng):
    known, m = x_known[np.asarray(rows)], mask[np.asarray(rows)]
    project = samplers.known_region_projection(x_known=known, mask=m, logsnrs=logsnrs)
    kw = dict(denoise_fn=mixture_denoiser, logsnrs=logsnrs, shape=(len(rows), 2), rng=rng)
    kw.update(eta=1.0, start=1, x_init=known, project=project, resample=2)
    return np.asarray(jax.jit(functools.partial(samplers.sample, name, **kw))())

  keys = samplers.image_keys(jax.random.key(11), np.arange(4))
  batch = run([0, 1, 2, 3], keys)
  np.testing.assert_allclose(run([2], keys[2:3]), batch[2:3], rtol=0, atol=1e-6)
  np.testing.assert_allclose(run([3, 1], keys[np.array([3, 1])]), batch[[3, 1]], rtol=0, atol=1e-6)
  # The raw key data (what sample.py passes) is the same keys.
  np.testing.assert_array_equal(run([0, 1, 2, 3], jax.random.key_data(keys)), batch)
  # One key for the batch: image 2 depends on the batch it is in.
  one_key = jax.random.key(11)
  assert np.abs(run([2], one_key)[0] - run([0, 1, 2, 3], one_key)[2]).max() > 0.01
  with pytest.raises(ValueError, match='3 per-image keys for a batch of 4 images'):
    samplers.normal(keys[:3], (4, 2))


def test_ddim_eta_one_is_stochastic_and_correct():
  logsnrs = schedules.logsnr_grid(schedules.get_schedule('cosine'), steps=200)
  x = samplers.sample_ddim(
    denoise_fn=mixture_denoiser, logsnrs=logsnrs, shape=(4000, 2), rng=jax.random.key(3), eta=1.0
  )
  weights, means, stds = mixture_stats(np.asarray(x))
  np.testing.assert_allclose(weights, MIX_WEIGHTS, atol=0.03)
  np.testing.assert_allclose(stds, MIX_STDS, rtol=0.12)


def test_samplers_with_guidance_and_thresholding_stay_in_range():
  """A denoise_fn built by make_denoise_fn (CFG + dynamic thresholding) drives every sampler."""

  def model_fn(z, logsnr, drop):  # v-prediction of a point mass at +-0.9 by text / no text
    target = jnp.where(drop[:, None], -0.9, 0.9) * jnp.ones_like(z)
    eps = gaussian.eps_from_x(z=z, x=target, logsnr=logsnr)
    return gaussian.v_from_x_eps(x=target, eps=eps, logsnr=logsnr)

  denoise = guidance.make_denoise_fn(
    model_fn=model_fn, objective='v', guidance_scale=3.0, thresholding='dynamic'
  )
  logsnrs = schedules.logsnr_grid(schedules.get_schedule('cosine'), steps=10)
  for name in samplers.SAMPLERS:
    x = samplers.sample(
      name, denoise_fn=denoise, logsnrs=logsnrs, shape=(8, 4), rng=jax.random.key(0)
    )
    x = np.asarray(x)
    # The last step returns the thresholded x0 estimate (slack: f32 rounding); without
    # thresholding, CFG 3 on targets +-0.9 overshoots 1 by far more.
    assert np.all(np.abs(x) <= 1.0 + 1e-6), name
    assert np.all(x > 0.9), name  # guidance pushes toward the conditional mode and beyond


def test_unknown_sampler_rejected():
  with pytest.raises(ValueError, match='dpmpp_2m'):
    samplers.sample(
      'euler_a',
      denoise_fn=mixture_denoiser,
      logsnrs=jnp.zeros(3),
      shape=(1, 2),
      rng=jax.random.key(0),
    )
