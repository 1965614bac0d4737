"""Denoising training loss over any model_fn(z, logsnr) -> prediction."""

from collections.abc import Callable

import jax.numpy as jnp

from imagen_jax.diffusion import gaussian


def loss_weight(
  *, logsnr: jnp.ndarray, objective: str, weighting: str, min_snr_gamma: float = 5.0
) -> jnp.ndarray:
  """Per-example weight of the MSE in the objective's own space. Shape of logsnr.

  'min_snr' (Hang et al. 2023) makes every objective equal to an x0-space MSE weighted by
  min(snr, gamma):  eps: min(snr, g) / snr;  v: min(snr, g) / (snr + 1);  x0: min(snr, g).
  'none' weights every example by 1.
  """
  if weighting == 'none':
    return jnp.ones_like(logsnr, jnp.float32)
  if weighting != 'min_snr':
    raise ValueError(f"Unknown loss weighting '{weighting}'; choose 'min_snr' or 'none'.")
  snr = jnp.exp(jnp.asarray(logsnr, jnp.float32))
  clipped = jnp.minimum(snr, min_snr_gamma)
  if objective == 'eps':
    return clipped / snr
  if objective == 'v':
    return clipped / (snr + 1.0)
  if objective == 'x0':
    return clipped
  raise ValueError(f"Unknown objective '{objective}'; choose 'eps', 'v' or 'x0'.")


def diffusion_loss(
  *,
  model_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
  x: jnp.ndarray,
  logsnr: jnp.ndarray,
  noise: jnp.ndarray,
  objective: str = 'v',
  weighting: str = 'min_snr',
  min_snr_gamma: float = 5.0,
) -> jnp.ndarray:
  """Per-example loss, shape [B]:

    z = alpha x + sigma eps,   L = w(logsnr) * mean_{pixels} (model_fn(z, logsnr) - target)^2
  with target = eps, v = alpha eps - sigma x, or x, by objective.
  """
  z = gaussian.q_sample(x=x, logsnr=logsnr, noise=noise)
  pred = model_fn(z, logsnr).astype(jnp.float32)
  target = gaussian.target_for(objective=objective, x=x, eps=noise, logsnr=logsnr)
  mse = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x.ndim)))  # [B]
  weight = loss_weight(
    logsnr=logsnr, objective=objective, weighting=weighting, min_snr_gamma=min_snr_gamma
  )
  return weight * mse
