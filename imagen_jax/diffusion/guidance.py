"""Classifier-free guidance, x0 thresholding, and noise-conditioning augmentation."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import gaussian, schedules

# model_fn(z [N, ...], logsnr [N], drop_text [N] bool) -> prediction [N, ...]
CondModelFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
# denoise_fn(z [B, ...], logsnr [B]) -> x0 estimate [B, ...]
DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def classifier_free_guidance(
  *, pred_cond: jnp.ndarray, pred_uncond: jnp.ndarray, scale: float | jnp.ndarray
) -> jnp.ndarray:
  """pred = pred_cond + (scale - 1) (pred_cond - pred_uncond).

  Equal to pred_uncond + scale (pred_cond - pred_uncond); written this way so that scale 1
  returns pred_cond exactly. Linear in the prediction, so it means the same for eps, v and x0.
  """
  return pred_cond + (scale - 1.0) * (pred_cond - pred_uncond)


def guided_prediction(
  *, model_fn: CondModelFn, z: jnp.ndarray, logsnr: jnp.ndarray, scale: float | jnp.ndarray
) -> jnp.ndarray:
  """Guided prediction from ONE batched forward pass over [z; z] with text kept / dropped.

  The model sees 2B examples: the first B conditional, the last B with text dropped.
  A Python scale of exactly 1 skips the unconditional half.
  """
  batch = z.shape[0]
  if isinstance(scale, int | float) and scale == 1.0:
    return model_fn(z, logsnr, jnp.zeros((batch,), bool))
  drop = jnp.concatenate([jnp.zeros((batch,), bool), jnp.ones((batch,), bool)])
  pred = model_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]), drop)
  return classifier_free_guidance(pred_cond=pred[:batch], pred_uncond=pred[batch:], scale=scale)


def static_threshold(x0: jnp.ndarray) -> jnp.ndarray:
  """x0 -> clip(x0, -1, 1)."""
  return jnp.clip(x0, -1.0, 1.0)


def dynamic_threshold(
  x0: jnp.ndarray, *, percentile: float = 0.995, max_threshold: float = jnp.inf
) -> jnp.ndarray:
  """Dynamic thresholding (Saharia et al. 2022), per example:

    s = clip(quantile_p(|x0|), 1, max_threshold),   x0 -> clip(x0, -s, s) / s.
  Identity when every |x0| <= 1 (then s = 1); output always in [-1, 1].
  """
  flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
  s = jnp.quantile(flat, percentile, axis=1)
  s = jnp.clip(s, 1.0, max_threshold)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def threshold(
  x0: jnp.ndarray, *, method: str, percentile: float = 0.995, max_threshold: float = jnp.inf
) -> jnp.ndarray:
  """Apply 'dynamic' | 'static' | 'none' thresholding to an x0 estimate."""
  if method == 'dynamic':
    return dynamic_threshold(x0, percentile=percentile, max_threshold=max_threshold)
  if method == 'static':
    return static_threshold(x0)
  if method == 'none':
    return x0
  raise ValueError(f"Unknown thresholding '{method}'; choose 'dynamic', 'static' or 'none'.")


def make_denoise_fn(
  *,
  model_fn: CondModelFn,
  objective: str,
  guidance_scale: float | jnp.ndarray = 1.0,
  thresholding: str = 'dynamic',
  percentile: float = 0.995,
  max_threshold: float = jnp.inf,
) -> DenoiseFn:
  """(z, logsnr) -> thresholded x0 estimate from a guided prediction of kind `objective`."""

  def denoise(z: jnp.ndarray, logsnr: jnp.ndarray) -> jnp.ndarray:
    pred = guided_prediction(model_fn=model_fn, z=z, logsnr=logsnr, scale=guidance_scale)
    x0 = gaussian.pred_to_x(pred=pred.astype(jnp.float32), z=z, logsnr=logsnr, objective=objective)
    return threshold(x0, method=thresholding, percentile=percentile, max_threshold=max_threshold)

  return denoise


def training_aug_levels(
  rng: jax.Array, *, batch_size: int, max_level: float, min_level: float = 0.0
) -> jnp.ndarray:
  """Per-example SR training augmentation levels ~ U[min_level, max_level], shape [B]."""
  return jax.random.uniform(rng, (batch_size,), minval=min_level, maxval=max_level)


def aug_schedule(
  logsnr_min: float = -20.0, logsnr_max: float = 20.0
) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """The augmentation schedule: level a in [0, 1] -> logsnr, the same for every stage.

  The continuous DDPM-linear schedule (schedules.logsnr_linear), as imagen-pytorch's low-res
  noise schedule: level 0.1 -> alpha 0.95, 0.2 -> 0.82, 0.3 -> 0.64, 0.5 -> 0.29. Independent of
  the stage's own diffusion schedule, so `--aug_level 0.2` is the same corruption on sr256 and
  sr1024 whatever their schedules are.
  """
  return functools.partial(schedules.logsnr_linear, logsnr_min=logsnr_min, logsnr_max=logsnr_max)


def noise_condition_aug(
  *,
  lowres: jnp.ndarray,
  aug_level: jnp.ndarray | float,
  noise: jnp.ndarray,
  schedule: Callable[[jnp.ndarray], jnp.ndarray],
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Noise-conditioning augmentation (Ho et al. 2021, Imagen): corrupt the low-res image.

    lowres_aug = alpha(s) lowres + sigma(s) noise,   logsnr = schedule(aug_level)
  aug_level is a level in [0, 1] (scalar -> same for all) and `schedule` the augmentation
  schedule (aug_schedule(), see stage.aug_schedule). Returns (lowres_aug, aug_level [B]); the
  model conditions on aug_level.
  """
  batch = lowres.shape[0]
  aug_level = jnp.broadcast_to(jnp.asarray(aug_level, jnp.float32), (batch,))
  augmented = gaussian.q_sample(x=lowres, logsnr=schedule(aug_level), noise=noise)
  return augmented, aug_level
