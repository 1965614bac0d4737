"""Evaluate a trained base stage on the digits benchmark: restore, prompt, sample, judge.

  result = run(EvalRequest(checkpoints='runs/digits', num=500))
  print(scoring.format_table(result['rows']))

The stage is rebuilt from its checkpoint's saved config (EMA params by default) and samples
with its own sampler settings unless overridden. Prompts are embedded exactly as training saw
them (`encode_prompts`: bit-identical to the embedding cache built on the same devices).
Image i draws its noise from fold_in(fold_in(key(seed), i), 0) (`cascade.image_keys`), as
`sample.py` does for the base stage, so the images do not depend on --batch_size (up to the float
rounding of the network at another batch size), and `sample.py` with the same prompts and seed
gives the same images.
Every input is checked before any compute, and nothing is written unless `out` is given
(never over an existing file without `overwrite`).
"""

import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable

import jax
import ml_collections
import ml_dtypes
import numpy as np

from imagen_jax import cascade, compile_events, multihost, sharding, stage
from imagen_jax.data import digits
from imagen_jax.evaluate import judge as judge_lib
from imagen_jax.evaluate import scoring
from imagen_jax.evaluate.scoring import EvalError

log = logging.getLogger(__name__)

# The embedding cache stores bfloat16 (text/cache.py): training saw the encoder's output so.
CACHE_EMBEDDING_DTYPE = ml_dtypes.bfloat16


@dataclasses.dataclass
class EvalRequest:
  checkpoints: str  # the base stage's run folder, or RUN@STEP
  num: int = 500  # generated images, a multiple of the 10 classes
  seed: int = 0
  batch_size: int = 50
  sampler: str | None = None  # None: the run's config.sample settings
  steps: int | None = None
  guidance: float | None = None
  thresholding: str | None = None
  dynamic_percentile: float | None = None
  dynamic_max: float | None = None
  use_ema: bool = True
  judge: str | None = None  # an existing judge file; None: cached under judge_dir
  judge_dir: str = 'cache/judge'
  k: int = 3  # neighbours of the precision/recall manifolds
  calibration: bool = True
  out: str | None = None  # JSON file for the result
  grid: str | None = None  # PNG of generated samples: one row per class, seen then held-out
  overwrite: bool = False
  # Caption templates to probe instead of the benchmark's seen/held-out ones (scoring.prompt_set)
  templates: tuple[str, ...] = ()


def check_labelled_base(config: ml_collections.ConfigDict, where: str) -> None:
  """EvalError unless `config` is a base stage trained on the labelled digits source."""
  if stage.is_super_resolution(config):
    raise EvalError(
      f'{where} is a super-resolution stage ({config.stage}); the evaluation scores the base '
      'stage: pass the base run folder to --checkpoints.'
    )
  if config.data.source != 'digits':
    raise EvalError(
      f"{where} was trained on data.source='{config.data.source}', which has no class labels; "
      'the evaluation needs a labelled dataset: train with --config.data.source=digits.'
    )
  split = str(config.data.get('split', 'train'))
  if split != 'train':
    raise EvalError(
      f"{where} was trained on the digits '{split}' split; the evaluation scores against the "
      'test split as unseen images (its real_test row) and the train split as the reference: '
      'train on --config.data.split=train.'
    )


def encode_prompts(
  config: ml_collections.ConfigDict, prompts: list[str], *, whole: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """text_embs [P, L, D] float32 (zeros at padding), text_mask [P, L] bool, bit-identical to
  what training looks up in the cache that imagen_jax.precompute builds on the same devices:
  the run's encoder, max_length and compute dtype, the same device mesh and batch shape
  (text.precompute_batch_size rounded to the device count, padded with ''), then rounded to the
  cache's bfloat16. (bfloat16 results move by a few ulp with the batch shape or sharding.)
  `whole`: EvalError if a prompt is longer than the run's text.max_length tokens (cut, it could
  lose the word that names the class), as user-given --template prompts can be."""
  from imagen_jax import precompute
  from imagen_jax.text import t5

  precompute.check_encoder_unchanged(config)
  mesh = precompute.make_encoder_mesh(config)
  # This process's devices only, whatever mesh the caller set (training's spans every process).
  local = mesh or jax.sharding.Mesh(
    np.asarray(jax.local_devices()[:1]).reshape(1, 1), ('data', 'fsdp')
  )
  with jax.set_mesh(local):
    try:
      encoder = precompute.load_encoder(config, mesh)
    except t5.T5CheckpointError as e:  # a moved T5 folder, or a Hub name offline
      raise EvalError(f'The run {precompute.unloadable_encoder(config, e)}') from e
    if whole:
      _check_whole(encoder.tokenizer, prompts)
    devices = 1 if mesh is None else mesh.devices.size
    batch = -(-int(config.text.get('precompute_batch_size', 64)) // devices) * devices
    text_embs, text_mask = [], []
    for start in range(0, len(prompts), batch):
      chunk = list(prompts[start : start + batch])
      embs, mask = encoder.encode(chunk + [''] * (batch - len(chunk)))  # [B, L, D], [B, L]
      text_embs.append(np.asarray(embs)[: len(chunk)])
      text_mask.append(np.asarray(mask)[: len(chunk)])
  embs = np.concatenate(text_embs).astype(CACHE_EMBEDDING_DTYPE).astype(np.float32)
  mask = np.concatenate(text_mask)
  return np.where(mask[..., None], embs, 0.0).astype(np.float32), mask


def _check_whole(tokenizer, prompts: list[str]) -> None:
  """EvalError naming the longest prompt when one has more than tokenizer.max_length tokens."""
  ids = tokenizer.hf_tokenizer(list(prompts), truncation=False)['input_ids']
  longest = max(range(len(prompts)), key=lambda i: len(ids[i]))
  if len(ids[longest]) > tokenizer.max_length:
    raise EvalError(
      f'The prompt {prompts[longest]!r} is {len(ids[longest])} tokens ({tokenizer.name}), longer '
      f"than the run's text.max_length={tokenizer.max_length}, so its end would be cut: shorten "
      'its --template.'
    )


def generate(
  sample_fn: Callable,
  params,
  text_embs: np.ndarray,
  text_mask: np.ndarray,
  *,
  seed: int,
  batch_size: int,
  devices: cascade.BatchDevices | None = None,
  compiles: compile_events.Compiles | None = None,
) -> np.ndarray:
  """[N, R, R, 3] images in [-1, 1], sampled in batches of `batch_size` (the last one padded,
  so one compiled shape); non-finite values are kept (the caller counts them). `devices`: the
  batches are placed by it (`params` on its params_sharding); None: as `params` and jax place
  them. `compiles`: the sampler's compiles are added to it (imagen_jax.compile_events)."""
  n = len(text_embs)
  put = np.asarray  # host rows: a jitted sample_fn places them, _mesh_sampler splits them
  if devices is not None:
    sample_fn, params, put = devices.place(sample_fn, params, devices.splits(batch_size))
  out = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size).clip(max=n - 1)
    keys = cascade.image_keys(seed, range(start, start + batch_size))  # padding: its own keys
    args = (params, put(text_embs[rows]), put(text_mask[rows]), put(keys))
    with compile_events.counting() as made:  # the sampler's own compile
      images = sample_fn(*args)
    if compiles is not None:
      compiles.add(made)
    out.append(np.asarray(images)[: min(batch_size, n - start)])
  return np.concatenate(out)


def _mesh_sampler(sample_fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """sample_fn over the training mesh (one or several processes): text inputs split by row where
  the mesh divides the batch (`sharding.sampler_inputs`), images replicated, so every process
  holds the whole batch; compiled on the first call, then a barrier, so that the processes start
  its collectives together."""
  everywhere = sharding.replicated(mesh)
  run = multihost.compiled_together(
    jax.jit(sample_fn, out_shardings=everywhere), 'imagen_jax:eval_sampler_compiled'
  )

  def sample(params, text_embs, text_mask, keys):
    return run(params, *sharding.sampler_inputs(mesh, text_embs, text_mask, keys))

  return sample


def _finite(images: np.ndarray) -> tuple[np.ndarray, int]:
  """(images with non-finite images set to 0, how many images had a non-finite value)."""
  bad = ~np.isfinite(images).reshape(len(images), -1).all(axis=1)
  if bad.any():
    images = np.where(bad[:, None, None, None], 0.0, images).astype(np.float32)
  return images, int(bad.sum())


def validate(req: EvalRequest) -> None:
  """Everything checkable without loading a model."""
  scoring.prompt_set(req.num, req.templates)  # --num and any --template
  if req.batch_size < 1:
    raise EvalError(f'--batch_size must be a positive integer, got {req.batch_size}.')
  from imagen_jax import sample_lib

  if not 0 <= req.seed < sample_lib.SEEDS:
    raise EvalError(
      f'--seed must be in [0, {sample_lib.SEEDS}) (a JAX key takes 32 bits), got {req.seed}.'
    )
  if req.out and req.grid and pathlib.Path(req.out).resolve() == pathlib.Path(req.grid).resolve():
    raise EvalError(
      f'--out and --grid name the same file ({req.out}); pass a .json for --out and a .png for '
      '--grid.'
    )
  if req.grid and not req.grid.lower().endswith('.png'):  # sample.py's --grid is the spacing
    raise EvalError(
      f"--grid {req.grid} is not a .png path: evaluate.py's --grid names the PNG of samples to "
      "write, e.g. --grid=grid.png (the sampling grid spacing is the run config's sample.grid)."
    )
  if req.steps is not None and req.steps < 1:
    raise EvalError(f'--steps must be a positive integer, got {req.steps}.')
  if req.guidance is not None and req.guidance < 0:
    raise EvalError(f'--guidance must be >= 0 (1 means no guidance), got {req.guidance}.')
  from imagen_jax import cascade

  unused = cascade.unused_thresholding_flags(
    req.thresholding, req.dynamic_percentile, req.dynamic_max
  )
  if unused:
    raise EvalError(unused)
  if not 1 <= req.k < min(req.num, 100):
    raise EvalError(f'--k must be in [1, min(--num, 100)), got {req.k}; 3 is the usual value.')
  from imagen_jax import checkpoints

  try:
    run_dir, _ = checkpoints.parse_run(req.checkpoints)
  except checkpoints.CheckpointError as e:
    raise EvalError(f'--checkpoints {req.checkpoints}: {e}') from e
  if not pathlib.Path(run_dir).is_dir():
    raise EvalError(f'--checkpoints {req.checkpoints}: the folder {run_dir} does not exist.')
  if req.judge is not None and not pathlib.Path(req.judge).is_file():
    raise EvalError(
      f'--judge {req.judge} does not exist; omit --judge to train and cache a judge under '
      f'--judge_dir ({req.judge_dir}).'
    )
  for flag, path in (('--out', req.out), ('--grid', req.grid)):
    if path:
      _check_output(flag, pathlib.Path(path), overwrite=req.overwrite)


def _check_output(flag: str, path: pathlib.Path, *, overwrite: bool) -> None:
  if path.is_dir():
    raise EvalError(f'{flag} {path} is a folder; give a file name.')
  if path.exists() and not overwrite:
    raise EvalError(f'{flag} {path} exists already; pass --overwrite to replace it.')
  if not path.parent.is_dir():
    raise EvalError(f'{flag} {path}: the folder {path.parent} does not exist; create it first.')
  if not os.access(path.parent, os.W_OK):
    raise EvalError(f'{flag} {path}: cannot write to the folder {path.parent}.')


def class_grid(
  images: np.ndarray, prompts: scoring.PromptSet, *, per_group: int = 4, by_template: bool = False
) -> np.ndarray:
  """uint8 grid of generated images [N, R, R, 3]: row c holds up to `per_group` samples of
  class c from seen-template prompts, then up to `per_group` from held-out ones; `by_template`
  (given --template), up to `per_group` of each template instead, in the given order."""
  from imagen_jax import images as images_lib

  if by_template:
    groups = [np.asarray(prompts.templates) == t for t in dict.fromkeys(prompts.templates)]
  else:
    groups = [~prompts.heldout, prompts.heldout]
  rows = []
  for c in range(digits.NUM_CLASSES):
    for group in groups:
      idx = np.flatnonzero((prompts.labels == c) & group)[:per_group]
      tiles = np.full((per_group, *images.shape[1:]), 1.0, np.float32)  # white: no sample
      tiles[: len(idx)] = images[idx]
      rows.append(tiles)
  columns = len(groups) * per_group
  return images_lib.make_grid(images_lib.to_uint8(np.concatenate(rows)), columns=columns)


def _saved_config(spec: str) -> tuple[ml_collections.ConfigDict, int]:
  """(config, step) of a run folder (or RUN@STEP) without restoring any array."""
  from imagen_jax import checkpoints

  try:
    run_dir, step = checkpoints.parse_run(spec)
    checkpoints.latest_finished_step(run_dir)  # a clear error for a folder with no checkpoint
    manager = checkpoints.make_manager(run_dir, read_only=True)
    try:  # the same fallback over damaged checkpoints as the restore of the params
      step, config, _ = checkpoints.restore_with_fallback(
        manager,
        step=step,
        restore_fn=lambda s: checkpoints.Loaded(checkpoints.restore_config(manager, s)),
      )
      return config, step
    finally:
      manager.close()
  except checkpoints.CheckpointError as e:
    raise EvalError(f'--checkpoints {spec}: {e}') from e


def _load_judge(req: EvalRequest, resolution: int) -> judge_lib.Judge:
  try:
    if req.judge is not None:
      judge = judge_lib.load_judge(req.judge)
    else:
      return judge_lib.load_or_train(resolution=resolution, cache_dir=req.judge_dir)
  except judge_lib.JudgeError as e:
    raise EvalError(str(e)) from e
  if judge.resolution != resolution:
    raise EvalError(
      f'--judge {req.judge} scores {judge.resolution} px images but the stage makes '
      f'{resolution} px; omit --judge to use (or train) the {resolution} px judge.'
    )
  seed = judge.meta.get('seed', 0)
  want = judge_lib.fingerprint(resolution, seed if isinstance(seed, int) else 0)
  if judge.meta.get('fingerprint') != want:
    log.warning(
      '--judge %s was trained on other data or settings than this code trains its judge with '
      '(fingerprint %s, this code: %s): its scores are not comparable with runs scored by the '
      'cached judge. Omit --judge to use (or train) the current one.',
      req.judge,
      judge.meta.get('fingerprint'),
      want,
    )
  return judge


def run(req: EvalRequest) -> dict:
  """The whole evaluation; returns the result (also written to `req.out` when given)."""
  from imagen_jax import sample_lib

  start = time.perf_counter()
  validate(req)
  batch_size = min(req.batch_size, req.num)  # a larger batch would only sample padding rows
  config, step = _saved_config(req.checkpoints)
  check_labelled_base(config, req.checkpoints)
  overrides = dict(
    sampler=req.sampler,
    steps=req.steps,
    guidance=req.guidance,
    thresholding=req.thresholding,
    dynamic_percentile=req.dynamic_percentile,
    dynamic_max=req.dynamic_max,
  )
  try:
    options = cascade.SamplingOptions.from_config(config, **overrides)  # fail before compute
  except ValueError as e:
    raise EvalError(str(e)) from e
  unused = cascade.dynamic_flags_unused_by(
    [(req.checkpoints, options.thresholding)], req.dynamic_percentile, req.dynamic_max
  )
  if unused:
    raise EvalError(unused)
  why = cascade.guidance_without_unconditional(
    req.checkpoints, config, options.guidance, '--guidance 1'
  )
  if why:
    raise EvalError(why)
  resolution = int(config.data.resolution)
  judge = _load_judge(req, resolution)
  devices = cascade.BatchDevices()
  try:
    st = sample_lib.restore_stage(req.checkpoints, overrides, req.use_ema, devices.params_sharding)
  except ValueError as e:  # SampleError, bad sampler options
    raise EvalError(str(e)) from e
  prompts = scoring.prompt_set(req.num, req.templates)
  text_embs, text_mask = encode_prompts(st.config, list(prompts.prompts), whole=bool(req.templates))
  t0 = time.perf_counter()
  compiles = compile_events.Compiles()
  images = generate(
    st.sample_fn,
    st.params,
    text_embs,
    text_mask,
    seed=req.seed,
    batch_size=batch_size,
    devices=devices,
    compiles=compiles,
  )
  sampling_seconds = time.perf_counter() - t0
  log.info(
    'Sampled %d images in %.1f s, batches of %d%s, compile included (the sampler %s).',
    len(images),
    sampling_seconds,
    batch_size,
    devices.describe(devices.splits(batch_size)),
    compiles.summary(),
  )
  images, num_nonfinite = _finite(images)
  if num_nonfinite:
    log.warning(
      '%d of %d images held NaN/Inf values; they are scored as flat grey images.',
      num_nonfinite,
      len(images),
    )
  reference = scoring.Reference.build(judge)
  rows = {
    'generated': scoring.score(
      images,
      prompted=prompts.labels,
      heldout=prompts.heldout,
      reference=reference,
      k=req.k,
      templates=prompts.templates,
    )
  }
  rows['generated']['num_nonfinite'] = num_nonfinite
  if req.calibration:
    calibration = scoring.calibration_sets(resolution, num=req.num, seed=req.seed, k=req.k)
    for name, (cal_images, prompted, heldout) in calibration.items():
      rows[name] = scoring.score(
        cal_images, prompted=prompted, heldout=heldout, reference=reference, k=req.k
      )
    real = rows['real_test']
    if real['n'] < len(images):  # FD shrinks as n grows: the floor's n, for a fair ratio
      rows['generated'].update(
        scoring.fd_at_matched_n(
          images, prompts.labels, calibration['real_test'][1], reference=reference, k=req.k
        )
      )
  result = {
    'checkpoint': os.path.abspath(getattr(st, 'workdir', req.checkpoints)),
    'step': int(getattr(st, 'step', step)),
    'stage': config.stage,
    'resolution': resolution,
    'text_encoder': config.text.encoder,
    'num': req.num,
    'templates': list(req.templates) or None,  # None: the benchmark's seen/held-out templates
    'seed': req.seed,
    'batch_size': batch_size,
    # As sample.py's sidecars: the images are the same for the same seed on the same backend and
    # device count (on a CPU an odd batch samples on one device, an even one on two).
    'sampled_on': {'backend': jax.default_backend(), 'devices': len(devices.devices)},
    'params': 'ema' if req.use_ema else 'raw',
    **{k: v for k, v in dataclasses.asdict(st.options).items() if k != 'aug_level'},
    'judge': os.path.abspath(judge.path) if judge.path else judge.path,
    'judge_fingerprint': judge.meta.get('fingerprint'),
    'judge_test_accuracy': judge.test_accuracy,
    'k': req.k,
    'reference': f'digits train split ({len(reference.features)} images)',
    'sampling_seconds': round(sampling_seconds, 2),
    'seconds': round(time.perf_counter() - start, 2),
    'rows': rows,
  }
  if req.grid:
    from imagen_jax import images as images_lib

    grid = class_grid(images, prompts, by_template=bool(req.templates))
    images_lib.save_png(grid, req.grid, overwrite=req.overwrite)
    result['grid_png'] = os.path.abspath(req.grid)  # 'grid' is the sampler's log-SNR spacing
  if req.out:
    write_json(result, req.out, overwrite=req.overwrite)
  return result


def write_json(result: dict, path: str | os.PathLike, *, overwrite: bool) -> None:
  """Atomic write; refuses an existing file unless `overwrite`."""
  path = pathlib.Path(path)
  if path.exists() and not overwrite:
    raise EvalError(f'--out {path} exists already; pass --overwrite to replace it.')
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  tmp.write_text(json.dumps(result, indent=1) + '\n')
  os.replace(tmp, path)


def train_eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """Images per batch of the in-training evaluation: min(train.eval_num, train.batch_size)."""
  return max(1, min(int(config.train.get('eval_num', 40)), int(config.train.batch_size)))


def check_train_eval(config: ml_collections.ConfigDict) -> None:
  """EvalError when `train.eval_every` > 0 but the run cannot be evaluated (no labels, an SR
  stage, a bad train.eval_num): train.py checks it before the run starts."""
  if int(config.train.get('eval_every', 0)) <= 0:
    return
  check_labelled_base(config, 'train.eval_every > 0: this run')
  try:
    scoring.check_num(int(config.train.get('eval_num', 40)))
  except EvalError as e:
    raise EvalError(f'config.train.eval_num: {e}'.replace('--num', 'eval_num')) from e


def make_train_eval_fn(
  config: ml_collections.ConfigDict,
  graphdef,
  workdir: str | os.PathLike,
  *,
  mesh: jax.sharding.Mesh | None = None,
) -> Callable[..., dict[str, float]] | None:
  """fn(ema_params, step) -> flat scalar metrics of `config.train.eval_num` samples from a
  fixed prompt set and seed (config.seed); None when `config.train.eval_every` is 0.

  The sampler (config.sample settings) is compiled on the first call and reused; the prompts
  are encoded once, here. The judge is cached under `config.train.eval_judge_dir`, relative
  to `workdir` unless absolute. Keys: adherence, adherence_seen, adherence_heldout,
  entropy_bits, fd, precision, recall, nn_train, num_nonfinite. FD is biased upward at small
  sample sizes (real test images score ~19 at 40 samples, ~1.7 at 359): read it as a trend
  across steps, and use evaluate.py (--num 500) for the comparison with the real floor.

  `mesh` (train.py passes the training mesh): the samples are computed over it, each batch split
  by row where its devices divide it, with replicated outputs (compiled once, then a barrier, as
  the training sample grids). With several processes every process calls it at the same steps,
  so every process scores the same images with the same judge (trained and cached by process 0
  first).
  """
  if int(config.train.get('eval_every', 0)) <= 0:
    return None
  check_train_eval(config)
  prompts = scoring.prompt_set(int(config.train.get('eval_num', 40)))
  judge_dir = pathlib.Path(config.train.get('eval_judge_dir', 'cache/judge')).expanduser()
  if not judge_dir.is_absolute():
    judge_dir = pathlib.Path(workdir) / judge_dir
  resolution = int(config.data.resolution)
  if jax.process_count() > 1:  # one process trains and caches the judge; the others load it
    if jax.process_index() == 0:
      judge_lib.load_or_train(resolution=resolution, cache_dir=judge_dir)
    multihost.barrier('imagen_jax:eval_judge_cached')
  reference = scoring.Reference.build(
    judge_lib.load_or_train(resolution=resolution, cache_dir=judge_dir)
  )
  text_embs, text_mask = encode_prompts(config, list(prompts.prompts))
  options = cascade.SamplingOptions.from_config(config)
  sample_fn = cascade.make_stage_sampler(config, graphdef, options)
  if mesh is not None:  # the training mesh: the params live on it
    sample_fn = _mesh_sampler(sample_fn, mesh)
  batch_size = train_eval_batch_size(config)
  seed = int(config.seed)

  def eval_fn(ema_params, step: int) -> dict[str, float]:
    del step  # the same prompts and noise at every step: only the model changes
    images = generate(sample_fn, ema_params, text_embs, text_mask, seed=seed, batch_size=batch_size)
    images, num_nonfinite = _finite(images)
    row = scoring.score(
      images, prompted=prompts.labels, heldout=prompts.heldout, reference=reference
    )
    out = {k: float(row[k]) for k in scoring.SCALARS}
    out['num_nonfinite'] = float(num_nonfinite)
    return out

  return eval_fn
