"""Text -> images through the cascade: restore stages, encode prompts, sample, write files.

  run(SampleRequest(prompts=[...], checkpoints=['runs/base64', 'runs/sr256'], ...))

Every stage's model is rebuilt from the config saved in its checkpoint (EMA params by default).
Output: one PNG per image, a grid, and a JSON sidecar per image with every setting needed to
reproduce it. Inputs are validated, and the output folder checked, before any compute.
"""

import dataclasses
import gc
import json
import logging
import os
import pathlib
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from imagen_jax import cascade, checkpoints, images, stage

log = logging.getLogger(__name__)


class SampleError(ValueError):
  """Bad sampling input; the message names the problem and the fix."""


@dataclasses.dataclass
class SampleRequest:
  prompts: list[str]
  checkpoints: list[str]  # run folders, base stage first
  out: str = 'samples'
  num_images: int = 1  # per prompt
  seed: int = 0
  batch_size: int = 8
  samplers: list[str] | None = None  # per stage (one value: all stages); None: config's
  steps: list[int] | None = None
  guidance: list[float] | None = None
  thresholding: str | None = None
  dynamic_percentile: float | None = None
  dynamic_max: float | None = None
  aug_level: float | None = None
  stop_at: int | None = None  # number of stages to run (None: all)
  use_ema: bool = True
  overwrite: bool = False
  training_prompts: int = 0  # add the first N captions of the base stage's training data


def _per_stage(values: Sequence | None, n: int, name: str) -> list:
  if values is None:
    return [None] * n
  values = list(values)
  if len(values) == 1:
    return values * n
  if len(values) != n:
    raise SampleError(f'--{name} has {len(values)} values for {n} stages; give 1 or {n}.')
  return values


def validate(req: SampleRequest) -> None:
  """Everything checkable before loading anything."""
  if not req.prompts and req.training_prompts < 1:
    raise SampleError(
      'No prompt given: pass --prompt "a red apple" (repeatable), --prompts_file or '
      '--training_prompts N.'
    )
  for i, p in enumerate(req.prompts):
    if not p or not p.strip():
      raise SampleError(f'Prompt {i} is empty or whitespace; every prompt needs text.')
  if not req.checkpoints:
    raise SampleError('No checkpoints: pass --checkpoints runs/base64[,runs/sr256[,runs/sr1024]].')
  if req.num_images < 1:
    raise SampleError(f'--num_images must be a positive integer, got {req.num_images}.')
  if req.batch_size < 1:
    raise SampleError(f'--batch_size must be a positive integer, got {req.batch_size}.')
  for s in req.steps or []:
    if s < 1:
      raise SampleError(f'--steps must be positive integers, got {s}.')
  for g in req.guidance or []:
    if g < 0:
      raise SampleError(f'--guidance must be >= 0 (1 means no guidance), got {g}.')
  if req.stop_at is not None and not 1 <= req.stop_at <= len(req.checkpoints):
    raise SampleError(f'--stop_at must be between 1 and {len(req.checkpoints)}, got {req.stop_at}.')


def slug(text: str, limit: int = 40) -> str:
  return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')[:limit] or 'prompt'


def output_paths(req: SampleRequest) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(png, json) per image, in prompt-major order."""
  out = pathlib.Path(req.out)
  paths = []
  for p_idx, prompt in enumerate(req.prompts):
    for k in range(req.num_images):
      stem = f'{p_idx:03d}_{k:02d}_{slug(prompt)}'
      paths.append((out / f'{stem}.png', out / f'{stem}.json'))
  return paths


def prepare_output(req: SampleRequest) -> None:
  """Create and test-write the output folder; refuse to overwrite unless asked."""
  out = pathlib.Path(req.out)
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / '.write_test'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise SampleError(
      f'Cannot write to the output folder {out}: {e.strerror}. Pass --out DIR.'
    ) from e
  if not req.overwrite:
    existing = [str(p) for pair in output_paths(req) for p in pair if p.exists()]
    if (out / 'grid.png').exists():
      existing.append(str(out / 'grid.png'))
    if existing:
      raise SampleError(
        f'{len(existing)} output files exist already (e.g. {existing[0]}); pass --overwrite to '
        'replace them, or choose another --out.'
      )


def restore_stage(workdir: str, options_overrides: dict, use_ema: bool) -> cascade.Stage:
  """A stage from the latest finished checkpoint in workdir, built from its saved config."""
  try:
    step = checkpoints.latest_finished_step(workdir)
  except checkpoints.CheckpointError as e:
    raise SampleError(str(e)) from e
  manager = checkpoints.make_manager(workdir, read_only=True)
  try:
    config = checkpoints.restore_config(manager, step)
    graphdef, abstract_params = stage.abstract_model(config)
    key = 'ema_params' if use_ema else 'params'
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params
    )
    target = {key: placed}
    restored = manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item=target, partial_restore=True)),
    )
  finally:
    manager.close()
  options = cascade.SamplingOptions.from_config(config, **options_overrides)
  st = cascade.Stage(
    config=config, graphdef=graphdef, params=restored['state'][key], options=options
  )
  st.step = step  # type: ignore[attr-defined]
  st.workdir = str(workdir)  # type: ignore[attr-defined]
  return st


def check_chain(stages: Sequence[cascade.Stage]) -> None:
  if stage.is_super_resolution(stages[0].config):
    raise SampleError(
      f'The first checkpoint ({stages[0].workdir}) is a super-resolution stage '
      f'({stages[0].config.stage}); list the base stage first.'
    )
  for prev, nxt in zip(stages, stages[1:], strict=False):
    if not stage.is_super_resolution(nxt.config):
      raise SampleError(
        f'{nxt.workdir} is not a super-resolution stage; only the first may be base.'
      )
    if nxt.config.data.lowres_resolution != prev.config.data.resolution:
      raise SampleError(
        f'{nxt.workdir} upsamples {nxt.config.data.lowres_resolution} px images but the stage '
        f'before it ({prev.workdir}) makes {prev.config.data.resolution} px.'
      )


def encode_prompts(prompts: list[str], stages: Sequence[cascade.Stage]) -> tuple[list, list]:
  """Per-stage (text_embs, text_mask); each distinct encoder loaded once, then freed."""
  from imagen_jax.text import encoder as encoder_lib

  by_key = {}
  for st in stages:
    key = (st.config.text.encoder, int(st.config.text.max_length))
    if key not in by_key:
      enc = encoder_lib.load_text_encoder(key[0], max_length=key[1])
      by_key[key] = enc.encode(prompts)
      del enc
      gc.collect()  # the encoder is freed before the U-Nets run
  embs = [by_key[(st.config.text.encoder, int(st.config.text.max_length))] for st in stages]
  return [e for e, _ in embs], [m for _, m in embs]


def run(req: SampleRequest) -> list[pathlib.Path]:
  """Sample, write PNGs + sidecars + grid; returns the PNG paths of the last stage."""
  validate(req)
  prepare_output(req)
  n_stages = req.stop_at or len(req.checkpoints)
  samplers_ = _per_stage(req.samplers, n_stages, 'sampler')
  steps_ = _per_stage(req.steps, n_stages, 'steps')
  guidance_ = _per_stage(req.guidance, n_stages, 'guidance')
  stages = []
  for i, workdir in enumerate(req.checkpoints[:n_stages]):
    overrides = dict(
      sampler=samplers_[i],
      steps=steps_[i],
      guidance=guidance_[i],
      thresholding=req.thresholding,
      dynamic_percentile=req.dynamic_percentile,
      dynamic_max=req.dynamic_max,
      aug_level=req.aug_level,
    )
    try:
      stages.append(restore_stage(workdir, overrides, req.use_ema))
    except ValueError as e:
      raise SampleError(str(e)) from e
  check_chain(stages)
  if req.training_prompts:
    from imagen_jax.data import pipeline

    req.prompts = list(req.prompts) + pipeline.sample_captions(
      stages[0].config, req.training_prompts
    )
    prepare_output(req)

  all_prompts = [p for p in req.prompts for _ in range(req.num_images)]
  text_embs, text_mask = encode_prompts(list(req.prompts), stages)
  repeat = lambda a: np.repeat(np.asarray(a), req.num_images, axis=0)
  text_embs = [repeat(e) for e in text_embs]
  text_mask = [repeat(m) for m in text_mask]

  finals = []
  timings = [0.0] * len(stages)
  for start in range(0, len(all_prompts), req.batch_size):
    sl = slice(start, start + req.batch_size)
    rng = jax.random.fold_in(jax.random.key(req.seed), start // req.batch_size)
    lowres = None
    for i, st in enumerate(stages):
      t0 = time.perf_counter()
      lowres = st.sample_fn(
        st.params,
        jnp.asarray(text_embs[i][sl]),
        jnp.asarray(text_mask[i][sl]),
        jax.random.fold_in(rng, i),
        lowres,
      )
      lowres.block_until_ready()
      timings[i] += time.perf_counter() - t0
    out = np.asarray(lowres)
    if not np.all(np.isfinite(out)):
      raise SampleError(
        'The sampler produced NaN/Inf values (no images written). The checkpoint may be '
        'diverged; try another checkpoint, fewer --guidance, or --thresholding=dynamic.'
      )
    finals.append(out)
  finals = np.concatenate(finals)

  written = []
  pixels = images.to_uint8(finals)
  for idx, ((png, side), prompt) in enumerate(zip(output_paths(req), all_prompts, strict=True)):
    images.save_png(pixels[idx], png, overwrite=req.overwrite)
    sidecar = {
      'prompt': prompt,
      'image_index': idx % req.num_images,
      'seed': req.seed,
      'batch_size': req.batch_size,
      'num_images': req.num_images,
      'all_prompts': req.prompts,
      'stages': [
        {
          'checkpoint': os.path.abspath(st.workdir),
          'step': st.step,
          'stage': st.config.stage,
          'resolution': int(st.config.data.resolution),
          'params': 'ema' if req.use_ema else 'raw',
          **dataclasses.asdict(st.options),
        }
        for st in stages
      ],
    }
    tmp = side.with_name(f'.{side.name}.tmp')
    tmp.write_text(json.dumps(sidecar, indent=2))
    os.replace(tmp, side)
    written.append(png)
  images.save_png(images.make_grid(pixels), pathlib.Path(req.out) / 'grid.png', overwrite=True)
  for st, secs in zip(stages, timings, strict=True):
    log.info('%s: %.2f s for %d images (compile included).', st.config.stage, secs, len(finals))
  return written
