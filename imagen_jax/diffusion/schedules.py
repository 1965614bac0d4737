"""Continuous-time log-SNR schedules: t in [0, 1] -> logsnr(t), decreasing in t.

Every schedule clips its output to [logsnr_min, logsnr_max] so that alpha and sigma stay
representable at both ends of the time interval.
"""

import functools
import math
from collections.abc import Callable

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def logsnr_cosine(
  t: jnp.ndarray,
  *,
  offset: float = 0.008,
  logsnr_min: float = -20.0,
  logsnr_max: float = 20.0,
) -> jnp.ndarray:
  """Cosine schedule (Nichol & Dhariwal 2021).

  alpha_bar(t) = f(t) / f(0),  f(t) = cos^2(u(t)),  u(t) = pi/2 * (t + offset) / (1 + offset)
  logsnr(t) = log(alpha_bar / (1 - alpha_bar))
            = 2 log cos u - log(sin(u - u0)) - log(sin(u + u0)),  u0 = u(0),
  using cos^2 u0 - cos^2 u = sin(u - u0) sin(u + u0), with u - u0 computed as
  pi/2 * t / (1 + offset): 0 at t = 0, so logsnr +inf there. (Subtracting u0 from u in float32
  left 4e-10 at t = 0, logsnr 24.5, which the resolution shift moved below logsnr_max: hence the
  direct form.) Clipped to [logsnr_min, logsnr_max].
  """
  t = jnp.asarray(t, jnp.float32)
  u0 = jnp.pi / 2 * offset / (1 + offset)
  u = jnp.pi / 2 * (t + offset) / (1 + offset)
  cos_u = jnp.maximum(jnp.cos(u), 1e-30)  # cos(pi/2) rounds below 0 in float32
  u_minus_u0 = jnp.pi / 2 * t / (1 + offset)
  logsnr = 2 * jnp.log(cos_u) - jnp.log(jnp.sin(u_minus_u0)) - jnp.log(jnp.sin(u + u0))
  return jnp.clip(logsnr, logsnr_min, logsnr_max)


def logsnr_linear(
  t: jnp.ndarray,
  *,
  logsnr_min: float = -20.0,
  logsnr_max: float = 20.0,
) -> jnp.ndarray:
  """Continuous version of the DDPM linear beta schedule (Kingma et al. 2021, VDM).

  logsnr(t) = -log(expm1(1e-4 + 10 t^2)); clipped to [logsnr_min, logsnr_max].
  """
  t = jnp.asarray(t, jnp.float32)
  return jnp.clip(-jnp.log(jnp.expm1(1e-4 + 10.0 * t**2)), logsnr_min, logsnr_max)


def logsnr_shifted_cosine(
  t: jnp.ndarray,
  *,
  resolution: int,
  base_resolution: int = 64,
  logsnr_min: float = -20.0,
  logsnr_max: float = 20.0,
) -> jnp.ndarray:
  """Resolution-shifted cosine ("simple diffusion", Hoogeboom et al. 2023).

  logsnr(t) = logsnr_cosine(t) + 2 log(base_resolution / resolution); clipped.
  Higher resolutions get a noisier schedule, since averaging pixels raises the SNR.
  """
  shift = 2.0 * jnp.log(base_resolution / resolution)
  unclipped = logsnr_cosine(t, logsnr_min=-jnp.inf, logsnr_max=jnp.inf)
  return jnp.clip(unclipped + shift, logsnr_min, logsnr_max)


def get_schedule(
  name: str,
  *,
  resolution: int = 64,
  base_resolution: int = 64,
  logsnr_min: float = -20.0,
  logsnr_max: float = 20.0,
) -> Schedule:
  """Schedule by name: 'cosine' | 'linear' | 'shifted_cosine'. Returns t -> logsnr."""
  clip = dict(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
  if name == 'cosine':
    return functools.partial(logsnr_cosine, **clip)
  if name == 'linear':
    return functools.partial(logsnr_linear, **clip)
  if name == 'shifted_cosine':
    return functools.partial(
      logsnr_shifted_cosine, resolution=resolution, base_resolution=base_resolution, **clip
    )
  raise ValueError(f"Unknown schedule '{name}'; choose 'cosine', 'linear' or 'shifted_cosine'.")


SPACINGS = ('quad', 'time', 'logsnr', 'karras')

# Karras et al. (2022) sample between sigma = 80 and 0.002 (s = sigma / alpha here): a 'karras'
# grid keeps its ends inside that range, logsnr in [-8.76, 12.43], so that with rho = 7 its steps
# are not spent in the [-20, -8.8] stretch where the image is pure noise.
KARRAS_LOGSNR_MIN = -2.0 * math.log(80.0)
KARRAS_LOGSNR_MAX = -2.0 * math.log(0.002)


def logsnr_grid(
  schedule: Schedule, *, steps: int, spacing: str = 'quad', rho: float = 7.0
) -> jnp.ndarray:
  """Sampling grid [steps + 1], increasing from schedule(1) (noise) to +inf (the clean image).

  The network is called at the first `steps` points; the last one is the clean end, sigma 0
  (logsnr +inf), so every sampler's last step returns its last x0 estimate as the image, as
  EDM's grid ends at sigma 0 and DDIM's at alpha 1. It used to be schedule(0), and the image
  kept that point's noise: sigma 0.01 of the predicted noise (1.3 grey levels) with the
  `linear` schedule, 4.5e-5 with the cosine's logsnr_max of 20.

  The grid is a sampling choice, separate from the training schedule: the model is conditioned
  on log-SNR, so any increasing grid inside the trained range works. The last x0 estimate
  carries its error (amplified by guidance) scaled by the noise s = sigma / alpha =
  exp(-logsnr / 2) at that call, so the spacing decides how much of it shows. Each spacing
  gives steps + 1 points from schedule(1) to schedule(0), the last of which is then replaced by
  +inf. With the unshifted cosine and 25 steps:
  'quad' (DDIM's quadratic spacing, the default): logsnr at t_i = (1 - i / steps)^2. Uniform
    near the noise end, crowded near the clean end: last call at logsnr ~9.6 (s ~0.008).
  'time': logsnr at t = 1, 1 - 1/steps, ..., 0: last call at logsnr ~5.2 (s ~0.07), which
    returned 25-step DPM-Solver++ samples of an eps model as colour noise.
  'logsnr': uniform in logsnr between the schedule's ends: last call at 18.4 for ends +-20, but
    half of the steps below logsnr 0.
  'karras' (Karras et al. 2022, for Heun): s uniform in s^(1/rho),
    s_i = (s_max^(1/rho) + i / steps (s_min^(1/rho) - s_max^(1/rho)))^rho, with the ends
    clipped to [KARRAS_LOGSNR_MIN, KARRAS_LOGSNR_MAX] (sigma 80 .. 0.002): last call at ~10.6.
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}.')
  if spacing not in SPACINGS:
    raise ValueError(f"Unknown grid spacing '{spacing}'; choose one of {', '.join(SPACINGS)}.")
  return _spaced(schedule, steps, spacing, rho).at[-1].set(jnp.inf)


def _spaced(schedule: Schedule, steps: int, spacing: str, rho: float) -> jnp.ndarray:
  """`steps + 1` points of the spacing from schedule(1) to schedule(0) (karras: clipped)."""
  if spacing == 'quad':
    return schedule(jnp.square(jnp.linspace(1.0, 0.0, steps + 1)))
  if spacing == 'time':
    return schedule(jnp.linspace(1.0, 0.0, steps + 1))
  ends = schedule(jnp.asarray([1.0, 0.0]))
  frac = jnp.linspace(0.0, 1.0, steps + 1)
  if spacing == 'logsnr':
    return ends[0] + frac * (ends[1] - ends[0])
  ends = jnp.clip(ends, KARRAS_LOGSNR_MIN, KARRAS_LOGSNR_MAX)
  root_max, root_min = jnp.exp(-ends[0] / (2.0 * rho)), jnp.exp(-ends[1] / (2.0 * rho))
  return -2.0 * rho * jnp.log(root_max + frac * (root_min - root_max))


def default_spacing(sampler: str) -> str:
  """The grid a sampler uses unless told otherwise: 'karras' for Heun (its grid in EDM), else
  'quad'. They put the last of 25 calls at logsnr 10.6 and 9.6 on the unshifted cosine."""
  return 'karras' if sampler == 'heun' else 'quad'
