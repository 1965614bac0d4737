"""One cascade stage: its U-Net, its noise schedule, and the model_fn closure over conditioning.

Training (train_lib) and sampling (cascade) meet the model only through this module, so the
two always agree on how text, the low-res image and the augmentation level reach the U-Net.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from imagen_jax import device_memory
from imagen_jax.diffusion import guidance, schedules
from imagen_jax.models import unet


def model_config(config: ml_collections.ConfigDict) -> unet.UNetConfig:
  """The UNetConfig of a stage config (its `model` section)."""
  return unet.config_from_dict(config.model.to_dict())


def is_super_resolution(config: ml_collections.ConfigDict) -> bool:
  return int(config.data.lowres_resolution) > 0


def schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  """t -> logsnr for this stage (the SR stages may use the resolution-shifted cosine)."""
  d = config.diffusion
  return schedules.get_schedule(
    d.schedule,
    resolution=config.data.resolution,
    base_resolution=d.shift_base,
    logsnr_min=d.logsnr_min,
    logsnr_max=d.logsnr_max,
  )


AUG_SCHEDULES = ('linear', 'stage')


def aug_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  """Level -> logsnr of noise-conditioning augmentation (SR stages).

  'linear' (the default): guidance.aug_schedule(), the same for every stage. 'stage': the stage's
  own diffusion schedule, what runs made before the field existed trained with; a config without
  `diffusion.aug_schedule` is such a run, so its checkpoints still sample as they were trained.
  """
  name = config.diffusion.get('aug_schedule', 'stage')
  if name == 'linear':
    return guidance.aug_schedule()
  if name == 'stage':
    return schedule(config)
  raise ValueError(
    f"Unknown diffusion.aug_schedule '{name}'; choose one of {', '.join(AUG_SCHEDULES)}."
  )


def abstract_model(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract params) without allocating anything."""
  model = nnx.eval_shape(lambda: unet.UNet(model_config(config), rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def params_bytes(config: ml_collections.ConfigDict) -> int:
  """Bytes of the stage's params, from their abstract shapes (JAX's backend is not started)."""
  return device_memory.tree_bytes(abstract_model(config)[1])


def init_params(config: ml_collections.ConfigDict, rng: jax.Array) -> nnx.State:
  """Freshly initialised params (call under jax.jit with out_shardings to shard at birth)."""
  model = unet.UNet(model_config(config), rngs=nnx.Rngs(rng))
  return nnx.state(model, nnx.Param)


def upsample_lowres(lowres: jnp.ndarray, *, resolution: int) -> jnp.ndarray:
  """[B, h, w, C] -> [B, resolution, resolution, C], bicubic, clipped back to [-1, 1]."""
  b, _, _, c = lowres.shape
  up = jax.image.resize(lowres, (b, resolution, resolution, c), method='bicubic')
  return jnp.clip(up, -1.0, 1.0)


def make_model_fn(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  *,
  text_embs: jnp.ndarray,
  text_mask: jnp.ndarray,
  lowres: jnp.ndarray | None = None,
  aug_level: jnp.ndarray | None = None,
  drop_text: jnp.ndarray | None = None,
) -> Callable[..., jnp.ndarray]:
  """model_fn(z [N,...], logsnr [N], drop [N] | None) over a batch of B conditioning rows.

  N may be a multiple of B (classifier-free guidance runs [cond; uncond] as one batch of 2B):
  the conditioning is tiled to N rows. `drop` (or `drop_text` when drop is None) replaces the
  text by the learned null embedding for those rows.
  """
  model = nnx.merge(graphdef, params)
  batch = text_embs.shape[0]

  def model_fn(z, logsnr, drop=None):
    reps = z.shape[0] // batch
    tiled = lambda v: None if v is None else jnp.concatenate([v] * reps) if reps > 1 else v
    drop = drop_text if drop is None else drop
    return model(
      z,
      logsnr,
      tiled(text_embs),
      tiled(text_mask),
      lowres=tiled(lowres),
      aug_level=tiled(aug_level),
      drop_text=drop,
    )

  return model_fn
