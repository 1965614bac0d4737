"""Sampling one cascade stage, and chaining stages: base -> sr256 -> sr1024.

Each stage's whole sampling loop is one jit-compiled function (a `lax.fori_loop` inside the
sampler), with classifier-free guidance batched as [cond; uncond] in one forward pass.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from imagen_jax import stage
from imagen_jax.diffusion import guidance, samplers, schedules


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """Every knob of one stage's sampling."""

  sampler: str = 'dpmpp_2m'  # 'ddpm' | 'ddim' | 'dpmpp_2m' | 'heun'
  steps: int = 25
  grid: str = 'auto'  # 'quad' | 'time' | 'logsnr' | 'karras'; 'auto': karras for heun, else quad
  guidance: float = 5.0
  thresholding: str = 'dynamic'  # 'dynamic' | 'static' | 'none'
  dynamic_percentile: float = 0.995
  dynamic_max: float = 0.0  # upper clamp on the dynamic threshold (>= 1); 0: none
  aug_level: float = 0.2  # SR stages: noise-conditioning augmentation level
  eta: float = 0.0  # DDIM only

  def __post_init__(self):
    if self.sampler not in samplers.SAMPLERS:
      raise ValueError(f"sampler must be one of {samplers.SAMPLERS}, got '{self.sampler}'.")
    if self.grid != 'auto' and self.grid not in schedules.SPACINGS:
      raise ValueError(f"grid must be 'auto' or one of {schedules.SPACINGS}, got '{self.grid}'.")
    if self.steps < 1:
      raise ValueError(f'steps must be a positive integer, got {self.steps}.')
    if self.guidance < 0:
      raise ValueError(f'guidance must be >= 0 (1 = no guidance), got {self.guidance}.')
    if self.dynamic_max != 0.0 and self.dynamic_max < 1.0:
      raise ValueError(f'dynamic_max must be 0 (no clamp) or >= 1, got {self.dynamic_max}.')
    if not 0.0 <= self.aug_level <= 1.0:
      raise ValueError(f'aug_level must be in [0, 1], got {self.aug_level}.')

  @property
  def spacing(self) -> str:
    """The grid spacing this sampling uses ('auto' resolved by sampler)."""
    return schedules.default_spacing(self.sampler) if self.grid == 'auto' else self.grid

  def logsnrs(self, config: ml_collections.ConfigDict) -> jax.Array:
    """The sampling grid [steps + 1] on the stage's schedule, noise to clean."""
    return schedules.logsnr_grid(stage.schedule(config), steps=self.steps, spacing=self.spacing)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> 'SamplingOptions':
    s = config.sample
    fields = dict(
      sampler=s.sampler,
      steps=int(s.steps),
      grid=s.get('grid', 'auto'),
      guidance=float(s.guidance),
      thresholding=s.thresholding,
      dynamic_percentile=float(s.dynamic_percentile),
      dynamic_max=float(s.dynamic_max),
      aug_level=float(s.aug_level),
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**fields)


def make_stage_sampler(
  config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, options: SamplingOptions
) -> Callable[..., jax.Array]:
  """A jitted fn(params, text_embs [B,L,D], text_mask [B,L], rng, lowres=None) -> [B,H,W,3].

  Images come out in [-1, 1] (with thresholding). SR stages take `lowres` [B, h, w, 3] from the
  previous stage; it is upsampled and noise-augmented to `options.aug_level`.
  """
  resolution = int(config.data.resolution)
  is_sr = stage.is_super_resolution(config)
  aug_schedule = stage.aug_schedule(config) if is_sr else None
  logsnrs = options.logsnrs(config)
  objective = config.diffusion.objective

  @jax.jit
  def sample_fn(params, text_embs, text_mask, rng, lowres=None):
    batch = text_embs.shape[0]
    shape = (batch, resolution, resolution, 3)
    aug_rng, sample_rng = jax.random.split(rng)
    lowres_aug = aug_level = None
    if is_sr:
      if lowres is None:
        raise ValueError('A super-resolution stage needs the previous stage images (lowres).')
      up = stage.upsample_lowres(lowres, resolution=resolution)
      lowres_aug, aug_level = guidance.noise_condition_aug(
        lowres=up,
        aug_level=options.aug_level,
        noise=jax.random.normal(aug_rng, up.shape),
        schedule=aug_schedule,
      )
    model_fn = stage.make_model_fn(
      graphdef,
      params,
      text_embs=text_embs,
      text_mask=text_mask,
      lowres=lowres_aug,
      aug_level=aug_level,
    )
    denoise = guidance.make_denoise_fn(
      model_fn=model_fn,
      objective=objective,
      guidance_scale=options.guidance,
      thresholding=options.thresholding,
      percentile=options.dynamic_percentile,
      max_threshold=options.dynamic_max or jnp.inf,
    )
    images = samplers.sample(
      options.sampler,
      denoise_fn=denoise,
      logsnrs=logsnrs,
      shape=shape,
      rng=sample_rng,
      eta=options.eta,
    )
    return jnp.clip(images, -1.0, 1.0)

  return sample_fn


@dataclasses.dataclass
class Stage:
  """A restored stage ready to sample: its config, graph, (EMA) params and options."""

  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: nnx.State
  options: SamplingOptions

  @functools.cached_property
  def sample_fn(self):
    return make_stage_sampler(self.config, self.graphdef, self.options)


def run_cascade(
  stages: Sequence[Stage],
  *,
  text_embs: Sequence[jax.Array],
  text_mask: Sequence[jax.Array],
  rng: jax.Array,
) -> list[jax.Array]:
  """Images of every stage in order; text_embs[i]/text_mask[i] are those of stage i's encoder."""
  outputs, lowres = [], None
  for i, st in enumerate(stages):
    stage_rng = jax.random.fold_in(rng, i)
    lowres = st.sample_fn(st.params, text_embs[i], text_mask[i], stage_rng, lowres)
    outputs.append(lowres)
  return outputs
