"""Samplers over a denoiser, each one `lax.fori_loop`, deterministic given a PRNG key.

Every sampler takes `denoise_fn(z [B, ...], logsnr [B]) -> x0 estimate` (guidance and
thresholding live inside it, see guidance.make_denoise_fn) and a grid `logsnrs` [N + 1],
increasing from pure noise (logsnrs[0]) to clean (logsnrs[N]); N is the number of steps.
The sampler returns the sample at logsnrs[N].
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import gaussian

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
SAMPLERS = ('ddpm', 'ddim', 'dpmpp_2m', 'heun')


def _full(logsnr: jnp.ndarray, batch: int) -> jnp.ndarray:
  return jnp.full((batch,), logsnr, jnp.float32)


def _init(rng: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jnp.ndarray]:
  rng, init_rng = jax.random.split(rng)
  return rng, jax.random.normal(init_rng, shape, jnp.float32)


def sample_ddim(
  *,
  denoise_fn: DenoiseFn,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
  eta: float = 0.0,
) -> jnp.ndarray:
  """DDIM (Song et al. 2021). From t to s, with x = denoise(z_t), eps = (z_t - alpha_t x) / sigma_t:

    c^2 = eta^2 (1 - snr_t / snr_s) sigma_s^2
    z_s = alpha_s x + sqrt(sigma_s^2 - c^2) eps + c noise
  eta = 0 is the deterministic ODE sampler; eta = 1 matches the ancestral sampler's variance.
  """
  rng, z = _init(rng, shape)
  steps, batch = logsnrs.shape[0] - 1, shape[0]

  def body(i, carry):
    z, rng = carry
    logsnr_t = _full(logsnrs[i], batch)
    x = denoise_fn(z, logsnr_t)
    eps = gaussian.eps_from_x(z=z, x=x, logsnr=logsnr_t)
    alpha_s, sigma_s = gaussian.alpha_sigma(logsnrs[i + 1])
    c2 = eta**2 * -jnp.expm1(logsnrs[i] - logsnrs[i + 1]) * sigma_s**2
    rng, step_rng = jax.random.split(rng)
    noise = jax.random.normal(step_rng, shape, jnp.float32)
    z = alpha_s * x + jnp.sqrt(jnp.maximum(sigma_s**2 - c2, 0.0)) * eps + jnp.sqrt(c2) * noise
    return z, rng

  z, _ = jax.lax.fori_loop(0, steps, body, (z, rng))
  return z


def sample_ancestral(
  *,
  denoise_fn: DenoiseFn,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
) -> jnp.ndarray:
  """Ancestral sampling (DDPM, Ho et al. 2020): z_s ~ q(z_s | z_t, x = denoise(z_t)).

  The last step returns the posterior mean (no noise added).
  """
  rng, z = _init(rng, shape)
  steps, batch = logsnrs.shape[0] - 1, shape[0]

  def body(i, carry):
    z, rng = carry
    logsnr_t, logsnr_s = _full(logsnrs[i], batch), _full(logsnrs[i + 1], batch)
    x = denoise_fn(z, logsnr_t)
    mean, var = gaussian.posterior(z_t=z, x=x, logsnr_t=logsnr_t, logsnr_s=logsnr_s)
    rng, step_rng = jax.random.split(rng)
    noise = jax.random.normal(step_rng, shape, jnp.float32)
    noise_scale = jnp.where(i == steps - 1, 0.0, 1.0)
    return mean + noise_scale * jnp.sqrt(var) * noise, rng

  z, _ = jax.lax.fori_loop(0, steps, body, (z, rng))
  return z


def sample_dpmpp_2m(
  *,
  denoise_fn: DenoiseFn,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
  lower_order_final: bool = True,
) -> jnp.ndarray:
  """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in the data prediction.

  With lambda = logsnr / 2 = log(alpha / sigma), h_i = lambda_{i+1} - lambda_i, x_i = denoise(z_i):
    D_i = x_i                                               (first step)
    D_i = (1 + 1 / (2 r_i)) x_i - 1 / (2 r_i) x_{i-1},  r_i = h_{i-1} / h_i   (later steps)
    z_{i+1} = (sigma_{i+1} / sigma_i) z_i - alpha_{i+1} expm1(-h_i) D_i
  The final step is first order when lower_order_final (stabler at few steps), and so is any step
  where h_i or h_{i-1} is 0 (equal consecutive log-SNRs, e.g. a grid clipped at logsnr_max).
  """
  _, z = _init(rng, shape)
  steps, batch = logsnrs.shape[0] - 1, shape[0]
  lambdas = logsnrs / 2.0

  def body(i, carry):
    z, x_prev = carry
    x = denoise_fn(z, _full(logsnrs[i], batch))
    h = lambdas[i + 1] - lambdas[i]
    h_prev = lambdas[i] - lambdas[jnp.maximum(i - 1, 0)]
    # Two equal consecutive log-SNRs (a grid clipped at logsnr_min/max) make h or h_prev 0 and
    # r 0 or inf: such a step is first order (a zero-length one leaves z unchanged).
    first_order = (i == 0) | (lower_order_final & (i == steps - 1)) | (h <= 0) | (h_prev <= 0)
    half_inv_r = jnp.where(first_order, 0.0, 0.5 * h / jnp.where(first_order, 1.0, h_prev))
    d = jnp.where(first_order, x, (1.0 + half_inv_r) * x - half_inv_r * x_prev)
    _, sigma_t = gaussian.alpha_sigma(logsnrs[i])
    alpha_s, sigma_s = gaussian.alpha_sigma(logsnrs[i + 1])
    z = (sigma_s / sigma_t) * z - alpha_s * jnp.expm1(-h) * d
    return z, x

  z, _ = jax.lax.fori_loop(0, steps, body, (z, jnp.zeros(shape, jnp.float32)))
  return z


def sample_heun(
  *,
  denoise_fn: DenoiseFn,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
) -> jnp.ndarray:
  """Heun's second-order ODE sampler (Karras et al. 2022, EDM), in variance-exploding form.

  y = z / alpha, s = sigma / alpha = exp(-logsnr / 2); dy/ds = (y - D(y; s)) / s with
  D(y; s) = denoise(alpha y, logsnr). Euler predictor, trapezoidal corrector. The last step is
  Euler only (as EDM does toward s = 0), and so is the first: from pure noise s falls from
  exp(-logsnr_min / 2) (~2e4) by orders of magnitude, where the corrector would amplify the
  denoiser's change by ds / s; an Euler step in this form is exactly a DDIM step, exact in
  that regime. 2N - 2 network calls for N >= 2 steps.
  """
  _, z = _init(rng, shape)
  steps, batch = logsnrs.shape[0] - 1, shape[0]
  s_grid = jnp.exp(-logsnrs / 2.0)

  def deriv(y, i):
    alpha, _ = gaussian.alpha_sigma(logsnrs[i])
    return (y - denoise_fn(alpha * y, _full(logsnrs[i], batch))) / s_grid[i]

  def body(i, y):
    ds = s_grid[i + 1] - s_grid[i]
    d = deriv(y, i)
    y_euler = y + ds * d

    def corrected(_):
      return y + ds * 0.5 * (d + deriv(y_euler, i + 1))

    return jax.lax.cond((i > 0) & (i < steps - 1), corrected, lambda _: y_euler, None)

  alpha_0, _ = gaussian.alpha_sigma(logsnrs[0])
  y = jax.lax.fori_loop(0, steps, body, z / alpha_0)
  alpha_n, _ = gaussian.alpha_sigma(logsnrs[-1])
  return alpha_n * y


def sample(
  name: str,
  *,
  denoise_fn: DenoiseFn,
  logsnrs: jnp.ndarray,
  shape: tuple[int, ...],
  rng: jax.Array,
  eta: float = 0.0,
) -> jnp.ndarray:
  """Dispatch by sampler name: 'ddpm' | 'ddim' | 'dpmpp_2m' | 'heun'."""
  kwargs = dict(denoise_fn=denoise_fn, logsnrs=logsnrs, shape=shape, rng=rng)
  if name == 'ddpm':
    return sample_ancestral(**kwargs)
  if name == 'ddim':
    return sample_ddim(**kwargs, eta=eta)
  if name == 'dpmpp_2m':
    return sample_dpmpp_2m(**kwargs)
  if name == 'heun':
    return sample_heun(**kwargs)
  raise ValueError(f"Unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}.")
