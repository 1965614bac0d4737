"""The Gaussian forward process, its posterior, and conversions among predictions.

All functions broadcast a per-example logsnr [B] against data [B, ...].
"""

import jax
import jax.numpy as jnp


def _bcast(v: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """[B] -> [B, 1, ..., 1] with like.ndim dims (scalars pass through)."""
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def alpha_sigma(logsnr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """alpha = sqrt(sigmoid(logsnr)), sigma = sqrt(sigmoid(-logsnr))."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def q_sample(*, x: jnp.ndarray, logsnr: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """Forward process q(z_t | x): z_t = alpha_t x + sigma_t eps."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, x))
  return alpha * x + sigma * noise


def posterior(
  *, z_t: jnp.ndarray, x: jnp.ndarray, logsnr_t: jnp.ndarray, logsnr_s: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """q(z_s | z_t, x) for s < t (logsnr_s > logsnr_t). Returns (mean, variance).

  With r = exp(logsnr_t - logsnr_s) = snr_t / snr_s < 1:
    mean = r (alpha_s / alpha_t) z_t + alpha_s (1 - r) x
    var  = (1 - r) sigma_s^2
  """
  logsnr_t, logsnr_s = _bcast(logsnr_t, x), _bcast(logsnr_s, x)
  alpha_t, _ = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  r = jnp.exp(logsnr_t - logsnr_s)
  one_minus_r = -jnp.expm1(logsnr_t - logsnr_s)
  mean = r * (alpha_s / alpha_t) * z_t + alpha_s * one_minus_r * x
  return mean, one_minus_r * sigma_s**2


def x_from_eps(*, z: jnp.ndarray, eps: jnp.ndarray, logsnr: jnp.ndarray) -> jnp.ndarray:
  """x = (z - sigma eps) / alpha."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, z))
  return (z - sigma * eps) / alpha


def eps_from_x(*, z: jnp.ndarray, x: jnp.ndarray, logsnr: jnp.ndarray) -> jnp.ndarray:
  """eps = (z - alpha x) / sigma."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, z))
  return (z - alpha * x) / sigma


def v_from_x_eps(*, x: jnp.ndarray, eps: jnp.ndarray, logsnr: jnp.ndarray) -> jnp.ndarray:
  """v = alpha eps - sigma x (Salimans & Ho 2022)."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, x))
  return alpha * eps - sigma * x


def x_from_v(*, z: jnp.ndarray, v: jnp.ndarray, logsnr: jnp.ndarray) -> jnp.ndarray:
  """x = alpha z - sigma v."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, z))
  return alpha * z - sigma * v


def eps_from_v(*, z: jnp.ndarray, v: jnp.ndarray, logsnr: jnp.ndarray) -> jnp.ndarray:
  """eps = sigma z + alpha v."""
  alpha, sigma = alpha_sigma(_bcast(logsnr, z))
  return sigma * z + alpha * v


def pred_to_x(
  *, pred: jnp.ndarray, z: jnp.ndarray, logsnr: jnp.ndarray, objective: str
) -> jnp.ndarray:
  """The x0 estimate from a network prediction of kind `objective` ('eps' | 'v' | 'x0')."""
  if objective == 'eps':
    return x_from_eps(z=z, eps=pred, logsnr=logsnr)
  if objective == 'v':
    return x_from_v(z=z, v=pred, logsnr=logsnr)
  if objective == 'x0':
    return pred
  raise ValueError(f"Unknown objective '{objective}'; choose 'eps', 'v' or 'x0'.")


def target_for(
  *, objective: str, x: jnp.ndarray, eps: jnp.ndarray, logsnr: jnp.ndarray
) -> jnp.ndarray:
  """Regression target of objective ('eps' | 'v' | 'x0') for data x and noise eps."""
  if objective == 'eps':
    return eps
  if objective == 'v':
    return v_from_x_eps(x=x, eps=eps, logsnr=logsnr)
  if objective == 'x0':
    return x
  raise ValueError(f"Unknown objective '{objective}'; choose 'eps', 'v' or 'x0'.")
