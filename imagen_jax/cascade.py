"""Sampling one cascade stage, and chaining stages: base -> sr256 -> sr1024.

Each stage's whole sampling loop is one jit-compiled function (a `lax.fori_loop` inside the
sampler), with classifier-free guidance batched as [cond; uncond] in one forward pass.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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
  # Editing (imagen_jax.editing): image-to-image runs the last round(strength * steps) steps
  # from the init image noised to that grid point (1: all, from pure noise); inpainting takes
  # every step `resample` times (RePaint). Both need the init image given to the sampler.
  strength: float = 1.0
  resample: int = 1

  def __post_init__(self):
    if self.sampler not in samplers.SAMPLERS:
      raise ValueError(f"sampler must be one of {samplers.SAMPLERS}, got '{self.sampler}'.")
    if self.grid != 'auto' and self.grid not in schedules.SPACINGS:
      raise ValueError(f"grid must be 'auto' or one of {schedules.SPACINGS}, got '{self.grid}'.")
    if self.steps < 1:
      raise ValueError(f'steps must be a positive integer, got {self.steps}.')
    if not 0.0 <= self.guidance < math.inf:  # also refuses NaN
      raise ValueError(
        f'guidance must be a finite number >= 0 (1 = no guidance), got {self.guidance}.'
      )
    if not 0.0 < self.dynamic_percentile <= 1.0:
      raise ValueError(
        'dynamic_percentile is a quantile in (0, 1] (0.995 thresholds at the 99.5th percentile '
        f'of |x0|), got {self.dynamic_percentile}.'
      )
    if not (self.dynamic_max == 0.0 or self.dynamic_max >= 1.0):  # also refuses NaN
      raise ValueError(f'dynamic_max must be 0 (no clamp) or >= 1, got {self.dynamic_max}.')
    if self.dynamic_max == math.inf:  # no clamp, recorded as 0 (JSON has no infinity)
      object.__setattr__(self, 'dynamic_max', 0.0)
    if not 0.0 <= self.aug_level <= 1.0:
      raise ValueError(f'aug_level must be in [0, 1], got {self.aug_level}.')
    if not 0.0 < self.strength <= 1.0:  # also refuses NaN
      raise ValueError(f'strength must be in (0, 1], got {self.strength}.')
    if self.resample < 1:
      raise ValueError(f'resample must be a positive integer, got {self.resample}.')

  @property
  def start(self) -> int:
    """Grid index where sampling starts: 0, or later for image-to-image (strength < 1)."""
    return samplers.start_index(self.steps, self.strength)

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


def _dynamic_flags(dynamic_percentile: float | None, dynamic_max: float | None) -> list[str]:
  return [
    name
    for name, value in (('dynamic_percentile', dynamic_percentile), ('dynamic_max', dynamic_max))
    if value is not None
  ]


def unused_thresholding_flags(
  thresholding: str | None, dynamic_percentile: float | None, dynamic_max: float | None
) -> str | None:
  """Why --dynamic_percentile / --dynamic_max would be ignored (given with --thresholding static
  or none, which never read them), or None."""
  given = _dynamic_flags(dynamic_percentile, dynamic_max)
  if given and thresholding in ('static', 'none'):
    them = 'them' if len(given) > 1 else 'it'
    return (
      f'--{" and --".join(given)} set but --thresholding {thresholding} does not use {them}; '
      f'pass --thresholding dynamic, or drop {them}.'
    )
  return None


def dynamic_flags_unused_by(
  stages: Sequence[tuple[str, str]], dynamic_percentile: float | None, dynamic_max: float | None
) -> str | None:
  """Why --dynamic_percentile / --dynamic_max would be ignored by every stage sampled, given as
  (run folder, the thresholding it samples with: its config's sample.thresholding without
  --thresholding), or None."""
  given = _dynamic_flags(dynamic_percentile, dynamic_max)
  if not given or any(thresholding == 'dynamic' for _, thresholding in stages):
    return None
  runs = ', '.join(f'{where} samples with {thresholding}' for where, thresholding in stages)
  return (
    f'--{" and --".join(given)} set but no stage uses dynamic thresholding ({runs}: its '
    "config's sample.thresholding); pass --thresholding dynamic, or drop them."
  )


def guidance_without_unconditional(
  where: str, config, guidance: float, setting: str = 'guidance 1'
) -> str | None:
  """Why classifier-free guidance `guidance` cannot work for a run trained with `config` (its
  diffusion.cond_drop_prob is 0: the unconditional prediction it extrapolates from, the null
  caption's, was never trained), or None. `where`: how to name the run in the message;
  `setting`: how the caller sets guidance 1."""
  if guidance == 1.0 or float(config.diffusion.get('cond_drop_prob', 0.1)) > 0.0:
    return None
  return (
    f'{where} was trained with diffusion.cond_drop_prob=0, so it has no unconditional '
    f'prediction, which classifier-free guidance {guidance:g} extrapolates from; sample it with '
    f'{setting} (no guidance), or train with diffusion.cond_drop_prob > 0 (e.g. 0.1).'
  )


def make_stage_sampler(
  config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, options: SamplingOptions
) -> Callable[..., jax.Array]:
  """A jitted fn(params, text_embs [B,L,D], text_mask [B,L], rng, lowres=None, x_init=None,
  mask=None) -> [B,H,W,3].

  `rng`: one PRNG key for the batch, or per-image keys (`image_keys`), from which each image
  draws all of its noise (the SR stage's augmentation included), whatever batch it is in.

  Images come out in [-1, 1] (with thresholding). SR stages take `lowres` [B, h, w, 3] from the
  previous stage; it is upsampled and noise-augmented to `options.aug_level`.

  Editing: `x_init` [B, H, W, 3] in [-1, 1] (at this stage's resolution) is the image that
  image-to-image starts from (`options.strength` < 1) and that inpainting keeps where `mask`
  [B, H, W, 1] is 0 (1: generate), at every step and, exactly, in the result
  (samplers.known_region_projection, with `options.resample` RePaint takes per step). The whole
  loop stays one compiled program; one compilation per combination of given inputs.
  """
  resolution = int(config.data.resolution)
  is_sr = stage.is_super_resolution(config)
  aug_schedule = stage.aug_schedule(config) if is_sr else None
  logsnrs = options.logsnrs(config)
  objective = config.diffusion.objective

  @jax.jit
  def sample_fn(params, text_embs, text_mask, rng, lowres=None, x_init=None, mask=None):
    batch = text_embs.shape[0]
    shape = (batch, resolution, resolution, 3)
    check_edit_inputs(options, shape, x_init=x_init, mask=mask)
    aug_rng, sample_rng = samplers.split(rng)
    lowres_aug = aug_level = None
    if is_sr:
      if lowres is None:
        raise ValueError('A super-resolution stage needs the previous stage images (lowres).')
      want = int(config.data.lowres_resolution)
      if lowres.shape[1:] != (want, want, 3):
        raise ValueError(
          f'This super-resolution stage upsamples [B, {want}, {want}, 3] images; the lowres '
          f'given is {list(lowres.shape)}.'
        )
      up = stage.upsample_lowres(lowres, resolution=resolution)
      lowres_aug, aug_level = guidance.noise_condition_aug(
        lowres=up,
        aug_level=options.aug_level,
        noise=samplers.normal(aug_rng, up.shape),
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
    project = None
    if mask is not None:
      project = samplers.known_region_projection(x_known=x_init, mask=mask, logsnrs=logsnrs)
    images = samplers.sample(
      options.sampler,
      denoise_fn=denoise,
      logsnrs=logsnrs,
      shape=shape,
      rng=sample_rng,
      eta=options.eta,
      start=options.start,
      x_init=x_init,
      project=project,
      resample=options.resample,
    )
    return jnp.clip(images, -1.0, 1.0)

  return sample_fn


def image_keys(seed: int, indices: Sequence[int], stage: int = 0) -> np.ndarray:
  """Per-image key data [B, 2] uint32 for the images numbered `indices` of a request, on cascade
  stage `stage` (0: the first): image i draws its noise from fold_in(fold_in(key(seed), i),
  stage), so it is the same image whatever the batch size and whichever batch holds it.
  sample.py, evaluate.py and the in-training sample grids and evaluations all number their images
  from 0 in their output order."""
  keys = samplers.image_keys(jax.random.key(seed), np.asarray(indices))
  return np.asarray(jax.random.key_data(samplers.fold_in(keys, stage)))


def check_edit_inputs(
  options: SamplingOptions,
  shape: tuple[int, ...],
  *,
  x_init: jax.Array | None = None,
  mask: jax.Array | None = None,
) -> None:
  """ValueError unless the editing inputs fit the options and the sample shape [B, H, W, 3]."""
  if x_init is None:
    if options.strength < 1.0:
      raise ValueError(f'strength {options.strength} < 1 needs the init image (x_init).')
    if mask is not None:
      raise ValueError('Inpainting (mask) needs the init image (x_init).')
  elif tuple(x_init.shape) != tuple(shape):
    raise ValueError(f'x_init has shape {tuple(x_init.shape)}; this stage samples {shape}.')
  if mask is None and options.resample > 1:
    raise ValueError(f'resample {options.resample} > 1 is for inpainting; it needs a mask.')
  if mask is not None and tuple(mask.shape) != (*shape[:-1], 1):
    raise ValueError(f'mask has shape {tuple(mask.shape)}; this stage needs {(*shape[:-1], 1)}.')


@dataclasses.dataclass(frozen=True)
class StageEdit:
  """A stage's editing inputs, at its own resolution (see make_stage_sampler)."""

  x_init: jax.Array | None = None  # [B, H, W, 3] in [-1, 1]
  mask: jax.Array | None = None  # [B, H, W, 1], 1 = generate, 0 = keep x_init


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


class BatchDevices:
  """Where batches are sampled: over this process's devices (sample.py and evaluate.py ask for
  two on a CPU of two or more cores when their first batch is even, imagen_jax.cpu_devices).

  With several devices the params go on each (`params_sharding`, replicated), and a batch they
  divide is split over them: inputs and images sharded by row, each device samples its rows with
  no communication, and the noise is that of one device (jax's partitionable threefry draws it
  by index). Any other batch is sampled on the first device, from its replica of the params, as
  with one device: splitting a single image as two made a guided step slower (cpu_devices).
  """

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    self.devices = list(jax.local_devices() if devices is None else devices)
    self.mesh = None
    if len(self.devices) > 1:
      self.mesh = jax.sharding.Mesh(np.asarray(self.devices), ('batch',))
    self._split = {}  # id(sample_fn) -> (sample_fn, its jit with batch-sharded images out)

  @property
  def params_sharding(self) -> jax.sharding.Sharding:
    if self.mesh is None:
      return jax.sharding.SingleDeviceSharding(self.devices[0])
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def splits(self, batch: int) -> bool:
    """Whether a batch of this many images is split over the devices."""
    return self.mesh is not None and batch % len(self.devices) == 0

  def describe(self, split: bool) -> str:
    """' over N devices' / ' on the first device' for a log line ('' with one device)."""
    if self.mesh is None:
      return ''
    return f' over {len(self.devices)} devices' if split else ' on the first device'

  def place(self, sample_fn: Callable, params, split: bool):
    """(sample_fn, params, put: host array -> its device array) for one batch; `params` on
    `params_sharding`."""
    if not split:
      if self.mesh is not None:  # the first device's replica (no copy)
        first = self.devices[0]
        params = jax.tree.map(
          lambda a: next(s.data for s in a.addressable_shards if s.device == first), params
        )
      return sample_fn, params, jnp.asarray
    rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec('batch'))
    if id(sample_fn) not in self._split:
      split_fn = _OnMesh(jax.jit(sample_fn, out_shardings=rows), self.mesh)
      self._split[id(sample_fn)] = (sample_fn, split_fn)
    return self._split[id(sample_fn)][1], params, lambda x: jax.device_put(x, rows)


class _OnMesh:
  """A jitted function traced (called or lowered) inside `jax.set_mesh(mesh)`, so that what
  must be partitioned by hand sees the devices it runs on: the TPU splash attention kernel,
  which XLA cannot split over devices by itself, then runs in a shard_map over the batch."""

  def __init__(self, fn: Callable, mesh: jax.sharding.Mesh):
    self.fn, self.mesh = fn, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.fn(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.fn.lower(*args)


def run_cascade(
  stages: Sequence[Stage],
  *,
  text_embs: Sequence[jax.Array],
  text_mask: Sequence[jax.Array],
  rng: jax.Array,
  lowres: jax.Array | None = None,
  edits: Sequence[StageEdit | None] | None = None,
) -> list[jax.Array]:
  """Images of every stage in order; text_embs[i]/text_mask[i] are those of stage i's encoder.

  `lowres` [B, h, w, 3]: the input of a first stage that is super-resolution (upscaling an
  image); `edits[i]`: stage i's editing inputs (None: plain sampling). See imagen_jax.editing
  for building both from image files.
  """
  outputs = []
  edits = list(edits) if edits is not None else [None] * len(stages)
  if len(edits) != len(stages):
    raise ValueError(f'{len(edits)} stage edits for {len(stages)} stages.')
  for i, (st, edit) in enumerate(zip(stages, edits, strict=True)):
    stage_rng = samplers.fold_in(rng, i)
    edit = edit or StageEdit()
    lowres = st.sample_fn(
      st.params, text_embs[i], text_mask[i], stage_rng, lowres, edit.x_init, edit.mask
    )
    outputs.append(lowres)
  return outputs
