"""Text -> images through the cascade: restore stages, encode prompts, sample, write files.

  run(SampleRequest(prompts=[...], checkpoints=['runs/base64', 'runs/sr256@1200'], ...))

Every stage's model is rebuilt from the config saved in its checkpoint (EMA params by default);
`run@N` picks kept checkpoint step N of a run, a plain run folder its latest usable step (a
checkpoint that fails its checksums is reported and the previous kept one is used).

Output: one PNG per image and a JSON sidecar per image with every setting needed to reproduce
it (including the checkpoint step actually used), written batch by batch as soon as each batch
is sampled (atomically: a temporary file, then `os.replace`), so stopping a long request loses
at most the batch in progress. `grid.png` comes last, built from the first GRID_MAX_IMAGES
written files (read back from disk). Memory: one batch of images, plus the text embeddings of
the distinct prompts in bfloat16 on the host (prompts x L x D x 2 bytes: 1 MiB per prompt for
T5-XXL at L=128); requests above `max_images` images in total are refused unless raised.
Device memory: each stage's sampler is compiled before the first batch of each shape runs, and
its memory per device logged, with a warning when it will not fit (`_CompiledSamplers`).

Prompts are encoded as training saw them: the config's encoder, max_length and text.dtype, the
precompute batch shape, rounded to the cache's bfloat16 (see `encode_text`).

Noise: image i (its number in the output order, `noise_index` in its sidecar) draws all of its
noise on stage s from fold_in(fold_in(key(seed), i), s) (`cascade.image_keys`), so it is the
same image whatever --batch_size and whichever batch holds it, up to the float rounding of a
network run at another batch size (bitwise at the same one).

Resuming: a rerun with the same settings and `skip_existing=True` skips every batch whose files
all exist (no compute), and recomputes a partly-present batch, writing only its missing files:
the result is bitwise the same as one uninterrupted run (on the same devices, at the same
--batch_size). The existing sidecars must record the same settings, or the run is refused; where
they record other devices or another batch size (`sampled_on`), as after an out-of-memory error
and a lower --batch_size, a warning says that the new images match an uninterrupted run only to
float rounding. `overwrite` (replace everything) and `skip_existing` (keep what is there)
exclude each other.

Devices (`cascade.BatchDevices`): a batch that this process's devices divide is split over them
(sample.py asks for two CPU devices when its first batch is even, imagen_jax.cpu_devices), any
other batch is sampled on the first device; the images are one device's up to float rounding.

Inputs are validated, and the output folder checked, before any compute or any write.

Editing (imagen_jax.editing; `init_images`): with checkpoints that start with a
super-resolution stage the images are upscaled (only the SR stages run); `strength` S < 1 starts
the first stage from the image (image-to-image); `mask` (white = repaint) keeps the rest of the
image on every stage (inpainting, `resample` RePaint takes per step). Every image is sampled
with every prompt, `num_images` times: files `IMG-stem_PPP_KK_prompt.png` (IMG the image's
index), image-major. The sidecars record each image's path and sha256 (and the mask's).
"""

import dataclasses
import gc
import json
import logging
import math
import os
import pathlib
import re
import time
from collections.abc import Sequence

import jax
import ml_dtypes
import numpy as np
from PIL import Image

from imagen_jax import (
  cascade,
  checkpoints,
  compile_events,
  device_memory,
  editing,
  images,
  multihost,
  stage,
)

log = logging.getLogger(__name__)

# A stop signal sample.py's handler has seen (its name), or None. The handler also raises
# KeyboardInterrupt at once, but Python drops an exception raised while it runs a garbage-collection
# callback (jax's `_xla_gc_callback` runs during compiles): "Exception ignored in ...", and the run
# went on to its end with rc 0. The batch loop therefore checks this too.
_stop_requested: str | None = None


def request_stop(signal_name: str) -> None:
  """Record a stop signal: the batch loop raises KeyboardInterrupt(signal_name) at its next check
  (before writing the batch in progress, or before the next one) if the handler's own raise was
  lost."""
  global _stop_requested
  _stop_requested = signal_name


def _stop_if_requested() -> None:
  if _stop_requested is not None:
    raise KeyboardInterrupt(_stop_requested)


DEFAULT_MAX_IMAGES = 1000  # refuse bigger requests unless --max_images says otherwise
GRID_MAX_IMAGES = 64  # grid.png shows at most this many images (the first ones)
# Dtype the embedding cache stores (text/cache.py `_encode_shard`): training saw the encoder's
# output rounded to it, so sampling rounds the same way.
CACHE_EMBEDDING_DTYPE = ml_dtypes.bfloat16


SEEDS = 2**32  # seeds 0 .. 2**32 - 1: what jax.random.key(seed) tells apart (no x64)


class SampleError(ValueError):
  """Bad sampling input; the message names the problem and the fix."""


@dataclasses.dataclass
class SampleRequest:
  prompts: list[str]
  checkpoints: list[str]  # run folders (optionally run@step), base stage first
  out: str = 'samples'
  num_images: int = 1  # per prompt
  seed: int = 0
  batch_size: int = 8
  samplers: list[str] | None = None  # per stage (one value: all stages); None: config's
  steps: list[int] | None = None
  grids: list[str] | None = None  # sampling grid spacing per stage; None: config's ('auto')
  guidance: list[float] | None = None
  thresholding: str | None = None
  dynamic_percentile: float | None = None
  dynamic_max: float | None = None
  aug_level: float | None = None
  stop_at: int | None = None  # number of stages to run (None: all)
  use_ema: bool = True
  overwrite: bool = False  # replace existing output files
  skip_existing: bool = False  # keep existing output files, make only the missing ones
  max_images: int = DEFAULT_MAX_IMAGES  # refuse requests for more images in total
  training_prompts: int = 0  # add the first N captions of the base stage's training data
  # Editing (module docstring): image files or folders; SR checkpoints first: upscale them.
  init_images: list[str] | None = None
  strength: float | None = None  # (0, 1]: image-to-image on the first stage; None: 1
  mask: str | None = None  # inpainting: white = repaint, the size of every init image
  resample: list[int] | None = None  # inpainting: RePaint takes per step, per stage; None: 1


def _per_stage(values: Sequence | None, n: int, name: str, checkpoints: int | None = None) -> list:
  """One value per stage sampled (n): one value for all, n values, or (with --stop_at) one per
  checkpoint, the first n taken, so a cascade's command previews its first stages unchanged."""
  if values is None:
    return [None] * n
  values = list(values)
  if len(values) == 1:
    return values * n
  if checkpoints is not None and len(values) == checkpoints >= n:
    return values[:n]
  if len(values) != n:
    also = f' (or {checkpoints}, one per checkpoint)' if checkpoints and checkpoints != n else ''
    stages, give = ('1 stage', '1') if n == 1 else (f'{n} stages', f'1 or {n}')
    raise SampleError(f'--{name} has {len(values)} values for {stages}; give {give}{also}.')
  return values


def parse_checkpoint(spec: str) -> tuple[str, int | None]:
  """'runs/b@1200' -> ('runs/b', 1200); 'runs/b' -> ('runs/b', None); SampleError if bad."""
  try:
    return checkpoints.parse_run(spec)
  except checkpoints.CheckpointError as e:
    raise SampleError(f'--checkpoints {spec}: {e}') from e


def validate(req: SampleRequest) -> None:
  """Everything checkable before loading anything."""
  if req.training_prompts < 0:
    raise SampleError(f'--training_prompts must be >= 0, got {req.training_prompts}.')
  if not 0 <= req.seed < SEEDS:
    raise SampleError(
      f'--seed must be in [0, {SEEDS}) (a JAX key takes 32 bits: a larger seed would give the '
      f'images of a smaller one), got {req.seed}.'
    )
  if not req.prompts and req.training_prompts < 1:
    raise SampleError(
      'No prompt given: pass --prompt "a red apple" (repeatable), --prompts_file or '
      '--training_prompts N.'
    )
  for i, p in enumerate(req.prompts):
    if not p or not p.strip():
      raise SampleError(f'Prompt {i} is empty or whitespace; every prompt needs text.')
    try:
      p.encode('utf-8')
    except UnicodeEncodeError as e:  # bytes that were not UTF-8 reach argv as surrogates
      raise SampleError(
        f'Prompt {i} ({p!r}) is not UTF-8 text ({e.reason} at character {e.start}); pass it as '
        "UTF-8 (check the terminal's or the script's encoding, e.g. LANG=C.UTF-8)."
      ) from e
  unused = cascade.unused_thresholding_flags(
    req.thresholding, req.dynamic_percentile, req.dynamic_max
  )
  if unused:
    raise SampleError(unused)
  if not str(req.out).strip():  # '' would write into the current folder
    raise SampleError('--out is empty; pass the output folder, e.g. --out samples.')
  if not req.checkpoints:
    raise SampleError('No checkpoints: pass --checkpoints runs/base64[,runs/sr256[,runs/sr1024]].')
  for spec in req.checkpoints:
    if not spec.strip():
      raise SampleError(
        f'--checkpoints {",".join(req.checkpoints)!r} has an empty entry; pass run folders '
        'separated by single commas: --checkpoints runs/base64,runs/sr256.'
      )
    run_dir = pathlib.Path(parse_checkpoint(spec)[0])
    if not run_dir.exists():
      raise SampleError(
        f'--checkpoints: {run_dir} does not exist; pass the --workdir of a train.py run.'
      )
    if not run_dir.is_dir():
      raise SampleError(
        f'--checkpoints: {run_dir} is a file, not a run folder; pass the --workdir of a '
        'train.py run.'
      )
  if req.overwrite and req.skip_existing:
    raise SampleError(
      '--overwrite and --skip_existing exclude each other: --skip_existing keeps the existing '
      'images and makes only the missing ones, --overwrite replaces them all; pass one.'
    )
  if req.num_images < 1:
    raise SampleError(f'--num_images must be a positive integer, got {req.num_images}.')
  if req.batch_size < 1:
    raise SampleError(f'--batch_size must be a positive integer, got {req.batch_size}.')
  if req.max_images < 1:
    raise SampleError(f'--max_images must be a positive integer, got {req.max_images}.')
  try:
    total, what = count_images(req)
  except editing.EditError as e:
    raise SampleError(str(e)) from e
  if total > req.max_images:
    raise SampleError(
      f'{what} = {total} images, more than '
      f'--max_images={req.max_images}; pass --max_images={total} to allow it (images are '
      'written batch by batch; a stopped run resumes with --skip_existing).'
    )
  for s in req.steps or []:
    if s < 1:
      raise SampleError(f'--steps must be positive integers, got {s}.')
  for g in req.guidance or []:
    if not 0 <= g < math.inf:  # also refuses NaN
      raise SampleError(f'--guidance must be a finite number >= 0 (1 means no guidance), got {g}.')
  if req.stop_at is not None and not 1 <= req.stop_at <= len(req.checkpoints):
    raise SampleError(f'--stop_at must be between 1 and {len(req.checkpoints)}, got {req.stop_at}.')
  validate_edit(req)


def count_images(req: SampleRequest) -> tuple[int, str]:
  """(images the request makes in total, how: 'P prompt(s) x --num_images=K', after 'N init
  image(s) x' when editing); editing.EditError when the init images cannot be listed."""
  num_prompts = len(req.prompts) + max(req.training_prompts, 0)
  total = num_prompts * req.num_images
  what = f'{num_prompts} prompt(s) x --num_images={req.num_images}'
  if req.init_images:
    num_inits = len(editing.find_images(req.init_images))
    total *= num_inits
    what = f'{num_inits} init image(s) x {what}'
  return total, what


def first_batch_size(req: SampleRequest) -> int:
  """Images in the request's first batch (sample.py picks the CPU device count by it); 1 when
  the request is not valid (`run` then says why)."""
  try:
    total = count_images(req)[0]
  except editing.EditError:
    return 1
  return max(1, min(req.batch_size, total))


def params_bytes(req: SampleRequest) -> int | None:
  """Bytes of the params of every stage the request samples with (all are held at once), from
  the configs saved with their checkpoints, before JAX's backend starts; None when a config
  cannot be read (`run` then says why)."""
  total = 0
  for spec in req.checkpoints[: req.stop_at or len(req.checkpoints)]:
    config = checkpoints.peek_config(spec)
    if config is None:
      return None
    total += stage.params_bytes(config)
  return total


def validate_edit(req: SampleRequest) -> None:
  """The editing options, and every init image and the mask decoded and checked."""
  if req.strength is not None and not 0.0 < req.strength <= 1.0:  # also refuses NaN
    raise SampleError(
      f'--strength must be in (0, 1] (the fraction of the steps run from the noised image; '
      f'1: all of them, from pure noise), got {req.strength}.'
    )
  for r in req.resample or []:
    if r < 1:
      raise SampleError(f'--resample must be positive integers (1: no resampling), got {r}.')
  if not req.init_images:
    for flag, value in (('strength', req.strength), ('mask', req.mask), ('resample', req.resample)):
      if value is not None:
        raise SampleError(f'--{flag} edits an image: pass it with --init_image IMAGE.')
    return
  if req.mask is None and any(r > 1 for r in req.resample or []):
    raise SampleError('--resample is for inpainting (RePaint); pass it with --mask MASK.png.')
  try:
    paths = editing.find_images(req.init_images)
    for path in paths:
      image = editing.load_image(path)
      if req.mask is not None:
        editing.load_mask(req.mask, image.size, path)
  except editing.EditError as e:
    raise SampleError(str(e)) from e


def slug(text: str, limit: int = 40) -> str:
  return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')[:limit] or 'prompt'


@dataclasses.dataclass(frozen=True)
class Job:
  """One output image: its prompt, its index among the prompt's images, its init image."""

  prompt: int
  k: int
  init: int | None = None  # index into the init images (editing), else None


def jobs(req: SampleRequest) -> list[Job]:
  """Every output image in order: prompt-major; with init images, image-major first."""
  inits = range(len(editing.find_images(req.init_images))) if req.init_images else [None]
  return [
    Job(prompt=p, k=k, init=i)
    for i in inits
    for p in range(len(req.prompts))
    for k in range(req.num_images)
  ]


def output_paths(req: SampleRequest) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(png, json) per image, in the order of `jobs`."""
  out = pathlib.Path(req.out)
  inits = editing.find_images(req.init_images) if req.init_images else []
  paths = []
  for job in jobs(req):
    stem = f'{job.prompt:03d}_{job.k:02d}_{slug(req.prompts[job.prompt])}'
    if job.init is not None:
      stem = f'{job.init:03d}-{slug(inits[job.init].stem, 24)}_{stem}'
    paths.append((out / f'{stem}.png', out / f'{stem}.json'))
  return paths


def prepare_output(req: SampleRequest, *, all_prompts: bool = True) -> None:
  """Create and test-write the output folder; refuse to overwrite unless asked. `all_prompts`
  False: the training captions are not in req.prompts yet, so a grid.png is not judged by them
  (a folder made by --training_prompts alone read as another request's)."""
  out = pathlib.Path(req.out)
  try:
    multihost.check_writable(out)  # processes may share --out (sample.py --distributed)
  except OSError as e:
    raise SampleError(
      f'Cannot write to the output folder {out}: {e.strerror}. Pass --out DIR.'
    ) from e
  if not req.overwrite and not req.skip_existing:
    existing = [str(p) for pair in output_paths(req) for p in pair if p.exists()]
    if (out / 'grid.png').exists():
      existing.append(str(out / 'grid.png'))
    if existing:
      raise SampleError(
        f'{len(existing)} output files exist already (e.g. {existing[0]}); pass --overwrite to '
        'replace them, --skip_existing to keep them and make only the missing ones (same '
        'seed and settings), or choose another --out.'
      )
  elif req.skip_existing and all_prompts and (out / 'grid.png').exists():
    if not any(side.exists() for _, side in output_paths(req)):
      raise SampleError(
        f"--skip_existing: {out} holds a grid.png but none of this request's images, so the "
        "grid is another request's; choose another --out, or pass --overwrite to replace it."
      )


def restore_stage(
  workdir: str,
  options_overrides: dict,
  use_ema: bool,
  sharding: jax.sharding.Sharding | None = None,
) -> cascade.Stage:
  """A stage from a run folder, built from its saved config, its params on `sharding` (default:
  this process's first device).

  `workdir` is a run folder ('runs/base64': its latest usable checkpoint) or 'runs/base64@N'
  (kept step N). The step actually used is `stage.step`; when the latest checkpoint could not
  be used and an older one was, a warning says so.
  """
  run_dir, wanted = parse_checkpoint(workdir)
  key = 'ema_params' if use_ema else 'params'
  graphdefs = {}

  def abstract_params(config):
    graphdef, params = stage.abstract_model(config)
    graphdefs['graphdef'] = graphdef
    return params

  try:
    restored = checkpoints.restore_params(
      run_dir,
      step=wanted,
      key=key,
      abstract_fn=abstract_params,
      sharding=sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
    )
  except checkpoints.CheckpointError as e:
    raise SampleError(' '.join(str(e).split())) from e  # one line, even listing failures
  config, step = restored.config, restored.step
  if restored.failures:
    log.warning(
      '%s: sampling from checkpoint step %d: %d newer kept checkpoint(s) could not be used '
      '(see above); pass --checkpoints %s@%d to choose a step explicitly.',
      run_dir,
      step,
      len(restored.failures),
      run_dir,
      step,
    )
  if 'graphdef' not in graphdefs:  # a restore_params that did not need abstract_fn
    graphdefs['graphdef'] = stage.abstract_model(config)[0]
  options = cascade.SamplingOptions.from_config(config, **options_overrides)
  st = cascade.Stage(
    config=config, graphdef=graphdefs['graphdef'], params=restored.params, options=options
  )
  st.step = step  # type: ignore[attr-defined]
  st.passed_over = restored.failures  # type: ignore[attr-defined]
  st.requested_step = wanted  # type: ignore[attr-defined]
  st.workdir = str(run_dir)  # type: ignore[attr-defined]
  return st


def check_chain(stages: Sequence[cascade.Stage], req: SampleRequest | None = None) -> None:
  """The stages chain (each SR stage upsamples what the one before makes), and fit the request:
  an SR stage may come first only to upscale init images; init images on a base stage need
  --strength or --mask."""
  editing_ = req is not None and bool(req.init_images)
  first = stages[0]
  if stage.is_super_resolution(first.config) and not editing_:
    raise SampleError(
      f'The first checkpoint ({first.workdir}) is a super-resolution stage '
      f'({first.config.stage}); list the base stage first, or pass --init_image to upscale '
      'your images with the SR stages.'
    )
  if editing_ and not stage.is_super_resolution(first.config):
    if req.strength is None and req.mask is None:
      sr = [st.workdir for st in stages[1:]]
      hint = f'; to upscale with {", ".join(sr)} drop {first.workdir}' if sr else ''
      raise SampleError(
        f'--init_image without --strength or --mask upscales the image with super-resolution '
        f'stages, but the first checkpoint ({first.workdir}) is a base stage '
        f'({first.config.stage}){hint}: list only SR checkpoints (e.g. --checkpoints '
        'runs/sr256), or pass --strength S for image-to-image or --mask MASK.png to repaint.'
      )
    if req.strength == 1.0 and req.mask is None:
      log.warning(
        '--strength 1 runs every step from pure noise: the init image is not used (plain '
        'sampling); pass --strength below 1 to start from it.'
      )
    elif req.strength is not None and req.mask is None and first.options.start == 0:
      steps = first.options.steps
      log.warning(
        '--strength %g of %d steps rounds to all %d steps, from pure noise: the init image is '
        'not used (plain sampling); pass a lower --strength or more --steps.',
        req.strength,
        steps,
        steps,
      )
  for prev, nxt in zip(stages, stages[1:], strict=False):
    if not stage.is_super_resolution(nxt.config):
      raise SampleError(
        f'{nxt.workdir} is not a super-resolution stage; only the first may be base.'
      )
    if nxt.config.data.lowres_resolution != prev.config.data.resolution:
      raise SampleError(
        f'{nxt.workdir} upsamples {nxt.config.data.lowres_resolution} px images but the stage '
        f'before it ({prev.workdir}) makes {prev.config.data.resolution} px: list the stages in '
        'order, each SR run after the stage whose output size is its low-res size (base, sr256, '
        'sr1024), with none left out.'
      )
  # Flags no stage reads. Not with --stop_at short of the last checkpoint: the whole cascade's
  # command is then taken as it is, for stages it does not sample.
  if req is not None and len(stages) == len(req.checkpoints):
    unused = cascade.dynamic_flags_unused_by(
      [(str(st.workdir), st.options.thresholding) for st in stages],
      req.dynamic_percentile,
      req.dynamic_max,
    )
    if unused:
      raise SampleError(unused)
    if req.aug_level is not None and not any(stage.is_super_resolution(st.config) for st in stages):
      raise SampleError(
        f'--aug_level {req.aug_level:g} sets the noise-conditioning level of super-resolution '
        f'stages, but none is sampled ({", ".join(str(st.workdir) for st in stages)}); drop '
        '--aug_level, or list an SR run after the base run in --checkpoints.'
      )
  for st in stages:
    why = cascade.guidance_without_unconditional(str(st.workdir), st.config, st.options.guidance)
    if why:
      raise SampleError(f'{why} (--guidance takes one value per stage, e.g. --guidance 1,5)')
    if stage.is_super_resolution(st.config):
      d = st.config.diffusion
      low, high = float(d.get('aug_level_min', 0.0)), float(d.aug_level_max)
      if not low <= st.options.aug_level <= high:
        log.warning(
          '%s trained with low-res augmentation levels in [%g, %g]; sampling at aug_level %g is '
          'outside what it has seen (pass --aug_level in that range).',
          st.workdir,
          low,
          high,
          st.options.aug_level,
        )


def _encoder_key(config) -> tuple[str, int, str, int, str]:
  """What makes two stages' prompt embeddings the same: encoder, max length, dtype, precompute
  batch size and Hub revision."""
  text = config.text
  return (
    text.encoder,
    int(text.max_length),
    text.get('dtype', 'bfloat16'),
    int(text.get('precompute_batch_size', 64)),
    str(text.get('revision') or ''),
  )


def encode_text(prompts: list[str], config) -> tuple[np.ndarray, np.ndarray]:
  """(text_embs [P, L, D] bfloat16, text_mask [P, L] bool) exactly as training saw them.

  Training reads embeddings from the cache that `imagen_jax.precompute` built: the encoder
  loaded with `config.text.dtype`, run on batches of `precompute` batch size (padded with ''),
  on the same device mesh, and rounded to the cache's bfloat16. This reuses that code path
  (`cache._encode_shard`), so on the same backend and device count a training caption gets
  bitwise the embeddings the model trained on (a different batch shape would change float32
  results by an ulp, which bfloat16 rounding sometimes turns into a 1-ulp bfloat16 difference).
  """
  from imagen_jax import precompute
  from imagen_jax.text import cache as cache_lib

  max_length = int(config.text.max_length)
  if not prompts:
    return np.zeros((0, max_length, 0), CACHE_EMBEDDING_DTYPE), np.zeros((0, max_length), bool)
  precompute.check_encoder_unchanged(config)
  mesh = precompute.make_encoder_mesh(config)
  enc = precompute.load_encoder(config, mesh)
  tokens, offsets = cache_lib._encode_shard(
    prompts, enc, precompute._batch_size(config, mesh)
  )  # [T, D] bfloat16 bits of the real tokens, [P + 1]
  real = tokens.view(CACHE_EMBEDDING_DTYPE)
  text_embs = np.zeros((len(prompts), max_length, enc.dim), CACHE_EMBEDDING_DTYPE)
  text_mask = np.zeros((len(prompts), max_length), bool)
  for i in range(len(prompts)):  # zero-padded, as the cache's lookup pads
    n = offsets[i + 1] - offsets[i]
    text_embs[i, :n] = real[offsets[i] : offsets[i + 1]]
    text_mask[i, :n] = True
  del enc
  gc.collect()  # the encoder is freed before the U-Nets run
  return text_embs, text_mask


def _encode_per_stage(
  prompts: list[str], stages: Sequence[cascade.Stage]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per-stage (text_embs [P, L, D] bfloat16, text_mask [P, L]); each encoder loaded once.
  Every stage's saved T5 folder fingerprint is checked, not only the first stage's of a key:
  two stages may have trained on other checkpoints in the same folder."""
  from imagen_jax import precompute
  from imagen_jax.text import t5

  by_key = {}
  for st in stages:
    key = _encoder_key(st.config)
    if key not in by_key:
      try:  # a moved T5 folder, or a Hub name offline: one line, not a traceback
        by_key[key] = encode_text(list(prompts), st.config)  # checks this stage's fingerprint
      except t5.T5CheckpointError as e:
        raise SampleError(f'{st.workdir} {precompute.unloadable_encoder(st.config, e)}') from e
    else:
      precompute.check_encoder_unchanged(st.config)
  embs = [by_key[_encoder_key(st.config)] for st in stages]
  return [e for e, _ in embs], [m for _, m in embs]


def encode_prompts(prompts: list[str], stages: Sequence[cascade.Stage]) -> tuple[list, list]:
  """Per-stage (text_embs [P, L, D] float32, text_mask [P, L] bool) as each stage trained on
  them (its config's encoder, max_length and dtype); each distinct encoder loaded once."""
  text_embs, text_mask = _encode_per_stage(prompts, stages)
  return [e.astype(np.float32) for e in text_embs], text_mask


# sidecar fields that vary by image
PER_IMAGE_FIELDS = ('prompt', 'image_index', 'noise_index', 'init_image')
# How the images were sampled: {'backend': 'cpu', 'devices': 2, 'batch_size': 8} (this process's
# devices; a batch they do not divide ran on the first). It moves float rounding only, so
# --skip_existing warns about a different one instead of refusing.
SAMPLED_ON = 'sampled_on'
# The noise of image i: fold_in(fold_in(key(seed), i), stage) (cascade.image_keys). Sidecars
# without it are from before 2026-11, when a batch's noise came from the batch's number.
NOISE = 'per_image: fold_in(fold_in(key(seed), noise_index), stage)'
# Where each stage's sampling grid ends (`schedules.logsnr_grid`). Sidecars without it are from
# before 2026-11-29, when the last step stopped at the schedule's end (log-SNR 20 on the cosine,
# 9.2 on 'linear') and kept that much of the predicted noise: their images differ from this
# version's by about a level in a few pixels (cosine), so --skip_existing warns, not refuses.
GRID_END = 'clean image (log-SNR +inf)'


def _edit_settings(req: SampleRequest) -> dict:
  """The editing inputs as they decide the images: files by path and content."""
  inits = editing.find_images(req.init_images)
  mask = None
  if req.mask is not None:
    mask = {'path': os.path.abspath(req.mask), 'sha256': editing.file_digest(req.mask)}
  return {
    'init_images': [{'path': os.path.abspath(p), 'sha256': editing.file_digest(p)} for p in inits],
    'mask': mask,
    'strength': 1.0 if req.strength is None else req.strength,
  }


def _settings(req: SampleRequest, stages: Sequence[cascade.Stage]) -> dict:
  """Everything that decides the images (the sidecar minus the per-image fields), as JSON."""
  settings = {
    'seed': req.seed,
    'noise': NOISE,
    'grid_end': GRID_END,
    'num_images': req.num_images,
    'all_prompts': list(req.prompts),
    'stages': [
      {
        'checkpoint': os.path.abspath(st.workdir),
        'step': st.step,
        'stage': st.config.stage,
        'resolution': int(st.config.data.resolution),
        'params': 'ema' if req.use_ema else 'raw',
        'text_encoder': st.config.text.encoder,
        'text_dtype': _encoder_key(st.config)[2],
        **_stage_options(st),
      }
      for st in stages
    ],
  }
  if req.init_images:
    settings['edit'] = _edit_settings(req)
  return json.loads(json.dumps(settings))


def _stage_options(st: cascade.Stage) -> dict:
  """A stage's sampling options as they decide its images: `aug_level` only for an SR stage (a
  base stage has no low-res input; it was recorded, and --skip_existing then refused a rerun
  that left out an --aug_level no stage it made had used)."""
  options = dataclasses.asdict(st.options)
  if not stage.is_super_resolution(st.config):
    del options['aug_level']
  return options


def _differences(recorded, current, prefix: str = '') -> list[str]:
  """'path: recorded -> current' for every JSON leaf that differs."""
  if isinstance(recorded, dict) and isinstance(current, dict):
    keys = sorted(set(recorded) | set(current))
    pairs = [(k, recorded.get(k, '<absent>'), current.get(k, '<absent>')) for k in keys]
  elif isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
    pairs = list(zip(range(len(recorded)), recorded, current, strict=True))
  else:
    return [f'{prefix or "sidecar"}: {recorded!r} -> {current!r}'] if recorded != current else []
  out = []
  for key, a, b in pairs:
    path = f'{prefix}[{key}]' if isinstance(key, int) else f'{prefix}.{key}' if prefix else key
    out += _differences(a, b, path)
  return out


def _check_existing_sidecars(
  req: SampleRequest,
  paths: Sequence[tuple[pathlib.Path, pathlib.Path]],
  settings: dict,
  sampled_on: dict,
) -> None:
  """--skip_existing: the sidecars already there must record these settings; a warning when they
  were sampled on other devices or in batches of another size (the new images then match an
  uninterrupted run's only to float rounding)."""
  elsewhere, older_grid_end = set(), 0
  for _, side in paths:
    if not side.exists():
      continue
    try:
      recorded = json.loads(side.read_text())
      if not isinstance(recorded, dict):
        raise ValueError('not a JSON object')
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
      raise SampleError(
        f'--skip_existing: sidecar {side} is unreadable ({e}); delete it (its image is then '
        'made again) or choose another --out.'
      ) from e
    where = recorded.pop(SAMPLED_ON, None)
    if isinstance(where, dict) and where != sampled_on:  # absent in older sidecars
      elsewhere.add(_describe_devices(where))
    recorded = {k: v for k, v in recorded.items() if k not in PER_IMAGE_FIELDS}
    if 'noise' not in recorded:
      raise SampleError(
        f'--skip_existing: {side} was made by an older imagen-jax, whose noise depended on the '
        'batch size, so its images cannot be completed; choose another --out, or pass '
        '--overwrite.'
      )
    if 'grid_end' not in recorded:
      older_grid_end += 1
      recorded['grid_end'] = GRID_END
    for old, now in zip(recorded.get('stages') or [], settings['stages'], strict=False):
      if isinstance(old, dict) and 'aug_level' not in now:  # a base stage's, recorded before
        old.pop('aug_level', None)
    if recorded != settings:
      diffs = _differences(recorded, settings)
      raise SampleError(
        f'--skip_existing: {side} was made with other settings ({"; ".join(diffs[:3])}); '
        'rerun with the same seed and settings, choose another --out, or pass --overwrite.'
      )

  if older_grid_end:
    log.warning(
      '--skip_existing: %d image(s) in %s were sampled before 2026-11-29, when the last step '
      "stopped short of the clean image (at the schedule's end): they differ from the images this "
      'run adds by about a level in a few pixels (more on the linear schedule); --overwrite '
      'makes them all again.',
      older_grid_end,
      req.out,
    )
  if elsewhere:
    log.warning(
      '--skip_existing: images in %s were sampled on %s, this run samples on %s: the images it '
      'adds match an uninterrupted run only to float rounding (IMAGEN_JAX_CPU_DEVICES=N sets '
      'the CPU device count).',
      req.out,
      ' and '.join(sorted(elsewhere)),
      _describe_devices(sampled_on),
    )


def _describe_devices(where: dict) -> str:
  n = where.get('devices')
  text = f'{n} {where.get("backend")} device{"" if n == 1 else "s"}'
  return text + (f' in batches of {where["batch_size"]}' if 'batch_size' in where else '')


def _remove_earlier_outputs(req: SampleRequest, paths, batches) -> None:
  """--overwrite: remove the files this request will write (this process's batches; the grid on
  process 0) before the first batch, so that a run stopped midway leaves only its own images
  and its advice, the same command with --skip_existing instead, resumes it (the earlier
  images of unfinished batches would otherwise hold other settings, which --skip_existing
  refuses)."""
  removed = 0
  mine = [b for b in range(len(batches)) if b % jax.process_count() == jax.process_index()]
  files = [p for b in mine for i in batches[b] for p in paths[i]]
  if jax.process_index() == 0:
    files.append(pathlib.Path(req.out) / 'grid.png')
  for path in files:
    if path.exists():
      path.unlink()
      removed += 1
  if removed:
    log.info('--overwrite: removed %d earlier files of this request before sampling.', removed)


def _write_json(path: pathlib.Path, data: dict) -> None:
  images.write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def _write_failed(path: pathlib.Path, e: OSError, made: int) -> SampleError:
  """The one-line error for an output file that could not be written (a full disk, a folder
  made read-only meanwhile): what was kept and how to finish."""
  return SampleError(
    f'Cannot write {path} ({e.strerror or e}); {made} images from earlier batches were written '
    'with their sidecars. Free space (or fix the folder) and run the same command with '
    '--skip_existing to make the rest.'
  )


def _write_grid(paths: Sequence[pathlib.Path], out: pathlib.Path) -> None:
  """grid.png of the first GRID_MAX_IMAGES images, read back from their files."""
  first = [np.asarray(Image.open(p).convert('RGB')) for p in paths[:GRID_MAX_IMAGES]]
  images.save_png(images.make_grid(np.stack(first)), out / 'grid.png', overwrite=True)


def run(req: SampleRequest) -> list[pathlib.Path]:
  """Sample, write PNGs + sidecars batch by batch, then the grid; returns every PNG path of
  the last stage (made now or, with skip_existing, already there).

  On any error or interrupt before a file was written, an output folder made by this call is
  removed again: nothing is left behind that was not there.
  """
  validate(req)
  out = pathlib.Path(req.out).absolute()
  made = [p for p in (out, *out.parents) if not p.exists()]  # the folders this run will make
  try:
    return _run(req)
  except BaseException:
    for folder in made:  # innermost first: those this run made and wrote nothing into
      if not folder.is_dir() or any(folder.iterdir()):
        break
      folder.rmdir()
    raise


def _run(req: SampleRequest) -> list[pathlib.Path]:
  prepare_output(req, all_prompts=not req.training_prompts)  # again once the captions are read
  n_stages = req.stop_at or len(req.checkpoints)
  samplers_ = _per_stage(req.samplers, n_stages, 'sampler', len(req.checkpoints))
  steps_ = _per_stage(req.steps, n_stages, 'steps', len(req.checkpoints))
  grids_ = _per_stage(req.grids, n_stages, 'grid', len(req.checkpoints))
  guidance_ = _per_stage(req.guidance, n_stages, 'guidance', len(req.checkpoints))
  resample_ = _per_stage(req.resample, n_stages, 'resample', len(req.checkpoints))
  devices = cascade.BatchDevices()
  stages = []
  for i, workdir in enumerate(req.checkpoints[:n_stages]):
    overrides = dict(
      sampler=samplers_[i],
      steps=steps_[i],
      grid=grids_[i],
      guidance=guidance_[i],
      thresholding=req.thresholding,
      dynamic_percentile=req.dynamic_percentile,
      dynamic_max=req.dynamic_max,
      aug_level=req.aug_level,
      strength=req.strength if i == 0 else None,  # image-to-image: the first stage
      resample=resample_[i],
    )
    try:
      stages.append(restore_stage(workdir, overrides, req.use_ema, devices.params_sharding))
    except ValueError as e:
      raise SampleError(str(e)) from e
  check_chain(stages, req)
  edit = _EditBatches(req, stages) if req.init_images else None
  if req.training_prompts:
    from imagen_jax.data import pipeline

    try:
      captions = pipeline.sample_captions(stages[0].config, req.training_prompts)
    except (ValueError, OSError) as e:  # the base run's data is not readable here
      raise SampleError(
        f"--training_prompts reads the base stage's training data, which is not available here "
        f'({" ".join(str(e).split())}); pass --prompt or --prompts_file instead.'
      ) from e
    req.prompts = list(req.prompts) + captions
    prepare_output(req)

  paths, all_jobs = output_paths(req), jobs(req)
  settings = _settings(req, stages)
  sampled_on = {
    'backend': jax.default_backend(),
    'devices': len(devices.devices),
    'batch_size': req.batch_size,
  }
  if req.skip_existing:
    _check_existing_sidecars(req, paths, settings, sampled_on)

  num = len(paths)
  num_batches = -(-num // req.batch_size)
  batches = [
    range(b * req.batch_size, min((b + 1) * req.batch_size, num)) for b in range(num_batches)
  ]
  complete = [
    req.skip_existing and all(paths[i][0].exists() and paths[i][1].exists() for i in batch)
    for batch in batches
  ]
  # Host memory: the distinct prompts' embeddings (bfloat16) plus one batch of images.
  if not all(complete):
    text_embs, text_mask = _encode_per_stage(list(req.prompts), stages)
  if req.overwrite:
    _remove_earlier_outputs(req, paths, batches)

  timings = [0.0] * len(stages)
  compiles = [compile_events.Compiles() for _ in stages]  # of each stage's sampler
  compiled = _CompiledSamplers(devices, req.batch_size)
  made = skipped = 0
  for b, batch in enumerate(batches):
    _stop_if_requested()
    if b % jax.process_count() != jax.process_index():
      continue  # another process's batch (several processes split the batches round-robin)
    if complete[b]:
      skipped += len(batch)
      log.info('batch %d/%d: all %d images exist; skipped.', b + 1, num_batches, len(batch))
      continue
    prompt_rows = np.asarray([all_jobs[i].prompt for i in batch])
    lowres, stage_edits = None, [(None, None)] * len(stages)
    if edit is not None:
      lowres, stage_edits = edit.arrays([all_jobs[i].init for i in batch])
    split = devices.splits(len(batch))
    for s, st in enumerate(stages):
      t0 = time.perf_counter()
      x_init, mask = stage_edits[s]
      sample_fn, params, put = devices.place(st.sample_fn, st.params, split)
      args = (
        params,
        put(text_embs[s][prompt_rows].astype(np.float32)),  # [B, L, D]
        put(text_mask[s][prompt_rows]),  # [B, L]
        put(cascade.image_keys(req.seed, batch, s)),  # [B, 2]: image i's noise
        None if lowres is None else put(lowres),
        None if x_init is None else put(x_init),
        None if mask is None else put(mask),
      )
      try:
        with compile_events.counting() as programs:  # the sampler's own compile
          run_sampler = compiled.get(s, st, sample_fn, args, split)
        lowres = run_sampler(*args)
        lowres.block_until_ready()
      except Exception as e:
        xla_message = device_memory.out_of_memory(e)
        if xla_message is None:
          raise
        kept = (
          f'{made} images from earlier batches were written; the same command with a lower '
          '--batch_size and --skip_existing makes only the missing ones (with the noise each '
          'would have had).'
          if made
          else 'No image was written.'
        )
        raise SampleError(
          f'Out of memory sampling batch {b + 1} of {num_batches} on stage {s + 1} '
          f'({xla_message}): lower --batch_size (now {req.batch_size}). {kept}'
        ) from e
      timings[s] += time.perf_counter() - t0
      compiles[s].add(programs)
    _stop_if_requested()  # a stop whose KeyboardInterrupt was lost: this batch is dropped
    out = np.asarray(lowres)  # [B, H, W, 3]
    if not np.all(np.isfinite(out)):
      raise SampleError(
        f'The sampler produced NaN/Inf values in batch {b + 1} of {num_batches} (its images '
        f'were not written; {made} images from earlier batches were). The checkpoint may be '
        'diverged; try another checkpoint, fewer --guidance, or --thresholding=dynamic.'
      )
    pixels = images.to_uint8(out)
    written = 0
    for row, i in enumerate(batch):
      png, side = paths[i]
      # Kept only with its sidecar: a PNG without one may be another run's (stopped between
      # the two writes), made with other settings.
      target = png
      try:
        if not (req.skip_existing and png.exists() and side.exists()):
          images.save_png(pixels[row], png, overwrite=req.overwrite or req.skip_existing)
          written += 1
        if not (req.skip_existing and side.exists()):
          sidecar = {
            'prompt': req.prompts[prompt_rows[row]],
            'image_index': all_jobs[i].k,
            'noise_index': i,
          }
          if edit is not None:
            sidecar['init_image'] = os.path.abspath(edit.paths[all_jobs[i].init])
          target = side
          _write_json(side, {**sidecar, **settings, SAMPLED_ON: sampled_on})
      except FileExistsError as e:  # checked absent at the start: another run wrote it since
        raise SampleError(
          f'{target} appeared while this run was sampling (another sample.py writing to '
          f'{req.out}?) and was left as it is; {made} images from earlier batches were written. '
          'Use another --out, or run the same command with --skip_existing once the other ends.'
        ) from e
      except OSError as e:
        raise _write_failed(target, e, made) from e
    made += written
    skipped += len(batch) - written
    log.info(
      'batch %d/%d: sampled %d images%s, wrote %d.',
      b + 1,
      num_batches,
      len(batch),
      devices.describe(split),
      written,
    )
  multihost.barrier('imagen_jax:samples_written')  # a peer that never comes: PeersLostError
  if jax.process_index() == 0:
    try:
      _write_grid([png for png, _ in paths], pathlib.Path(req.out))
    except OSError as e:
      raise SampleError(
        f'Cannot write {pathlib.Path(req.out) / "grid.png"} ({e.strerror or e}); all {len(paths)} '
        'images and their sidecars are in place. Free space and run the same command with '
        '--skip_existing to write the grid.'
      ) from e
  for st, secs, programs in zip(stages, timings, compiles, strict=True):
    log.info(
      '%s: %.2f s sampling, compile included (the sampler %s).',
      st.config.stage,
      secs,
      programs.summary(),
    )
  log.info('%d images made, %d already there (%s).', made, skipped, req.out)
  return [png for png, _ in paths]


class _CompiledSamplers:
  """Each stage's sampler compiled ahead of its first run for every argument signature (batch
  size, split or not, text length, editing inputs), so that its memory is logged, and a batch
  that will not fit warned about, before the batch runs (`device_memory.check`: on GPU/TPU
  against the device's limit, on CPU against the host memory available). The compiled program
  is what runs; the persistent compilation cache serves it as it serves a jitted call."""

  def __init__(self, devices: cascade.BatchDevices, batch_size: int):
    self.devices = devices
    self.batch_size = batch_size
    self.programs = {}  # (stage index, split, argument signature) -> compiled sampler

  def get(self, s: int, st: cascade.Stage, sample_fn, args: tuple, split: bool):
    key = (s, split, multihost.argument_signature(args[1:]))  # the params are the stage's
    if key not in self.programs:
      program = sample_fn.lower(*args).compile()
      devices = self.devices.devices if split else self.devices.devices[:1]
      device_memory.log_check(
        program,
        devices,
        what=f'{st.config.stage} sampler memory (batch {len(args[1])})',
        fixes=f'Lower --batch_size (now {self.batch_size}).',
      )
      self.programs[key] = program
    return self.programs[key]


class _EditBatches:
  """The init images of a request, fitted per stage batch by batch (one batch in memory)."""

  def __init__(self, req: SampleRequest, stages: Sequence[cascade.Stage]):
    self.paths = editing.find_images(req.init_images)
    self.plans = editing.plan(stages, strength=req.strength, inpaint=req.mask is not None)
    self.mask_path = req.mask
    for path in self.paths:  # say what is done to every image, before any compute
      size = editing.load_image(path).size  # after its EXIF rotation
      for line in editing.describe_plan(path, size, stages, self.plans):
        log.info('%s', line)
    if req.mask is not None:
      log.info(
        '%s: white = repaint; fitted like its image, a pixel of a smaller stage is repainted when '
        'any part of it is.',
        req.mask,
      )

  def arrays(self, inits: Sequence[int]):
    """(lowres [B, r, r, 3] | None, per stage (x_init | None, mask | None)) of a batch."""
    try:
      pictures = [editing.load_image(self.paths[i]) for i in inits]
      masks = [
        editing.load_mask(self.mask_path, im.size, self.paths[i]) if self.mask_path else None
        for im, i in zip(pictures, inits, strict=True)
      ]
    except editing.EditError as e:  # the file changed since the request was validated
      raise SampleError(str(e)) from e
    return editing.stage_arrays(pictures, masks, self.plans)
