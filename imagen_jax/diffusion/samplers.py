"""Samplers over a denoiser, each one `lax.fori_loop`, deterministic given a PRNG key.

`rng` is one key for the batch, or one key per image (a key array [B], or its raw threefry key
data uint32 [B, 2]: `image_keys`). With per-image keys, image b's noise (the start, every
stochastic step, inpainting's projections and renoising) is drawn from rng[b] alone, so an
image does not depend on the batch it is sampled in: the same key gives the same image, up to
the float rounding of a network run at another batch size.

Every sampler takes `denoise_fn(z [B, ...], logsnr [B]) -> x0 estimate` (guidance and
thresholding live inside it, see guidance.make_denoise_fn) and a grid `logsnrs` [N + 1],
increasing from pure noise (logsnrs[0]) to clean (logsnrs[N]); N is the number of steps, and
the network is called at logsnrs[0..N-1] only. The sampler returns the sample at logsnrs[N]:
with schedules.logsnr_grid that is +inf (sigma 0), where every sampler's last step returns its
last x0 estimate; a finite logsnrs[N] (a grid made by hand) keeps that much noise.

Editing (image-to-image, inpainting) uses three optional arguments, the same for every sampler;
without them each sampler is exactly the plain loop:
  start, x_init  begin at grid index `start` from z = q_sample(x_init, logsnrs[start], eps)
                 instead of pure noise, and run only the steps start..N-1 (SDEdit, Meng et al.
                 2022); eps is the draw that plain sampling starts from, and start = 0 ignores
                 x_init, so it *is* plain sampling.
  project        project(z, k, rng) -> z, applied to the sample after every step, at grid index
                 k = i + 1 (inpainting: known region <- the original, noised to logsnrs[k]; see
                 known_region_projection).
  resample       RePaint (Lugmayr et al. 2022) with jump length 1: every step is taken
                 `resample` times; between two takes the projected sample is sent back to the
                 step's start by the forward process q(z_t | z_s) with fresh noise, so the
                 generated region is harmonised with the pasted known region. The loop over
                 the takes is a `lax.fori_loop` inside the step loop (still one compiled
                 program). Multistep DPM-Solver++: the first take of step i is second order
                 with the x0 estimate of step i - 1 as usual; the later takes start from a
                 renoised sample that left the trajectory that estimate belongs to, so they are
                 first order (a DDIM step; keeping the old estimate made the samples of the
                 mixture test 3x too wide at 10 takes), and the last take's estimate is the
                 history of step i + 1. Heun works in y = z / alpha: projection and renoising
                 convert to z and back.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import gaussian

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
# project(z [B, ...], k (grid index of z), rng) -> z with the known region replaced
ProjectFn = Callable[[jnp.ndarray, jnp.ndarray, jax.Array], jnp.ndarray]
SAMPLERS = ('ddpm', 'ddim', 'dpmpp_2m', 'heun')


def _full(logsnr: jnp.ndarray, batch: int) -> jnp.ndarray:
  return jnp.full((batch,), logsnr, jnp.float32)


def image_keys(key: jax.Array, indices) -> jax.Array:
  """Per-image keys [B]: fold_in(key, i) for each image number i in `indices` (a key array, or
  one key's raw data)."""
  key = as_keys(key)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


def as_keys(rng: jax.Array) -> jax.Array:
  """A typed key array: `rng` itself, or its raw threefry key data ([..., 2] uint32) wrapped."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))


def _each(fn: Callable[[jax.Array], Any], rng: jax.Array) -> Any:
  """fn(rng) for one key, fn mapped over the keys for per-image keys [B]."""
  return fn(rng) if rng.ndim == 0 else jax.vmap(fn)(rng)


def split(rng: jax.Array, num: int = 2) -> tuple[jax.Array, ...]:
  """jax.random.split for one key or per-image keys (each split alone): `num` keys like rng."""
  keys = _each(lambda k: jax.random.split(k, num), as_keys(rng))  # [num] or [B, num]
  return tuple(keys[..., j] for j in range(num))


def fold_in(rng: jax.Array, data) -> jax.Array:
  """jax.random.fold_in for one key or per-image keys (each key folded alone)."""
  return _each(lambda k: jax.random.fold_in(k, data), as_keys(rng))


def normal(rng: jax.Array, shape: tuple[int, ...]) -> jnp.ndarray:
  """float32 standard normal noise [B, ...]: from one key, or row b from rng[b] alone."""
  rng = as_keys(rng)
  if rng.ndim == 0:
    return jax.random.normal(rng, shape, jnp.float32)
  if rng.shape != shape[:1]:
    raise ValueError(f'{rng.shape[0]} per-image keys for a batch of {shape[0]} images.')
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(rng)


def _init(rng: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jnp.ndarray]:
  rng, init_rng = split(rng)
  return rng, normal(init_rng, shape)


def start_index(steps: int, strength: float) -> int:
  """Grid index where image-to-image at `strength` in (0, 1] starts: the last
  max(1, round(strength * steps)) of the `steps` steps are run (strength 1: all, from noise)."""
  if not 0.0 < strength <= 1.0:
    raise ValueError(f'strength must be in (0, 1], got {strength}.')
  return steps - min(steps, max(1, int(strength * steps + 0.5)))


def renoise(
  *, z_s: jnp.ndarray, logsnr_s: jnp.ndarray, logsnr_t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
  """A draw of the forward process q(z_t | z_s) from the cleaner s to the noisier t:

    z_t = (alpha_t / alpha_s) z_s + sigma_t sqrt(1 - snr_t / snr_s) noise
  (variance sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2); logsnr_t <= logsnr_s, scalars.
  """
  alpha_s, _ = gaussian.alpha_sigma(logsnr_s)
  alpha_t, sigma_t = gaussian.alpha_sigma(logsnr_t)
  scale = sigma_t * jnp.sqrt(jnp.maximum(-jnp.expm1(logsnr_t - logsnr_s), 0.0))
  return (alpha_t / alpha_s) * z_s + scale * noise


def known_region_projection(
  *, x_known: jnp.ndarray, mask: jnp.ndarray, logsnrs: jnp.ndarray
) -> ProjectFn:
  """Inpainting's projection: the known region (mask 0) of z at grid index k is replaced by
  q_sample(x_known, logsnrs[k], fresh noise), and at the last index N by x_known itself, so the
  known region of the sample equals x_known exactly. mask: 1 = generate, broadcast against z.
  """
  steps = logsnrs.shape[0] - 1
  repaint = mask > 0.5

  def project(z, k, rng):
    noise = normal(rng, z.shape)
    known = gaussian.q_sample(x=x_known, logsnr=_full(logsnrs[k], z.shape[0]), noise=noise)
    known = jnp.where(k == steps, x_known.astype(jnp.float32), known)
    return jnp.where(repaint, z, known)

  return project


# A step: (i, state, history, rng) -> (state at logsnrs[i + 1], history). The state is z for
# every sampler but Heun (y = z / alpha); the history is what a multistep method carries.
StepFn = Callable[[jnp.ndarray, jnp.ndarray, Any, jax.Array], tuple[jnp.ndarray, Any]]


def _run(
  step: StepFn,
  *,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
  history: Any = None,
  start: int = 0,
  x_init: jnp.ndarray | None = None,
  project: ProjectFn | None = None,
  resample: int = 1,
  to_z: Callable[[jnp.ndarray, Any], jnp.ndarray] = lambda state, k: state,
  from_z: Callable[[jnp.ndarray, Any], jnp.ndarray] = lambda z, k: z,
  forget: Callable[[Any], Any] = lambda history: history,
) -> jnp.ndarray:
  """The loop every sampler shares: steps start..N-1 of `step`, with the editing options.

  to_z / from_z convert the sampler's state at grid index k to z and back; `forget(history)` is
  the history a resampling take after the first starts with (see the module docstring).
  """
  steps, batch = logsnrs.shape[0] - 1, shape[0]
  if not 0 <= start < steps:
    raise ValueError(f'start must be in [0, {steps}) for {steps} steps, got {start}.')
  if resample < 1:
    raise ValueError(f'resample must be >= 1, got {resample}.')
  rng, z = _init(rng, shape)
  if x_init is not None and start > 0:
    z = gaussian.q_sample(x=x_init, logsnr=_full(logsnrs[start], batch), noise=z)
  state = from_z(z, start)

  def plain_body(i, carry):
    state, history, rng = carry
    rng, step_rng = split(rng)
    state, history = step(i, state, history, step_rng)
    return state, history, rng

  def edit_body(i, carry):
    state_t, history_t, rng = carry
    rng, step_rng = split(rng)

    def take(j, take_carry):
      state_in = take_carry[0]
      take_rng, project_rng, back_rng = split(fold_in(step_rng, j), 3)
      history_in = (
        history_t if resample == 1 else jax.lax.cond(j == 0, lambda h: h, forget, history_t)
      )
      state_s, history_s = step(i, state_in, history_in, take_rng)
      if project is not None:
        state_s = from_z(project(to_z(state_s, i + 1), i + 1, project_rng), i + 1)
      if resample == 1:
        return state_in, state_s, history_s
      noise = normal(back_rng, shape)
      z_t = renoise(
        z_s=to_z(state_s, i + 1), logsnr_s=logsnrs[i + 1], logsnr_t=logsnrs[i], noise=noise
      )
      return from_z(z_t, i), state_s, history_s

    if resample == 1:
      _, state_s, history_s = take(0, (state_t, state_t, history_t))
    else:
      _, state_s, history_s = jax.lax.fori_loop(0, resample, take, (state_t, state_t, history_t))
    return state_s, history_s, rng

  body = plain_body if project is None and resample == 1 else edit_body
  state, _, _ = jax.lax.fori_loop(start, steps, body, (state, history, rng))
  return to_z(state, steps)


def sample_ddim(
  *,
  denoise_fn: DenoiseFn,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
  eta: float = 0.0,
  **edit,
) -> jnp.ndarray:
  """DDIM (Song et al. 2021). From t to s, with x = denoise(z_t), eps = (z_t - alpha_t x) / sigma_t:

    c^2 = eta^2 (1 - snr_t / snr_s) sigma_s^2
    z_s = alpha_s x + sqrt(sigma_s^2 - c^2) eps + c noise
  eta = 0 is the deterministic ODE sampler; eta = 1 matches the ancestral sampler's variance.
  `edit`: start, x_init, project, resample (module docstring).
  """
  batch = shape[0]

  def step(i, z, history, step_rng):
    logsnr_t = _full(logsnrs[i], batch)
    x = denoise_fn(z, logsnr_t)
    eps = gaussian.eps_from_x(z=z, x=x, logsnr=logsnr_t)
    alpha_s, sigma_s = gaussian.alpha_sigma(logsnrs[i + 1])
    c2 = eta**2 * -jnp.expm1(logsnrs[i] - logsnrs[i + 1]) * sigma_s**2
    noise = normal(step_rng, shape)
    z = alpha_s * x + jnp.sqrt(jnp.maximum(sigma_s**2 - c2, 0.0)) * eps + jnp.sqrt(c2) * noise
    return z, history

  return _run(step, logsnrs=logsnrs, shape=shape, rng=rng, **edit)


def sample_ancestral(
  *,
  denoise_fn: DenoiseFn,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
  **edit,
) -> jnp.ndarray:
  """Ancestral sampling (DDPM, Ho et al. 2020): z_s ~ q(z_s | z_t, x = denoise(z_t)).

  The last step returns the posterior mean (no noise added). `edit`: module docstring.
  """
  steps, batch = logsnrs.shape[0] - 1, shape[0]

  def step(i, z, history, step_rng):
    logsnr_t, logsnr_s = _full(logsnrs[i], batch), _full(logsnrs[i + 1], batch)
    x = denoise_fn(z, logsnr_t)
    mean, var = gaussian.posterior(z_t=z, x=x, logsnr_t=logsnr_t, logsnr_s=logsnr_s)
    noise = normal(step_rng, shape)
    noise_scale = jnp.where(i == steps - 1, 0.0, 1.0)
    return mean + noise_scale * jnp.sqrt(var) * noise, history

  return _run(step, logsnrs=logsnrs, shape=shape, rng=rng, **edit)


def sample_dpmpp_2m(
  *,
  denoise_fn: DenoiseFn,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
  lower_order_final: bool = True,
  **edit,
) -> jnp.ndarray:
  """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in the data prediction.

  With lambda = logsnr / 2 = log(alpha / sigma), h_i = lambda_{i+1} - lambda_i, x_i = denoise(z_i):
    D_i = x_i                                               (first step)
    D_i = (1 + 1 / (2 r_i)) x_i - 1 / (2 r_i) x_{i-1},  r_i = h_{i-1} / h_i   (later steps)
    z_{i+1} = (sigma_{i+1} / sigma_i) z_i - alpha_{i+1} expm1(-h_i) D_i
  The final step is first order when lower_order_final (stabler at few steps), and so is any step
  where h_i or h_{i-1} is 0 (equal consecutive log-SNRs, e.g. a grid clipped at logsnr_max) or
  h_i is infinite (the step to the clean end, +inf: it returns D_i = x_i).
  The first step (at `start` for image-to-image) is first order; `edit`: module docstring.
  """
  steps, batch = logsnrs.shape[0] - 1, shape[0]
  lambdas = logsnrs / 2.0

  def step(i, z, history, step_rng):
    x_prev, has_prev = history  # the x0 estimate of step i - 1, and whether there is one
    x = denoise_fn(z, _full(logsnrs[i], batch))
    h = lambdas[i + 1] - lambdas[i]
    h_prev = lambdas[i] - lambdas[jnp.maximum(i - 1, 0)]
    # Two equal consecutive log-SNRs (a grid clipped at logsnr_min/max) make h or h_prev 0 and
    # r 0 or inf: such a step is first order (a zero-length one leaves z unchanged).
    first_order = ~has_prev | (lower_order_final & (i == steps - 1)) | (h <= 0) | (h_prev <= 0)
    first_order = first_order | jnp.isinf(h)
    half_inv_r = jnp.where(first_order, 0.0, 0.5 * h / jnp.where(first_order, 1.0, h_prev))
    d = jnp.where(first_order, x, (1.0 + half_inv_r) * x - half_inv_r * x_prev)
    _, sigma_t = gaussian.alpha_sigma(logsnrs[i])
    alpha_s, sigma_s = gaussian.alpha_sigma(logsnrs[i + 1])
    z = (sigma_s / sigma_t) * z - alpha_s * jnp.expm1(-h) * d
    return z, (x, jnp.ones((), bool))

  history = (jnp.zeros(shape, jnp.float32), jnp.zeros((), bool))  # first step: first order
  return _run(
    step,
    logsnrs=logsnrs,
    shape=shape,
    rng=rng,
    history=history,
    forget=lambda history: (history[0], jnp.zeros((), bool)),
    **edit,
  )


def sample_heun(
  *,
  denoise_fn: DenoiseFn,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
  **edit,
) -> jnp.ndarray:
  """Heun's second-order ODE sampler (Karras et al. 2022, EDM), in variance-exploding form.

  y = z / alpha, s = sigma / alpha = exp(-logsnr / 2); dy/ds = (y - D(y; s)) / s with
  D(y; s) = denoise(alpha y, logsnr). Euler predictor, trapezoidal corrector. The last step is
  Euler only (as EDM's; to s = 0 it returns D, on schedules.logsnr_grid's clean end), and so is
  the first: from pure noise s falls by orders of magnitude (from exp(-logsnr_min / 2) ~ 2e4 on
  the grids that start at logsnr_min, from 80 on the default Karras grid), where the corrector
  would amplify the denoiser's change by ds / s; an Euler step in this form
  is exactly a DDIM step, exact in that regime. 2N - 2 network calls for N >= 2 steps.
  `edit`: module docstring.
  """
  steps, batch = logsnrs.shape[0] - 1, shape[0]
  s_grid = jnp.exp(-logsnrs / 2.0)

  def alpha(k):
    return gaussian.alpha_sigma(logsnrs[k])[0]

  def deriv(y, i):
    return (y - denoise_fn(alpha(i) * y, _full(logsnrs[i], batch))) / s_grid[i]

  def step(i, y, history, step_rng):
    ds = s_grid[i + 1] - s_grid[i]
    d = deriv(y, i)
    y_euler = y + ds * d

    def corrected(_):
      return y + ds * 0.5 * (d + deriv(y_euler, i + 1))

    y = jax.lax.cond((i > 0) & (i < steps - 1), corrected, lambda _: y_euler, None)
    return y, history

  return _run(
    step,
    logsnrs=logsnrs,
    shape=shape,
    rng=rng,
    to_z=lambda y, k: alpha(k) * y,
    from_z=lambda z, k: z / alpha(k),
    **edit,
  )


def sample(
  name: str,
  *,
  denoise_fn: DenoiseFn,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
  eta: float = 0.0,
  start: int = 0,
  x_init: jnp.ndarray | None = None,
  project: ProjectFn | None = None,
  resample: int = 1,
) -> jnp.ndarray:
  """Dispatch by sampler name: 'ddpm' | 'ddim' | 'dpmpp_2m' | 'heun' (editing options: see the
  module docstring; their defaults give plain sampling)."""
  kwargs = dict(denoise_fn=denoise_fn, logsnrs=logsnrs, shape=shape, rng=rng)
  kwargs.update(start=start, x_init=x_init, project=project, resample=resample)
  if name == 'ddpm':
    return sample_ancestral(**kwargs)
  if name == 'ddim':
    return sample_ddim(**kwargs, eta=eta)
  if name == 'dpmpp_2m':
    return sample_dpmpp_2m(**kwargs)
  if name == 'heun':
    return sample_heun(**kwargs)
  raise ValueError(f"Unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}.")
