"""Training of one cascade stage: sharded state, the jitted train step, and the loop.

  train_and_evaluate(config, workdir)

One code path for 1 CPU, N local devices and multi-host pods: a ('data', 'fsdp') mesh over
all devices, params and optimizer state sharded by the logical rules, the batch split over
both axes, one `jax.jit` step with pinned in/out shardings and donated state, compiled ahead
of time once per batch shape (`CompiledSteps`: one per text length bucket with
data.text_length=batch). A thread assembles batches and copies them to the devices ahead of the
step (`device_prefetch`); checkpoints hold the data position of the last batch consumed.
"""

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import numbers
import os
import pathlib
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from imagen_jax import (
  cascade,
  checkpoints,
  compile_events,
  device_memory,
  images,
  multihost,
  optim,
  run_lock,
  sharding,
  stage,
)
from imagen_jax import flops as flops_lib
from imagen_jax.data import prefetch
from imagen_jax.diffusion import gaussian, guidance, losses

log = logging.getLogger(__name__)

TrainState = dict[str, Any]  # step, params, ema_params, opt_state, rng


class TrainingError(RuntimeError):
  """Training cannot go on; the message names the step and the reason."""


# ------------------------------------------------------------------------------ state


def make_state_shardings(
  abstract_state: TrainState, mesh, state_layout: str = 'auto'
) -> TrainState:
  """NamedShardings for a (possibly abstract) train state, by the logical axis rules.

  state_layout (`sharding.STATE_LAYOUTS`; 'auto' as `train.state_layout` defaults to):
  'conv_ohwi' (or 'auto' on GPU) makes the 4-D leaves of params, EMA and optimizer state
  Formats with cuDNN's kernel layout (`sharding.state_formats`); 'default' keeps them
  row-major.
  """
  return {
    'step': sharding.replicated(mesh),
    'rng': sharding.replicated(mesh),
    **{
      k: sharding.state_formats(
        sharding.state_shardings(abstract_state[k], mesh), abstract_state[k], state_layout
      )
      for k in ('params', 'ema_params', 'opt_state')
    },
  }


def abstract_train_state(
  config: ml_collections.ConfigDict, tx: optax.GradientTransformation, mesh
) -> tuple[nnx.GraphDef, TrainState, TrainState, Callable[[], TrainState]]:
  """(graphdef, abstract state, state shardings, init): nothing allocated until init() runs.

  init() creates the params directly in their shards (jit with out_shardings); a resumed run
  never calls it and restores into the abstract state instead, so only one state is ever live.
  The shardings follow config.train.state_layout (`make_state_shardings`); init() returns the
  state in those layouts (`sharding.relayout`, a leaf at a time).
  """
  graphdef, _ = stage.abstract_model(config)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))

  def init_fn(rng):
    params = stage.init_params(config, rng)
    return {
      'step': jnp.zeros((), jnp.int32),
      'rng': train_rng,
      'params': params,
      'ema_params': jax.tree.map(jnp.copy, params),
      'opt_state': tx.init(params),
    }

  abstract = jax.eval_shape(init_fn, init_rng)
  shardings = make_state_shardings(abstract, mesh, config.train.get('state_layout', 'auto'))
  plain = sharding.plain_shardings(shardings)

  def init():
    return sharding.relayout(jax.jit(init_fn, out_shardings=plain)(init_rng), shardings)

  return graphdef, abstract, shardings, init


def replicated_bytes(config: ml_collections.ConfigDict) -> int:
  """Bytes a data-parallel device holds a copy of in training: params, EMA, gradients and the
  optimizer state, from abstract shapes (JAX's backend is not started; `cpu_devices` uses it)."""
  _, params = stage.abstract_model(config)
  tx = optim.make_optimizer(config.optim, int(config.train.num_steps))
  size = device_memory.tree_bytes
  return 3 * size(params) + size(jax.eval_shape(tx.init, params))


def create_train_state(
  config: ml_collections.ConfigDict, tx: optax.GradientTransformation, mesh
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, state, state shardings): params initialised directly in their shards."""
  graphdef, _, shardings, init = abstract_train_state(config, tx, mesh)
  return graphdef, init(), shardings


def abstract_with_shardings(state_like: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings (what orbax restores into)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings
  )


# ------------------------------------------------------------------------------- step


def update_state(
  state: TrainState, grads: Any, tx: optax.GradientTransformation, optim_config: Any
) -> tuple[TrainState, jax.Array]:
  """The optimizer and EMA half of a train step: (new state, gradient norm)."""
  accumulating = int(optim_config.grad_accum_steps) > 1
  with jax.named_scope('optimizer'):
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    applied = opt_state.mini_step == 0 if accumulating else True
    # The EMA warm-up counts optimizer updates, as the lr schedule does (micro-steps left a
    # k-fold slower warm-up: 13 % of the random init in the EMA after 1,000 updates at k = 32).
    updates_before = state['step'] // int(optim_config.grad_accum_steps)
    decay = jnp.where(applied, optim.ema_decay(updates_before, optim_config), 1.0)
    ema_params = optim.ema_update(state['ema_params'], params, decay)
  new_state = {
    'step': state['step'] + 1,
    'rng': state['rng'],
    'params': params,
    'ema_params': ema_params,
    'opt_state': opt_state,
  }
  return new_state, grad_norm


def make_train_step(
  config: ml_collections.ConfigDict,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  *,
  grad_layout: str = 'auto',
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The pure train step: diffusion loss -> grads -> optimizer -> EMA.

  Its metrics are the loss, the gradient norm and the learning rate. The loop (`_Loop`) stops
  the run at the first step whose loss or gradient norm is not finite, and checks the state
  itself (`checkpoints.array_checksums`) before any save, sample grid or evaluation uses it, so a
  NaN/Inf state is never saved, sampled or scored. The step does not check its new state: on
  an H100 (base64 b16) the profile's phase of that reduction over the new EMA was 13.7 ms of the
  152 ms step (its fusions also held EMA arithmetic), and the step with EMA and check took
  13.4 ms more than the loss and optimizer alone. Finite gradients give a finite update unless
  the update itself makes NaN (AdamW with optim.eps=0 and a zero gradient: 0/0); the next
  step's loss is then NaN wherever the forward pass reads that parameter, and a parameter it
  did not read (the null text token, when no caption of the batch was dropped) is seen by the
  check before the next save, grid or evaluation, which names the step it ran at.
  grad_layout: how the gradients are fixed before the optimizer (`optim.settle_gradients`).
  The optimizer and EMA run under `jax.named_scope('optimizer')`, so that a profile
  (`imagen_jax.op_profile`) shows what they cost.
  """
  d = config.diffusion
  schedule = stage.schedule(config)
  is_sr = stage.is_super_resolution(config)
  aug_schedule = stage.aug_schedule(config) if is_sr else None
  lr_schedule = optim.make_lr_schedule(
    config.optim, max(1, int(config.train.num_steps) // int(config.optim.grad_accum_steps))
  )

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state['rng'], state['step'])
    t_rng, noise_rng, drop_rng, aug_rng, aug_noise_rng = jax.random.split(rng, 5)
    x = batch['image']  # [B, H, W, 3]
    b = x.shape[0]
    logsnr = schedule(jax.random.uniform(t_rng, (b,)))
    noise = jax.random.normal(noise_rng, x.shape)
    drop_text = jax.random.bernoulli(drop_rng, d.cond_drop_prob, (b,))
    lowres = aug_level = None
    if is_sr:
      up = stage.upsample_lowres(batch['lowres'], resolution=x.shape[1])
      lowres, aug_level = guidance.noise_condition_aug(
        lowres=up,
        aug_level=guidance.training_aug_levels(
          aug_rng,
          batch_size=b,
          min_level=d.get('aug_level_min', 0.0),
          max_level=d.aug_level_max,
        ),
        noise=jax.random.normal(aug_noise_rng, up.shape),
        schedule=aug_schedule,
      )

    def loss_fn(params):
      model_fn = stage.make_model_fn(
        graphdef,
        params,
        text_embs=batch['text_embs'],
        text_mask=batch['text_mask'],
        lowres=lowres,
        aug_level=aug_level,
        drop_text=drop_text,
      )
      per_example = losses.diffusion_loss(
        model_fn=model_fn,
        x=x,
        logsnr=logsnr,
        noise=noise,
        objective=d.objective,
        weighting=d.loss_weighting,
        min_snr_gamma=d.min_snr_gamma,
      )
      return jnp.mean(per_example)

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    grads = optim.settle_gradients(grads, grad_layout)
    new_state, grad_norm = update_state(state, grads, tx, config.optim)
    metrics = {
      'loss': loss,
      'grad_norm': grad_norm,
      'lr': lr_schedule(state['step'] // int(config.optim.grad_accum_steps)),
    }
    return new_state, metrics

  return train_step


# -------------------------------------------------------------------------- utilities


class StopSignal:
  """SIGTERM / SIGINT (Ctrl-C): stop at the current step, save, and exit.

  One process: our own handlers set a flag. Several processes (`coordinated`): a SIGTERM on
  any host is caught by JAX's distributed preemption notifier, and `should_stop(step)` turns
  true on every host at the same step (`reached_preemption_sync_point`), so all hosts save
  the same step together; Ctrl-C is turned into a SIGTERM for the same path.
  """

  first_signal_seen = False  # by any StopSignal of this process (for train.py's message)

  def __init__(self, coordinated: bool = False):
    self.coordinated = coordinated
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    if self.coordinated:
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward_to_sigterm)
    else:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      # A second Ctrl-C (e.g. during a long compile or save): stop at once, without saving;
      # a save in progress is finished by the loop's clean-up, and a partial one never counts.
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    StopSignal.first_signal_seen = True
    log.warning(
      '%s received: saving a checkpoint at the current step, then exiting%s.',
      self.received,
      ' (Ctrl-C again: stop at once, without saving)' if signum == signal.SIGINT else '',
    )

  def _forward_to_sigterm(self, signum, frame):
    log.warning('SIGINT received: passing it on as SIGTERM, so that every host stops together.')
    os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> str | None:
    """The signal's name once the run must stop at `step` (the same step on every host)."""
    if self.coordinated and self.received is None:
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(step):
        self.received = 'SIGTERM'
        log.warning('Preemption noticed on some host: every host saves step %d and exits.', step)
    return self.received

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def compiled_flops(compiled) -> float | None:
  """FLOPs XLA's cost analysis reports for one call of a compiled function (None if it reports
  none). Not model FLOPs: on GPU it counts cuDNN convolutions and other custom calls as zero, on
  TPU it includes the remat recomputation; MFU comes from `imagen_jax.flops` instead."""
  try:
    cost = compiled.cost_analysis()
  except NotImplementedError:  # a backend without a cost model
    return None
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Analytic FLOPs of one train step on a batch (imagen_jax.flops) and the device peak."""

  model: float  # forward + backward: the MFU numerator
  hardware: float | None  # model + remat recomputation; None when remat is off
  num_devices: int
  peak: float | None  # dense bf16 FLOP/s of one device; None for an unknown device kind

  def scalars(self, steps: int, seconds: float) -> dict[str, float]:
    """Per-device model TFLOP/s and, on a known device kind, 'mfu' (and 'hfu' with remat)."""
    per_device = self.model * steps / seconds / self.num_devices
    out = {'model_tflops_per_device': per_device / 1e12}
    if self.peak:
      out['mfu'] = per_device / self.peak
      if self.hardware is not None:
        out['hfu'] = self.hardware * steps / seconds / self.num_devices / self.peak
    return out


def mean_step_flops(steps: list[StepFlops]) -> StepFlops:
  """The mean StepFlops of a window's steps, which may differ in shape (text lengths): its
  `scalars(len(steps), seconds)` counts each step's own FLOPs."""
  first = steps[0]
  hardware = None if first.hardware is None else sum(s.hardware for s in steps) / len(steps)
  return dataclasses.replace(
    first, model=sum(s.model for s in steps) / len(steps), hardware=hardware
  )


def step_flops(config: ml_collections.ConfigDict, batch: dict) -> StepFlops:
  """FLOPs of one train step on `batch` (its global shapes: the real crop size and the text
  length the batch really has) and the peak of this run's devices."""
  model_config = stage.model_config(config)
  count = flops_lib.unet_flops(
    model_config,
    batch=int(batch['image'].shape[0]),
    resolution=int(batch['image'].shape[1]),
    text_len=int(batch['text_embs'].shape[1]),
  )
  return StepFlops(
    model=count.train,
    hardware=count.train_hardware(True) if model_config.remat else None,
    num_devices=jax.device_count(),
    peak=flops_lib.peak_flops(jax.devices()[0].device_kind),
  )


# The x-axis of every W&B chart: the training step (see MetricWriter).
WANDB_STEP = 'train/step'
WANDB_MODES = ('online', 'offline', 'disabled')  # train.wandb_mode


class MetricWriter:
  """metrics.jsonl (always), TensorBoard event files, and optionally Weights & Biases."""

  def __init__(
    self,
    workdir: pathlib.Path,
    config: ml_collections.ConfigDict,
    enabled: bool,
    start_step: int = 0,
  ):
    """start_step: the step the run starts from; TensorBoard drops the events of later steps
    that earlier runs logged (re-run after a resume from an older checkpoint), as
    metrics.jsonl's rows are (`_truncate_metrics`)."""
    self.enabled = enabled
    self.tb = self.wandb = None
    if not enabled:
      return
    self.jsonl = open(workdir / 'metrics.jsonl', 'a')  # noqa: SIM115
    from tensorboardX import SummaryWriter

    self.tb = SummaryWriter(str(workdir / 'tensorboard'), purge_step=start_step + 1)
    if config.train.wandb:
      try:
        import wandb
      except ImportError as e:
        raise TrainingError(
          'config.train.wandb=True needs Weights & Biases: `pip install wandb` '
          '(or run with --config.train.wandb=False).'
        ) from e
      # One W&B run per workdir: its id is kept there, so a resumed run logs into the same one.
      # The first start lets W&B choose the id (its id helpers move between releases).
      id_file = workdir / 'wandb_run_id'
      run_id = id_file.read_text().strip() if id_file.exists() else ''
      try:
        self.wandb = wandb.init(
          project=config.train.wandb_project,
          mode=config.train.wandb_mode,
          dir=str(workdir),
          config=json.loads(config.to_json_best_effort()),
          id=run_id or None,
          resume='allow',
        )
      except Exception as e:  # noqa: BLE001 - wandb's error types (no login, no network, ...)
        self.jsonl.close()
        self.tb.close()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrainingError(
          f'Weights & Biases did not start ({first}); nothing was trained. Log in with `wandb '
          'login`, or run with --config.train.wandb_mode=offline (sync later with `wandb sync`) '
          'or --config.train.wandb=False.'
        ) from e
      if not run_id:
        id_file.write_text(self.wandb.id + '\n')
      # Charts use the training step as their x-axis, not W&B's own step (one per log call),
      # so that a run resumed from an older checkpoint logs its re-run steps again: W&B drops
      # a log whose `step=` is below the run's largest, which after a resume is the last step
      # the earlier process logged.
      self.wandb.define_metric(WANDB_STEP)
      self.wandb.define_metric('*', step_metric=WANDB_STEP, step_sync=True)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    if self.wandb is not None:
      self.wandb.log({WANDB_STEP: step, **scalars})

  def image(self, step: int, name: str, grid: np.ndarray) -> None:
    if self.enabled:
      self.tb.add_image(name, grid, step, dataformats='HWC')
      if self.wandb is not None:
        import wandb

        self.wandb.log({WANDB_STEP: step, name: wandb.Image(grid)})

  def close(self) -> None:
    """Closes each log on its own, never raising for one that cannot be flushed (a disk that
    filled up: the run's own error says so). Before, the first failure skipped the rest, and
    TensorBoard's writer failed again at exit, with a traceback, as did its writer thread."""
    if not self.enabled:
      return
    for name, close in (('metrics.jsonl', self.jsonl.close), ('TensorBoard', self.tb.close)):
      try:
        close()
      except OSError as e:
        log.warning('Could not close %s (%s).', name, e.strerror or e)
        if name == 'TensorBoard':
          _abandon_tensorboard(self.tb)
    if self.wandb is not None:
      self.wandb.finish()


def _abandon_tensorboard(tb) -> None:
  """Stop a tensorboardX writer whose close failed (its final flush): its event writers still
  count as open, so their exit hook flushed again, and their worker threads failed on a closed
  queue. Best effort, through tensorboardX's internals (a version without them is left as is)."""
  for file_writer in getattr(tb, 'all_writers', {}).values():
    events = getattr(file_writer, 'event_writer', None)
    worker = getattr(events, '_worker', None)
    if events is None or worker is None:
      continue
    try:
      worker.stop()
    except Exception:  # noqa: BLE001 - its queue may be gone already
      pass
    events._closed = True


def _to_global(batch: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  return {
    k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
    for k, v in batch.items()
  }


def batch_signature(batch: dict) -> tuple:
  """What a compiled step depends on in a batch: each array's name, shape and dtype."""
  return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def memory_fixes() -> str:
  """What lowers the train step's memory, for this backend."""
  if jax.default_backend() == 'cpu':
    return 'Lower train.batch_size (XLA:CPU keeps remat from lowering its peak).'
  return (
    'Lower train.batch_size, set model.remat=True, split the state over more devices '
    '(mesh.fsdp), or use optim.optimizer=adafactor in a fresh --workdir (its state does not '
    "resume from adam's; on GPU, JAX takes 75% of the memory unless "
    'XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise).'
  )


def _resumes_from(workdir: str) -> str:
  """'the same command resumes from the newest checkpoint in W that verifies (the newest is
  step N)', or that there is none. Not 'from step N': the newest is not read here (that takes
  as long as a restore), and when it is damaged the resume passes over it."""
  try:
    step = checkpoints.latest_finished_step(workdir)
    return (
      f'the same command resumes from the newest checkpoint in {workdir} that verifies (the '
      f'newest is step {step})'
    )
  except checkpoints.CheckpointError:
    return 'no checkpoint was saved yet: the same command starts afresh'


def out_of_memory_message(workdir: str, xla_message: str) -> str:
  """train.py's line for a run that ran out of memory: XLA's message, the fixes, and the
  checkpoint the same command resumes from."""
  return (
    f'Out of memory ({xla_message}). {memory_fixes()} The run stopped without saving the '
    f'failed step; {_resumes_from(workdir)} after the change.'
  )


def write_failed_message(workdir: str, error: OSError) -> str:
  """train.py's line for an output that could not be written (metrics, a sample grid, logs)."""
  where = f' {error.filename}' if error.filename else ''
  why = error.strerror or ' '.join(str(error).split())[:300]
  return (
    f'Cannot write{where} ({why}); the run stopped. Free space or fix the path, then '
    f'{_resumes_from(workdir)}.'
  )


def interrupted_message(workdir: str) -> str:
  """train.py's line for a run stopped at once by Ctrl-C: a second one in the training loop, or
  the first one outside it (setup, the cache build, the restore), where nothing is saved."""
  how = 'a second Ctrl-C' if StopSignal.first_signal_seen else 'Ctrl-C outside the training loop'
  return f'Stopped at once by {how}, without saving; {_resumes_from(workdir)}.'


def stopped_outside_message(workdir: str) -> str:
  """train.py's line for a SIGTERM outside the training loop (setup, the cache build, the
  restore, the compile, or the final save's wait), where there is no new step to save."""
  return (
    'stopped (SIGTERM) outside the training loop, with no new step to save; '
    f'{_resumes_from(workdir)}.'
  )


class CompiledSteps:
  """A jitted train step compiled ahead of time once per batch shape.

  With data.text_length=batch the text length L changes with the batch (a few buckets), and a
  compiled step only takes the shapes it was compiled for: `get(state, batch)` returns the one
  for this batch's shapes, compiling it first when the shapes are new, with its FLOPs
  (`step_flops`, for MFU) and the seconds spent compiling now (0.0 when it was compiled).
  """

  def __init__(self, step_fn, config: ml_collections.ConfigDict | None = None):
    self.step_fn = step_fn  # jax.jit(...) with pinned shardings
    self.config = config  # for step_flops; None: no FLOPs
    self.compiled: dict[tuple, tuple[Any, StepFlops | None]] = {}  # batch_signature -> step
    self.text_lengths: list[int] = []  # L of each compiled step, in compile order

  def get(self, state, batch: dict) -> tuple[Any, StepFlops | None, float]:
    key = batch_signature(batch)
    if key in self.compiled:
      return (*self.compiled[key], 0.0)
    t0 = time.perf_counter()
    with compile_events.counting() as made:
      compiled = self.step_fn.lower(state, batch).compile()
    seconds = time.perf_counter() - t0
    text_length = int(batch['text_embs'].shape[1])
    if not self.compiled:
      log.info('Train step %s in %.1f s (text length %d).', made.summary(), seconds, text_length)
      multihost.barrier('imagen_jax:train_step_compiled')  # hosts start the collectives together
    else:
      log.info('Train step for text length %d %s in %.1f s.', text_length, made.summary(), seconds)
      multihost.barrier('imagen_jax:train_step_recompiled')
    device_memory.log_check(
      compiled,
      jax.local_devices(),
      what=f'Train step memory (text length {text_length})',
      fixes=memory_fixes(),
    )
    flops = None if self.config is None else step_flops(self.config, batch)
    self.compiled[key] = (compiled, flops)
    self.text_lengths.append(text_length)
    return compiled, flops, time.perf_counter() - t0


def device_prefetch_size(config: ml_collections.ConfigDict) -> int:
  """`data.device_prefetch` (default 2) as a batch count, or ValueError naming the setting."""
  return prefetch.checked_size(config.data.get('device_prefetch', 2))


def device_prefetch(config: ml_collections.ConfigDict, host_iter, batch_sharding):
  """`host_iter`'s batches as global arrays, `data.device_prefetch` of them (default 2; 0:
  none, read in the step's thread) assembled and copied to the devices ahead by one thread.
  Its get_state() / set_state() are the host iterator's, at the last batch consumed."""
  return prefetch.DevicePrefetch(
    host_iter,
    transfer=functools.partial(_to_global, batch_sharding=batch_sharding),
    size=device_prefetch_size(config),
  )


# Whole-number settings: (lowest allowed value, what 0 means where 0 is allowed)
_COUNTS = {
  'train.batch_size': (1, ''),
  'train.num_steps': (1, ''),
  'train.log_every': (1, ''),
  'train.checkpoint_every': (1, ''),
  'train.keep_checkpoints': (1, ''),
  'train.resume_step': (0, ' (0: the newest checkpoint that verifies)'),
  'train.sample_every': (0, ' (0: off)'),
  'train.eval_every': (0, ' (0: off)'),
  'optim.warmup_steps': (0, ''),
  'data.max_examples': (0, ' (0: all)'),
  'data.num_workers': (0, ' (0: read in the main process)'),
  'data.prefetch': (0, ' (0: no read-ahead)'),
  'text.max_length': (2, ' (a token and EOS)'),
  'text.precompute_batch_size': (1, ''),
  'text.cache_shard_size': (1, ''),
}


# |log-SNR| allowed for the schedule's clipping bounds: past about 87 (103 with subnormals)
# sigmoid(-|logsnr|) underflows float32, so alpha or sigma is 0 and x0 = (z - sigma eps) / alpha
# is NaN; 50 leaves alpha >= 1e-11.
LOGSNR_BOUND = 50.0


# optim fields: (lowest, highest, highest allowed, example). A negative min_lr_ratio made the
# cosine schedule's end negative (gradient ascent late in training); a negative grad_clip
# turned clipping off; b2 >= 1 never forgets a gradient.
_OPTIM_RANGES = {
  'min_lr_ratio': (0.0, 1.0, True, 'e.g. 0.1: the cosine ends at 10% of optim.lr'),
  'b1': (0.0, 1.0, False, 'e.g. 0.9'),
  'b2': (0.0, 1.0, False, 'e.g. 0.999'),
  'eps': (0.0, math.inf, False, 'e.g. 1e-8'),
  'weight_decay': (0.0, math.inf, False, 'e.g. 0 or 0.01'),
  'grad_clip': (0.0, math.inf, False, 'a global norm, e.g. 1.0; 0: no clipping'),
  'adafactor_decay_rate': (0.0, 1.0, True, 'e.g. 0.8'),
  'adafactor_momentum': (0.0, 1.0, False, 'e.g. 0.9; 0: no first moment'),
}
# AdamW's settings and their defaults: adafactor never reads them, so another value is refused.
_ADAMW_ONLY = {'b1': 0.9, 'b2': 0.999, 'eps': 1e-8}


def _is_count(value: Any, lowest: int) -> bool:
  """Whether `value` is a whole number (a bool is not one) >= lowest."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lowest


def _check_counts(
  config: ml_collections.ConfigDict, sections: tuple[str, ...], present_only: bool = False
) -> None:
  """ValueError naming the first `_COUNTS` field of `sections` that is not a whole number in
  range (present_only: fields the config lacks are passed over)."""
  for field, (lowest, zero) in _COUNTS.items():
    section, name = field.split('.')
    if section not in sections or (present_only and name not in config.get(section, {})):
      continue
    value = config[section].get(name)
    if not _is_count(value, lowest):
      raise ValueError(f'{field}={value!r}: use a whole number >= {lowest}{zero}.')


def check_data_and_text(config: ml_collections.ConfigDict, present_only: bool = False) -> None:
  """The data and text settings' part of `check_settings`, which `python -m
  imagen_jax.precompute` runs too (with present_only: its configs may hold only the data, text
  and mesh sections): it encoded a whole dataset into a cache under settings (a negative
  data.max_examples) that train.py then refused."""
  _check_counts(config, ('data', 'text'), present_only)
  skip = float(config.data.get('max_skip_fraction', 0.0))
  if not 0.0 <= skip <= 1.0:
    raise ValueError(f'data.max_skip_fraction={skip}: use a fraction in [0, 1] (e.g. 0.01).')


def check_settings(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the first training-loop, data or loss setting that cannot train (or
  would be quietly read as another), before the workdir is written: a zero log_every or
  checkpoint_every used to end a started run with a ZeroDivisionError, a zero batch with a
  traceback, an unknown loss weighting at the first step's compile, a bad crop size after the
  text cache was built; a negative num_steps 'finished' at step 0."""
  from imagen_jax import precompute
  from imagen_jax.data import pipeline, sources

  _check_counts(config, ('train', 'optim'))
  check_data_and_text(config)
  accum, num_steps = config.optim.get('grad_accum_steps', 1), config.train.num_steps
  if _is_count(accum, 1) and accum > num_steps:  # the run ended with the params it started with
    raise ValueError(
      f'optim.grad_accum_steps={accum} > train.num_steps={num_steps}: num_steps counts '
      'micro-batches, so no update would be applied; raise train.num_steps (to a multiple of '
      'grad_accum_steps) or lower grad_accum_steps.'
    )
  if _is_count(accum, 1) and num_steps % accum:  # the last micro-batches were read, then dropped
    raise ValueError(
      f'train.num_steps={num_steps} is not a multiple of optim.grad_accum_steps={accum}: '
      f'num_steps counts micro-batches, and the last {num_steps % accum} would be accumulated '
      f'but never applied; use train.num_steps={num_steps - num_steps % accum} or '
      f'{num_steps - num_steps % accum + accum}.'
    )
  seed = config.get('seed', 0)
  if not _is_count(seed, 0) or seed >= 2**32:  # a JAX key takes 32 bits: s + 2**32 trained as s
    raise ValueError(f'seed={seed!r}: use a whole number in [0, 2**32).')
  sources.check_source_kind(config.data)
  # Resolutions, crop, small_images; a resolution or crop the U-Net cannot take (after the text
  # cache was built, or at the first step, they failed).
  pipeline.check_crops(config)
  precompute.check_text_dtype(config)
  model = stage.model_config(config)  # the U-Net's sizes (they failed after the cache was built)
  if model.image_channels != 3:  # failed at the first step, after the text cache was built
    raise ValueError(
      f'model.image_channels={model.image_channels}: the data pipeline and the samplers make RGB '
      'images; use 3.'
    )
  given = config.train.get('sample_prompts') or ()
  bad = [p for p in given if not isinstance(p, str) or not p.strip()]
  if isinstance(given, str) or bad:  # a bare string was read as its characters
    raise ValueError(
      f'train.sample_prompts={given!r}: use a tuple of non-empty caption strings, e.g. '
      "--config.train.sample_prompts=\"('a red apple', 'a blue car')\" (empty: captions of the "
      'training data).'
    )
  grid_prompts = config.train.get('num_sample_prompts', 1)
  if (
    config.train.sample_every
    and not config.train.get('sample_prompts')
    and not _is_count(grid_prompts, 1)
  ):
    raise ValueError(
      f'train.num_sample_prompts={grid_prompts!r}: the sample grids (every train.sample_every '
      'steps) need at least 1 prompt; use a whole number >= 1, or train.sample_every=0 for no '
      'grids.'
    )
  layout = config.train.get('state_layout', 'auto')
  if layout not in sharding.STATE_LAYOUTS:
    raise ValueError(
      f'train.state_layout={layout!r}: use one of {", ".join(sharding.STATE_LAYOUTS)} '
      "('auto': conv kernels stored as cuDNN takes them on GPU, row-major elsewhere)."
    )
  decay = float(config.optim.ema_decay)
  if not 0.0 <= decay <= 1.0:  # also refuses NaN
    raise ValueError(f'optim.ema_decay={decay}: use a value in [0, 1] (e.g. 0.9999).')
  lr = float(config.optim.lr)
  if not 0.0 <= lr < math.inf:
    raise ValueError(f'optim.lr={lr}: use a finite learning rate >= 0 (e.g. 1e-4).')
  for name, (low, high, closed, example) in _OPTIM_RANGES.items():
    if name not in config.optim:  # a config of its own without the adafactor fields
      continue
    value = float(config.optim[name])
    if not (low <= value <= high if closed else low <= value < high):  # also refuses NaN
      bounds = f'[{low:g}, {high:g}]' if closed else f'[{low:g}, {high:g})'
      raise ValueError(f'optim.{name}={value}: use a value in {bounds} ({example}).')
  if config.optim.optimizer == 'adafactor':
    ignored = [
      f'optim.{k}={config.optim[k]}' for k, v in _ADAMW_ONLY.items() if config.optim[k] != v
    ]
    if ignored:
      raise ValueError(
        f'{", ".join(ignored)}: optim.optimizer=adafactor does not read '
        f'{"it" if len(ignored) == 1 else "them"} (AdamW does); leave '
        f'{", ".join(_ADAMW_ONLY)} at {", ".join(map(str, _ADAMW_ONLY.values()))} and set '
        'optim.adafactor_momentum, optim.adafactor_decay_rate or optim.adafactor_min_dim, or use '
        'optim.optimizer=adamw.'
      )
  min_dim = config.optim.get('adafactor_min_dim', optim.ADAFACTOR_DEFAULTS['adafactor_min_dim'])
  if not _is_count(min_dim, 1):
    raise ValueError(f'optim.adafactor_min_dim={min_dim!r}: use a whole number >= 1 (e.g. 128).')
  stage.schedule(config)  # each of these raises naming the allowed values
  drop = float(config.diffusion.cond_drop_prob)
  if not 0.0 <= drop <= 1.0:
    raise ValueError(
      f'diffusion.cond_drop_prob={drop}: use a probability in [0, 1] (e.g. 0.1, what '
      'classifier-free guidance needs).'
    )
  why = cascade.guidance_without_unconditional(
    'This run', config, float(config.sample.guidance), 'sample.guidance=1'
  )
  if why:  # its sample grids, and sample.py by default, would guide with an untrained prediction
    raise ValueError(why)
  # Every stage, though only SR stages read them: a typo stayed hidden until the config was reused
  # for an SR stage.
  stage.aug_schedule(config)
  low, high = (
    float(config.diffusion.get('aug_level_min', 0.0)),
    float(config.diffusion.aug_level_max),
  )
  if not 0.0 <= low <= high <= 1.0:  # also refuses NaN
    raise ValueError(
      f'diffusion.aug_level_min={low}, aug_level_max={high}: training draws the low-res '
      'augmentation level uniformly between them; use 0 <= aug_level_min <= aug_level_max <= 1 '
      '(e.g. 0 and 0.3).'
    )
  if int(config.train.get('eval_every', 0)) > 0:  # it failed after the text cache was built
    from imagen_jax.evaluate import runner

    runner.check_train_eval(config)
  # Process 0 logs to W&B: a bad mode or a missing package failed only after the text cache was
  # built (hours of T5-XXL on a large dataset) and the state was set up.
  if config.train.get('wandb') and config.train.wandb_mode not in WANDB_MODES:
    raise ValueError(
      f'train.wandb_mode={config.train.wandb_mode!r}: use one of {", ".join(WANDB_MODES)}.'
    )
  if config.train.get('wandb') and jax.process_index() == 0 and not _importable('wandb'):
    raise ValueError(
      'train.wandb=True needs Weights & Biases: `pip install wandb` (or run with '
      '--config.train.wandb=False).'
    )
  diff = config.diffusion
  if diff.loss_weighting == 'min_snr' and not float(diff.min_snr_gamma) > 0:  # also NaN
    raise ValueError(
      f'diffusion.min_snr_gamma={diff.min_snr_gamma}: min-SNR weighting min(snr, gamma) needs '
      'gamma > 0 (5 in Hang et al. 2023); a negative one trained on negative weights.'
    )
  if not -LOGSNR_BOUND <= float(diff.logsnr_min) < float(diff.logsnr_max) <= LOGSNR_BOUND:
    raise ValueError(
      f'diffusion.logsnr_min={diff.logsnr_min}, logsnr_max={diff.logsnr_max}: the schedule '
      'clips log-SNR to [logsnr_min, logsnr_max]; use logsnr_min < logsnr_max within '
      f'[-{LOGSNR_BOUND:g}, {LOGSNR_BOUND:g}] (e.g. -20, 20): past them alpha or sigma '
      'underflows float32 and the samples are NaN.'
    )
  if diff.schedule == 'shifted_cosine' and not float(diff.shift_base) >= 1:
    raise ValueError(
      f'diffusion.shift_base={diff.shift_base}: the shifted cosine shifts log-SNR by '
      '2 log(shift_base / resolution); use the base resolution it is shifted from (e.g. 64).'
    )
  if bool(config.model.get('lowres_cond', False)) != stage.is_super_resolution(config):
    raise ValueError(
      f'model.lowres_cond={config.model.get("lowres_cond", False)} but data.lowres_resolution='
      f'{config.data.lowres_resolution}: a super-resolution stage (lowres_resolution > 0) needs '
      'model.lowres_cond=True, a base stage False.'
    )
  zeros = np.zeros(1, np.float32)
  gaussian.target_for(objective=config.diffusion.objective, x=zeros, eps=zeros, logsnr=zeros)
  losses.loss_weight(
    logsnr=zeros,
    objective=config.diffusion.objective,
    weighting=config.diffusion.loss_weighting,
    min_snr_gamma=float(config.diffusion.min_snr_gamma),
  )


def _importable(module: str) -> bool:
  return module in sys.modules or importlib.util.find_spec(module) is not None


def _check_batch_size(config: ml_collections.ConfigDict, mesh) -> None:
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if config.train.batch_size % shards:
    raise ValueError(
      f'train.batch_size={config.train.batch_size} must be divisible by the {shards} devices of '
      f'the mesh {dict(mesh.shape)}; pass e.g. --config.train.batch_size='
      f'{math.ceil(config.train.batch_size / shards) * shards}.'
    )


# Model fields that change how the step computes, not the parameters: a resume may change them
# (model.remat is the out-of-memory advice on accelerators). They are reported as changed.
_MODEL_FIELDS_NOT_PARAMS = ('remat', 'dtype', 'dropout')


def _params_defining(model: ml_collections.ConfigDict | dict) -> dict:
  """The model fields that define the parameters (without _MODEL_FIELDS_NOT_PARAMS)."""
  fields = model.to_dict() if isinstance(model, ml_collections.ConfigDict) else model
  return {k: v for k, v in fields.items() if k not in _MODEL_FIELDS_NOT_PARAMS}


def _resume_check(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list:
  """Refuse a resume whose model or stage differs from the checkpoint's in what defines the
  parameters; returns every differing field ('field: saved -> now'), fields added since at the
  value that does what the saved run did aside."""
  model_diff = checkpoints.config_differences(
    {'stage': saved.get('stage'), 'model': _params_defining(saved.model)},
    {'stage': config.stage, 'model': _params_defining(config.model)},
  )
  if model_diff:
    raise TrainingError(
      'The checkpoint in this workdir was trained with a different model; resuming would not '
      'fit its parameters. Differing config fields (checkpoint -> now):\n  '
      + '\n  '.join(model_diff)
      + "\nUse a fresh --workdir, or the checkpoint's values."
    )
  return [
    d
    for d in checkpoints.config_differences(saved, config)
    if not _added_at_old_value(d.split(':', 1)[0], saved, config)
  ]


# ------------------------------------------------------------------------------- loop


def model_description(config: ml_collections.ConfigDict) -> str:
  """'preset P', or 'preset P with model.F, ... changed': config.model defines the network, and
  config.model_preset is only its label (an overridden label named another network)."""
  from imagen_jax.models import unet

  preset = config.get('model_preset')
  if preset not in unet.PRESETS:
    return f'model_preset {preset!r} is no preset; config.model defines the network'
  changed = [
    d.split(':')[0]
    for d in checkpoints.config_differences(
      _params_defining(dataclasses.asdict(unet.PRESETS[preset])),
      _params_defining(config.model),
      'model.',
    )
  ]
  return f'preset {preset}' + (f' with {", ".join(changed)} changed' if changed else '')


def _nothing_to_resume(resume_step: int, workdir: pathlib.Path) -> str:
  """'train.resume_step=N but <what the folder holds>: check --workdir', the same line whether
  one process refuses it early or several after the run lock."""
  return (
    f'train.resume_step={resume_step} but {checkpoints.describe_folder(workdir)}: check --workdir'
  )


def _prepare_workdir(workdir: str, resume_step: int = 0) -> pathlib.Path:
  """The absolute run folder, created if needed; TrainingError when it cannot hold a run, or
  when `resume_step` is set and it holds no checkpoint (a mistyped --workdir: refused before the
  folder is made. With several processes the check after the run lock refuses it, on every
  process alike)."""
  if re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', str(workdir)):  # it became a local 'gs:/...' folder
    raise TrainingError(
      f'--workdir {workdir} is a URL; train.py writes to a local or mounted folder: mount the '
      'bucket (e.g. gcsfuse) and pass its path.'
    )
  path = pathlib.Path(workdir).expanduser().absolute()
  odd = sorted(set('[]\\') & set(str(path)))
  if odd:  # orbax (tensorstore) writes such checkpoints but cannot read them back
    raise TrainingError(
      f'--workdir {path} holds {" ".join(odd)}: checkpoints saved under such a path cannot be '
      'restored. Pass a folder path without [ ] or \\.'
    )
  if path.exists() and not path.is_dir():
    raise TrainingError(f'--workdir {path} is a file, not a folder; pass a folder path.')
  steps = checkpoints.step_numbers(path)
  if steps:  # a fresh run would start inside the orbax folder
    raise TrainingError(
      f"--workdir {path} holds checkpoint steps {steps}: it is a run's checkpoints folder. "
      f'Pass the run folder, {path.parent}.'
    )
  if (
    resume_step
    and jax.process_count() == 1
    and not checkpoints.step_numbers(checkpoints.checkpoint_dir(path))
  ):
    raise TrainingError(_nothing_to_resume(resume_step, path) + ' (nothing was written).')
  try:
    multihost.check_writable(path)
  except OSError as e:
    raise TrainingError(
      f'Cannot write to --workdir {path} ({e.strerror}); pass a writable folder (or fix its '
      'permissions).'
    ) from e
  return path


def _optimizer_check(
  saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, abstract_params: Any
) -> None:
  """Refuse a resume whose optimizer-state structure differs, naming the optim fields, or whose
  optim.grad_accum_steps differs: the state's structure is the same, but the optimizer counts
  its updates while train.num_steps, the logged lr and the EMA warm-up count micro-steps / k, so
  another k logged one lr and applied another, on a schedule that no longer fit."""
  before, now = int(saved.optim.get('grad_accum_steps', 1)), int(config.optim.grad_accum_steps)
  if before != now:
    raise TrainingError(
      f'optim.grad_accum_steps={now}, but the checkpoint was trained with {before}: the '
      'optimizer has counted its updates at that rate, so the schedules would no longer agree. '
      f'Resume with --config.optim.grad_accum_steps={before}, or train with {now} in a fresh '
      '--workdir.'
    )
  num_steps = int(config.train.num_steps)

  def structure(optim_config):
    tx = optim.make_optimizer(optim_config, num_steps)
    return jax.tree.structure(jax.eval_shape(tx.init, abstract_params))

  if structure(saved.optim) == structure(config.optim):
    return
  diff = checkpoints.config_differences(saved.optim, config.optim, 'optim.')
  raise TrainingError(
    'The checkpoint was trained with a differently structured optimizer state, which cannot be '
    'restored into this one. Differing fields (checkpoint -> now): '
    + '; '.join(diff or ['(none found)'])
    + ". Resume with the checkpoint's values, or start a fresh --workdir."
  )


def _restore_for_resume(config, manager, abstract, state_sh, workdir_path, *, newest: int):
  """(step, state, data_state) of the requested (train.resume_step) or newest usable checkpoint.

  Damaged checkpoints are reported with their step and path and passed over; kept checkpoints
  newer than the one resumed are moved to checkpoints_set_aside/ (never deleted), so the run
  neither overwrites nor returns to them. newest: the newest kept step (`checkpoints.kept_steps`,
  the same on every process).
  """
  requested = int(config.train.get('resume_step', 0)) or None
  # Restores go through a read-only manager of this process's own (`checkpoints.make_manager`).
  reader = checkpoints.make_manager(workdir_path, read_only=True)
  try:
    if requested and newest > requested and _same_resume(reader, newest, config):
      # The newer checkpoints come from this same resume (the command was run again, e.g. after
      # a SIGTERM): continue from them instead of throwing their progress away.
      log.warning(
        'Already resumed from step %d earlier with these settings; continuing from step %d. '
        'To go back to step %d again, change a setting (e.g. optim.lr) or move the checkpoints '
        'after step %d out of %s.',
        requested,
        newest,
        requested,
        requested,
        checkpoints.checkpoint_dir(workdir_path),
      )
      requested = None
    target = abstract_with_shardings(abstract, sharding.plain_shardings(state_sh))

    def restore_one(step):
      saved = checkpoints.restore_config(reader, step)
      changed = _resume_check(saved, config)
      _optimizer_check(saved, config, abstract['params'])
      loaded = checkpoints.load(reader, step, abstract_state=target)
      return checkpoints.Loaded((loaded.value, changed), loaded.verify)

    step, ((state, data_state), changed), failures = checkpoints.restore_with_fallback(
      reader,
      step=requested,
      restore_fn=restore_one,
      ask_with=' (--config.train.resume_step=N, or 0 for none)',
    )
    state = sharding.relayout(state, state_sh)  # the train step's layouts (state_layout)
  except checkpoints.CheckpointError as e:
    raise TrainingError(str(e)) from e
  finally:
    reader.close()
  if changed:
    log.warning('Resuming with changed settings (checkpoint -> now): %s', '; '.join(changed))
  moved = checkpoints.set_aside_newer(workdir_path, step, manager)
  if failures:
    log.warning('Resumed from step %d, the newest checkpoint that verified.', step)
  if moved:
    log.warning(
      'Checkpoints newer than step %d were moved aside (not deleted): %s',
      step,
      ', '.join(str(p) for p in moved),
    )
  return step, state, data_state


# Settings that change how a run is logged, saved, sampled, fed or laid out, not what it trains
# (a field, or a group ending in '.'): a resume run again with other values is the same resume.
_NOT_TRAINING = (
  'train.num_steps',
  'train.log_every',
  'train.checkpoint_every',
  'train.keep_checkpoints',
  'train.sample_every',
  'train.num_sample_prompts',
  'train.sample_prompts',
  'train.eval_every',
  'train.eval_num',
  'train.eval_judge_dir',
  'train.wandb',
  'train.wandb_mode',
  'train.wandb_project',
  'train.state_layout',
  'data.num_workers',
  'data.prefetch',
  'data.device_prefetch',
  'data.index_dir',  # where the webdataset member index is kept
  'text.precompute_batch_size',  # the cache is keyed without it: a built one is read as it is
  'text.auto_precompute',
  'model.remat',
  'mesh.',
  'sample.',
)


# Fields added to the config after runs were saved without them, each with the value that does
# what those runs did (the value the code read before the field existed): absent in a saved config
# and at that value now, it is no change.
_ADDED_WITH_OLD_BEHAVIOUR = {f'optim.{k}': v for k, v in optim.ADAFACTOR_DEFAULTS.items()}


def _added_at_old_value(field: str, saved, config) -> bool:
  section, _, name = field.partition('.')
  return (
    field in _ADDED_WITH_OLD_BEHAVIOUR
    and name not in saved.get(section, {})
    and config[section][name] == _ADDED_WITH_OLD_BEHAVIOUR[field]
  )


def _same_resume(manager, step: int, config: ml_collections.ConfigDict) -> bool:
  """Whether checkpoint `step` was written by a run of this same resume: started with the same
  train.resume_step and the same settings of what it trains (`_NOT_TRAINING` aside: e.g. a run
  extended after a stop, or run again with other logging or data workers). A go-back with other
  settings (the advice after a NaN: the same step, a lower optim.lr) is a new attempt, not a
  continuation."""
  try:
    saved = checkpoints.restore_config(manager, step)
    if int(saved.train.get('resume_step', 0)) != int(config.train.resume_step):
      return False
    differences = checkpoints.config_differences(saved, config)
  except (checkpoints.CheckpointError, AttributeError, KeyError, TypeError, ValueError):
    return False
  fields = [d.split(':', 1)[0] for d in differences]
  fields = [f for f in fields if not _added_at_old_value(f, saved, config)]
  return all(
    any(f == g or (g.endswith('.') and f.startswith(g)) for g in _NOT_TRAINING) for f in fields
  )


def _check_same_config(config: ml_collections.ConfigDict) -> None:
  """Every process must run the same config: compare hashes, refuse a mismatch."""
  digest = checkpoints.json_checksum(json.loads(config.to_json_best_effort()))
  digests = multihost.allgather_json(digest)
  differing = [i for i, d in enumerate(digests) if d != digests[0]]
  if differing:
    raise TrainingError(
      f'Processes {differing} run a different config than process 0 (config hashes differ); '
      'launch every process with the same --config file and overrides.'
    )


def data_state_for_save(
  data_iter, dataset_fingerprint: str | None = None, batch_size: int | None = None
) -> dict:
  """Every process's iterator position, gathered, so any host count and batch size can resume
  from it, with the global batch size the positions count in and the fingerprint of the
  dataset they are positions in."""
  states = multihost.allgather_json(data_iter.get_state())
  saved = {'process_count': len(states), 'states': states}
  if batch_size is not None:
    saved['batch_size'] = int(batch_size)
  if dataset_fingerprint is not None:
    saved['dataset_fingerprint'] = dataset_fingerprint
  return saved


def _check_same_dataset(saved: dict, dataset_fingerprint: str | None) -> None:
  """Warn when the run resumes a position saved in another dataset (files added, removed or
  changed, another data.max_examples): the position then points into another shuffle."""
  before = saved.get('dataset_fingerprint')
  if before is None or dataset_fingerprint is None or before == dataset_fingerprint:
    return
  log.warning(
    'The dataset changed since this checkpoint (fingerprint %s -> %s: files added, removed, '
    'renamed or modified, or only touched, moved or copied). Where files were added or removed '
    '(or another data.max_examples), the saved data position points into a different shuffle, '
    'so some examples of this epoch may be seen twice or not at all: resume with the data it '
    'was saved with for an exact continuation. Where the same files only changed content or '
    'timestamps, the position is the same.',
    before,
    dataset_fingerprint,
  )


def restore_data_state(
  data_iter,
  saved: dict,
  config: ml_collections.ConfigDict,
  dataset_fingerprint: str | None = None,
) -> None:
  """Put this process's iterator at its saved position; across a change of host count or of
  train.batch_size with several hosts, at the same element of the global stream (exact without
  skipped files when it is a whole new batch, see pipeline.convert_states). A warning when the
  saved position belongs to another dataset (`dataset_fingerprint`)."""
  from imagen_jax.data import pipeline

  _check_same_dataset(saved, dataset_fingerprint)
  if 'states' not in saved:  # written before positions were gathered: one process
    saved = {'process_count': 1, 'states': [saved]}
  count, states = int(saved['process_count']), saved['states']
  batch, now = int(config.train.batch_size), jax.process_count()
  saved_batch = int(saved.get('batch_size', batch))  # saved before it was recorded: unchanged
  # One process reads the stream in order whatever its batch: its position carries over as is.
  if count == now and (saved_batch == batch or count == 1):
    data_iter.set_state(states[jax.process_index()])
    return
  converted, exact = pipeline.convert_states(
    states, local_batch=saved_batch // count, new_count=now, new_local_batch=batch // now
  )
  data_iter.set_state(converted[jax.process_index()])
  moved = f'{count} processes x batch {saved_batch} to {now} x batch {batch}'
  if exact:
    log.info('Data position moved from %s exactly.', moved)
  else:
    log.warning(
      'Data position moved from %s at the last whole batch before it (files were skipped, so '
      'the hosts were at different positions, or the position is not a whole number of new '
      'batches): a few examples may be seen twice.',
      moved,
    )


def _dataset_fingerprint(text_cache) -> str | None:
  """The fingerprint of the training data (of the listing its embedding cache was built for)."""
  manifest = getattr(text_cache, 'manifest', None) or {}
  value = manifest.get('dataset_fingerprint')
  return None if value is None else str(value)


def _metrics_at(path: pathlib.Path, step: int) -> set[str]:
  """Names in the rows of `step` of metrics.jsonl at `path` (none when it does not exist)."""
  if not path.exists():
    return set()
  names = set()
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a line cut by a kill
    if isinstance(row, dict) and row.get('step') == step:
      names.update(row)
  return names


def _truncate_metrics(workdir_path: pathlib.Path, step: int) -> None:
  """Drop metrics.jsonl rows after `step` (steps re-run after a kill are logged once)."""
  path = workdir_path / 'metrics.jsonl'
  if jax.process_index() != 0 or not path.exists():
    return
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      row_step = int(json.loads(line)['step'])
    except (ValueError, KeyError, TypeError):
      dropped += 1  # a line cut by a kill
      continue
    if row_step <= step:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    tmp = path.with_name('.metrics.jsonl.tmp')
    tmp.write_text(''.join(f'{line}\n' for line in kept))
    os.replace(tmp, path)
    log.info('metrics.jsonl: dropped %d rows after step %d (they will be re-run).', dropped, step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train a stage to config.train.num_steps, resuming from the newest good checkpoint.

  Returns the last logged metrics, with 'step' and, when a signal stopped the run early,
  'stopped_by' (the signal's name). Raises TrainingError on NaN/Inf, resume mismatch, no usable
  checkpoint, an unwritable workdir, a failed save, etc.
  """
  from imagen_jax import precompute
  from imagen_jax.data import pipeline

  if float(config.model.dropout) > 0:
    raise ValueError(
      f'model.dropout={config.model.dropout}: dropout is not wired into training yet (the step '
      'runs the U-Net deterministically); use --config.model.dropout=0.'
    )
  # Settings refused before anything is written to the workdir.
  check_settings(config)
  num_steps = int(config.train.num_steps)
  tx = optim.make_optimizer(config.optim, num_steps)  # optimizer, schedule, grad_accum_steps
  pipeline.text_length_mode(config.data, jax.process_count())
  device_prefetch_size(config)
  cascade.SamplingOptions.from_config(config)  # saved with every checkpoint, used by sample.py
  precompute.record_encoder_fingerprint(config)  # saved too; sample.py compares it
  workdir_path = _prepare_workdir(workdir, resume_step=int(config.train.get('resume_step', 0)))
  lock = _lock_workdir(workdir_path)
  try:
    return _train(config, workdir_path, tx)
  finally:
    lock.release()


def _lock_workdir(workdir_path: pathlib.Path) -> run_lock.RunLock:
  """The workdir's run lock, held by process 0 (`imagen_jax.run_lock`); TrainingError on every
  process when another run holds it."""
  lock = run_lock.RunLock(workdir_path)
  problem = lock.acquire() if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    problem = multihost.allgather_json(problem)[0]
  if problem:
    lock.release()
    raise TrainingError(problem)
  return lock


def _train(config: ml_collections.ConfigDict, workdir_path: pathlib.Path, tx) -> dict[str, Any]:
  """train_and_evaluate in a locked workdir."""
  from imagen_jax import precompute
  from imagen_jax.data import pipeline, sources

  num_steps = int(config.train.num_steps)
  precompute.resolve_cache_dir(config, workdir_path)  # saved configs keep the absolute path
  is_chief = jax.process_index() == 0
  if jax.process_count() > 1:
    _check_same_config(config)
  mesh = sharding.make_mesh(config.mesh)
  _check_batch_size(config, mesh)
  log.info(
    'Devices: %d x %s; mesh %s.', jax.device_count(), jax.devices()[0].device_kind, dict(mesh.shape)
  )

  # On every process: a missing cache is built by all of them together (shared storage).
  # The dataset is listed once (a large folder or tfds split takes a while): the cache, the
  # iterator and the grid prompts share this source.
  source = sources.build_source(config.data)
  # A dataset whose images are all too small is refused now, not after its captions were encoded
  # (hours of T5-XXL for a large SR dataset); the sizes are read once (headers or columns).
  pipeline.drop_small_images(source, pipeline.check_crops(config), log_counts=False)
  text_cache = precompute.open_or_build_cache(
    config, build_if_missing=config.text.auto_precompute, source=source
  )
  dataset_fingerprint = _dataset_fingerprint(text_cache)  # saved with the data position
  if text_cache.dim != config.model.text_dim:
    raise ValueError(
      f'The text encoder {config.text.encoder} gives {text_cache.dim}-wide embeddings but '
      f'model.text_dim={config.model.text_dim}; pass --config.model.text_dim={text_cache.dim}.'
    )

  # Before the checkpoint manager: a refused dataset then exits with no orbax background work
  # left (closing the manager did not always wait for its cleanup thread, whose traceback then
  # followed the one-line error at interpreter shutdown).
  data_iter = pipeline.make_iterator(
    config,
    text_cache=text_cache,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    source=source,
  )
  # The chosen resume step is kept beside the newest ones: the same command goes back to it again
  # with other settings (a lower optim.lr after a NaN), after any number of later saves.
  resume_step = int(config.train.get('resume_step', 0))
  try:
    manager = checkpoints.make_manager(
      workdir_path,
      keep=config.train.keep_checkpoints,
      preserve=[resume_step] if resume_step else [],
    )
  except BaseException:
    if hasattr(data_iter, 'close'):
      data_iter.close()  # worker processes (data.num_workers > 0)
    raise

  with jax.set_mesh(mesh):
    graphdef, abstract, state_sh, init = abstract_train_state(config, tx, mesh)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract['params']))
    log.info('U-Net: %.2fM parameters (%s).', n_params / 1e6, model_description(config))
    # Before any state exists: grid prompts missing from the cache (given sample_prompts, SR
    # held-out captions) are encoded here, and the text encoder is freed again before the U-Net
    # state is allocated, so training never holds T5 and the train state at once.
    sample_grid = _make_sample_grid_fn(
      config, graphdef, text_cache, workdir_path, mesh, source=source
    )

    def close_inputs() -> None:
      """Before an error that ends the run ahead of the loop (which closes them itself)."""
      manager.close()  # lets orbax's async machinery shut down quietly before the exit
      if hasattr(data_iter, 'close'):
        data_iter.close()  # worker processes (data.num_workers > 0)

    try:
      kept = checkpoints.kept_steps(manager)  # the same on every process, or an error
    except checkpoints.CheckpointError as e:
      close_inputs()
      raise TrainingError(str(e)) from e
    if not kept:
      if int(config.train.get('resume_step', 0)):
        close_inputs()
        raise TrainingError(_nothing_to_resume(config.train.resume_step, workdir_path) + '.')
      _truncate_metrics(workdir_path, 0)  # rows of a run stopped before its first checkpoint
      state = init()
    else:
      try:
        resumed, state, data_state = _restore_for_resume(
          config, manager, abstract, state_sh, workdir_path, newest=kept[0]
        )
        restore_data_state(data_iter, data_state, config, dataset_fingerprint)
      except BaseException:
        close_inputs()
        raise
      _truncate_metrics(workdir_path, resumed)
      log.info('Resumed from step %d in %s.', resumed, workdir_path)
    start = int(state['step'])

    batch_sh = sharding.batch_sharding(mesh)
    metric_sh = sharding.replicated(mesh)
    step_fn = jax.jit(
      make_train_step(config, graphdef, tx),
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, metric_sh),
      donate_argnums=(0,),
    )
    try:
      writer = MetricWriter(workdir_path, config, enabled=is_chief, start_step=start)
    except TrainingError:  # W&B did not start
      close_inputs()
      raise
    eval_fn = _make_eval_fn(config, graphdef, workdir_path, mesh)
    loop = _Loop(
      config=config,
      step_fn=step_fn,
      # From here on its thread assembles batches and copies them to the devices ahead of the
      # step; _Loop.run closes it (and the host iterator) however the loop ends.
      data_iter=device_prefetch(config, data_iter, batch_sh),
      manager=manager,
      writer=writer,
      sample_grid=_in_training_sampler(
        sample_grid,
        'In-training sample grid',
        'sampling the in-training grid',
        'use fewer grid prompts (train.num_sample_prompts='
        f'{config.train.num_sample_prompts}, or train.sample_prompts where set), or turn the '
        'grids off with train.sample_every=0.',
      ),
      eval_fn=eval_fn,
      workdir_path=workdir_path,
      dataset_fingerprint=dataset_fingerprint,
    )
    return loop.run(state, start, num_steps)


def _in_training_sampler(fn: Callable | None, name: str, what: str, fixes: str) -> Callable | None:
  """fn(ema_params, step), a sample grid or evaluation run during training, that

  - logs its first call's time and how its programs were made ('In-training sample grid at step
    500: 9.8 s, compile included (compiled).'; a second start of the same config should say
    'loaded from the persistent compilation cache', as the train step's line does);
  - turns XLA's out-of-memory error into a TrainingError naming `what` and its `fixes`:
    train.py's general out-of-memory line would suggest a smaller train.batch_size, while a grid
    or evaluation sampler (sr1024's at full resolution, where the step trains on crops) can run
    out where the step fits."""
  if fn is None:
    return None
  first = [True]

  @functools.wraps(fn)
  def run(ema_params, step):
    t0 = time.perf_counter()
    try:
      with compile_events.counting() as made:
        out = fn(ema_params, step)
    except Exception as e:
      xla_message = device_memory.out_of_memory(e)
      if xla_message is None:
        raise
      raise TrainingError(
        f'Out of memory {what} at step {step} ({xla_message}): {fixes} The checkpoints saved '
        'so far are kept; the command with that change resumes from the newest.'
      ) from e
    if first[0]:
      first[0] = False
      log.info(
        '%s at step %d: %.1f s, compile included (%s).',
        name,
        step,
        time.perf_counter() - t0,
        made.summary(),
      )
    return out

  return run


def _make_eval_fn(config, graphdef, workdir_path, mesh):
  """fn(ema_params, step) -> {metric: value} every train.eval_every steps; None when off."""
  if not int(config.train.get('eval_every', 0)):
    return None
  from imagen_jax.evaluate import runner

  return _in_training_sampler(
    runner.make_train_eval_fn(config, graphdef, workdir_path, mesh=mesh),
    'In-training evaluation',
    'in the in-training evaluation',
    f'its batches hold min(train.eval_num, train.batch_size) = '
    f'{runner.train_eval_batch_size(config)} images; lower train.eval_num below that, or turn '
    'the evaluation off with train.eval_every=0.',
  )


@dataclasses.dataclass
class _Loop:
  """The training loop of one run: steps, logging, checkpoints, sample grids, evaluations."""

  config: ml_collections.ConfigDict
  step_fn: Any
  data_iter: Any  # yields batches already on the devices (device_prefetch)
  manager: Any
  writer: MetricWriter
  sample_grid: Callable | None  # fn(ema_params, step) -> (uint8 grid, {metric: value})
  eval_fn: Callable | None
  workdir_path: pathlib.Path
  dataset_fingerprint: str | None = None  # saved with the data position
  last_save: int | None = None  # step of the newest save started

  def check(self, step: int, metrics: dict) -> dict[str, float]:
    """Host copies of a step's metrics; TrainingError if its loss or gradient norm is not
    finite."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k in ('loss', 'grad_norm') if not math.isfinite(scalars[k])]
    if bad:
      raise _non_finite(
        ' and '.join(bad) + ' (' + ', '.join(f'{k}={scalars[k]}' for k in bad) + ')', step
      )
    return scalars

  def check_state(self, ema_params, step: int) -> None:
    """TrainingError if the EMA holds NaN/Inf (before a sample grid or evaluation uses it).

    A save checks the whole state itself (`checkpoints.save`); the metrics of `step` must have
    been checked first, so that the message can say what made the NaN."""
    _, finite = checkpoints.array_checksums(ema_params)
    if not finite:
      raise _non_finite(_NON_FINITE_UPDATE, step)

  def save(self, state, step: int, force: bool = False) -> None:
    """Start an async save; a failed write (disk full, permissions) is a TrainingError."""
    self.wait_for_saves(self.last_save)  # the previous save's bytes are on disk (and it worked)
    if jax.process_count() == 1:  # several hosts may see different disks: no local veto there
      need = sum(x.nbytes for x in jax.tree.leaves(state))
      free = shutil.disk_usage(self.manager.directory).free
      if free < need:
        raise _save_failed(
          self.manager, step, f'{need / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free on the disk'
        )
    try:
      self.manager.check_for_errors()  # an earlier async save that failed
      checkpoints.save(
        self.manager,
        step,
        state=state,
        data_state=data_state_for_save(
          self.data_iter, self.dataset_fingerprint, self.config.train.batch_size
        ),
        config=self.config,
        force=force,
      )
    except checkpoints.NonFiniteStateError as e:
      raise _non_finite(_NON_FINITE_UPDATE, step) from e
    except checkpoints.CheckpointError as e:
      raise TrainingError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise ValueError, OSError, ...
      raise _save_failed(self.manager, step, e) from e
    self.last_save = step

  def wait_for_saves(self, step: int | None) -> None:
    """Block until the save of `step` (the newest started) is on disk; TrainingError if not."""
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 - a failed background save, reported with its step
      raise _save_failed(self.manager, step, e) from e

  def grid_and_eval(self, state, step: int, grid: bool, evaluate: bool, say) -> dict:
    """The sample grid and/or evaluation of `step` (its EMA checked already), logged; their
    scalars. say: prints a line beside the progress bar."""
    scalars = {}
    if grid:
      image, grid_scalars = self.sample_grid(state['ema_params'], step)
      self.writer.image(step, 'samples', image)
      if grid_scalars:  # SR stages: PSNR / SSIM of the held-out grid
        self.writer.write(step, grid_scalars)
        scalars.update(grid_scalars)
    if evaluate:
      results = {f'eval/{k}': v for k, v in self.eval_fn(state['ema_params'], step).items()}
      self.writer.write(step, results)
      summary = ', '.join(f'{k[5:]} {v:.3g}' for k, v in list(results.items())[:4])
      say(f'eval at step {step}: {summary}')
      scalars.update(results)
    return scalars

  def catch_up(self, state, step: int, num_steps: int) -> dict:
    """The grid and evaluation due at `step`, the step resumed from, that its run did not make:
    it was stopped (a kill -9) between the step's save and them, and the resumed run went on
    from the next step (or, at the last step, reported the run done) without them. Decided by
    process 0's files, the same on every process (the grid and evaluation are collectives)."""
    config = self.config
    every, eval_every = int(config.train.sample_every), int(config.train.get('eval_every', 0))
    grid = bool(self.sample_grid and every and step % every == 0)
    evaluate = bool(self.eval_fn and (step % eval_every == 0 or step == num_steps))
    logged = _metrics_at(self.workdir_path / 'metrics.jsonl', step) if grid or evaluate else set()

    def has(prefix: str) -> bool:
      return any(name.startswith(prefix) for name in logged)

    if grid:  # an SR stage's grid also logs its PSNR / SSIM row, after its PNG
      grid = not (self.workdir_path / 'samples' / f'step_{step:08d}.png').exists() or (
        stage.is_super_resolution(config) and not has('sr/')
      )
    if evaluate:
      evaluate = not has('eval/')
    grid, evaluate = multihost.allgather_json([grid, evaluate])[0]
    if not (grid or evaluate):
      return {}
    missing = ' and '.join(n for n, due in (('sample grid', grid), ('evaluation', evaluate)) if due)
    log.warning('Making the %s of step %d, which the run stopped before.', missing, step)
    self.check_state(state['ema_params'], step)
    return self.grid_and_eval(state, step, grid, evaluate, log.info)

  def run(self, state, start: int, num_steps: int) -> dict[str, Any]:
    from tqdm import tqdm

    config = self.config
    global_batch = int(config.train.batch_size)
    eval_every = int(config.train.get('eval_every', 0))
    steps = CompiledSteps(self.step_fn, config)  # one compiled step per batch shape
    window_flops: list[StepFlops] = []  # of each step in the img/s window
    pending = None  # (step, metrics) of the previous step, fetched one step late
    last_scalars: dict[str, Any] = {}
    window_start, window_steps = time.perf_counter(), 0
    progress = tqdm(
      total=num_steps,
      initial=start,
      desc=f'train {config.stage}',
      unit='step',
      disable=jax.process_index() != 0,
      dynamic_ncols=True,
    )
    step = start
    finished = False
    try:
      if start:
        last_scalars = self.catch_up(state, start, num_steps)
      with StopSignal(coordinated=jax.process_count() > 1) as stop:
        while step < num_steps:
          batch = next(self.data_iter)  # on the device already (DevicePrefetch)
          first = not steps.compiled
          step_fn, flops, compile_s = steps.get(state, batch)  # compiles a new batch shape
          if first:
            window_start = time.perf_counter()
          else:
            window_start += compile_s  # compiling stays out of the img/s window
          state, metrics = step_fn(state, batch)
          step += 1
          window_steps += 1
          window_flops.append(flops)
          if pending is not None:
            last_scalars = {**last_scalars, **self.check(*pending)}
          pending = (step, metrics)

          if step % config.train.log_every == 0 or step == num_steps:
            scalars = self.check(*pending)
            pending = None
            elapsed = time.perf_counter() - window_start
            scalars['steps_per_s'] = window_steps / elapsed
            scalars['img_per_s'] = window_steps * global_batch / elapsed
            scalars.update(mean_step_flops(window_flops).scalars(window_steps, elapsed))
            self.writer.write(step, scalars)
            progress.set_postfix(loss=f'{scalars["loss"]:.4f}', img_s=f'{scalars["img_per_s"]:.1f}')
            last_scalars = scalars
            window_start, window_steps, window_flops = time.perf_counter(), 0, []
          progress.update(1)

          # At the last step a stop signal ends the run as it would end anyway (save, grid and
          # evaluation of step num_steps, exit 0), not as a stopped run to resume (exit 75).
          if step < num_steps and stop.should_stop(step):
            if pending is not None:
              self.check(*pending)
            self.save(state, step, force=True)
            self.wait_for_saves(self.last_save)
            last_scalars['stopped_by'] = stop.received
            log.warning(
              'Stopped by %s at step %d; checkpoint saved in %s.',
              stop.received,
              step,
              checkpoints.checkpoint_dir(self.workdir_path),
            )
            break
          side_work = time.perf_counter()  # saves, grids, evals stay out of the img/s window
          save_now = step % config.train.checkpoint_every == 0 or step == num_steps
          grid_now = (
            self.sample_grid and config.train.sample_every and step % config.train.sample_every == 0
          )
          eval_now = self.eval_fn and (step % eval_every == 0 or step == num_steps)
          if pending is not None and (save_now or grid_now or eval_now):
            self.check(*pending)
          # A state that is not finite is never saved, sampled or scored: a save checks all of
          # it, and without a save the EMA that a grid or evaluation reads is checked here.
          if save_now:
            self.save(state, step)
          elif grid_now or eval_now:
            self.check_state(state['ema_params'], step)
          made = self.grid_and_eval(state, step, grid_now, eval_now, progress.write)
          last_scalars = {**last_scalars, **made}
          window_start += time.perf_counter() - side_work
        self.wait_for_saves(self.last_save)
      finished = True
    finally:
      progress.close()
      close_error = None
      for finish in (self.manager.wait_until_finished, self.manager.close):  # close waits too
        try:
          finish()
        except Exception as e:  # noqa: BLE001 - e.g. a failed metadata write of the last save
          close_error = close_error or e
      still_writing = checkpoints.wait_for_background_writes()  # a failed save's other writes
      if still_writing:
        log.warning('Checkpoint writes still running at exit: %s.', ', '.join(still_writing))
      if close_error is not None and not finished:  # the run's own error is the one raised
        why = ' '.join(str(close_error).split())[:300]
        log.error('A checkpoint save failed while shutting down (%s).', why)
        close_error = None
      self.writer.close()
      if hasattr(self.data_iter, 'close'):
        self.data_iter.close()
    if close_error is not None:
      raise _save_failed(self.manager, self.last_save, close_error) from close_error
    last_scalars['step'] = step
    return last_scalars


_NON_FINITE_UPDATE = (
  'state (NaN/Inf in the parameters, their EMA or the optimizer state, made by an optimizer '
  'update: every loss and gradient norm was finite; e.g. optim.eps=0 with a zero gradient)'
)


def _non_finite(what: str, step: int) -> TrainingError:
  return TrainingError(
    f'Non-finite {what} at step {step}; training stopped there and no checkpoint of it (or '
    'later) was written. Lower --config.optim.lr (or raise --config.optim.eps), check the '
    'data, or resume from an earlier kept checkpoint with --config.train.resume_step=N.'
  )


def _save_failed(manager, step: int, error: BaseException | str) -> TrainingError:
  """'Saving step N failed (why); the kept checkpoints are untouched; what to do.'

  The kept checkpoints are not read here (that could take minutes); the resume verifies them."""
  kept = [s for s in checkpoints.step_numbers(manager.directory) if s != step]
  if isinstance(error, OSError) and error.strerror:
    why = error.strerror
  else:
    why = ' '.join(str(error).split())
    if 'No space left on device' in why:
      why = 'No space left on device'
    why = why[:300]
  if kept:
    then = (
      f'The kept checkpoints {kept} are untouched (latest: step {kept[-1]}); free disk space or '
      'fix permissions, then resume with the same command (it resumes from the newest kept '
      'checkpoint that verifies).'
    )
  else:
    then = (
      'No earlier checkpoint is kept; free disk space or fix permissions, then run the same '
      'command again (it starts from step 0).'
    )
  return TrainingError(
    f'Saving checkpoint step {step} to {manager.directory} failed ({why}). {then}'
  )


def _make_sample_grid_fn(config, graphdef, text_cache, workdir_path, mesh, source=None):
  """fn(ema_params, step) -> (uint8 grid, {}) of base-stage samples for fixed prompts (SR
  stages: _make_sr_grid_fn); None when train.sample_every is 0.

  The prompts are split by row over the mesh where its devices divide them
  (`sharding.sampler_inputs`), and the output is replicated, so every host holds the whole grid
  (with several processes a sharded output could not be read back on one host).
  """
  if not config.train.sample_every:
    return None
  if stage.is_super_resolution(config):
    return _make_sr_grid_fn(config, graphdef, text_cache, workdir_path, mesh)
  from imagen_jax.data import pipeline
  from imagen_jax.evaluate import sr as sr_eval

  prompts = list(config.train.sample_prompts) or pipeline.sample_captions(
    config, config.train.num_sample_prompts, source=source
  )
  # train.sample_prompts need not be training captions: those the cache lacks are encoded here,
  # with the run's encoder, as training saw its captions (then the encoder is freed).
  text_embs, text_mask = sr_eval.text_for(prompts, config, text_cache)
  sample_fn = cascade.make_stage_sampler(
    config, graphdef, cascade.SamplingOptions.from_config(config)
  )

  out_dir = workdir_path / 'samples'
  everywhere = sharding.replicated(mesh)
  # image i's noise as sample.py and evaluate.py draw it (cascade.image_keys)
  keys = cascade.image_keys(int(config.seed), range(len(prompts)))
  inputs = sharding.sampler_inputs(mesh, text_embs, text_mask, keys)
  sample_replicated = multihost.compiled_together(
    jax.jit(sample_fn, out_shardings=everywhere), 'imagen_jax:sample_grid_compiled'
  )

  def grid_fn(ema_params, step):
    out = sample_replicated(ema_params, *inputs)
    grid = images.make_grid(images.to_uint8(np.asarray(out)))
    if jax.process_index() == 0:
      out_dir.mkdir(exist_ok=True)
      images.save_png(grid, out_dir / f'step_{step:08d}.png', overwrite=True)
    return grid, {}

  return grid_fn


def _make_sr_grid_fn(config, graphdef, text_cache, workdir_path, mesh):
  """fn(ema_params, step) -> (uint8 grid, metrics) for an SR stage, on fixed held-out images.

  train.num_sample_prompts examples from evaluate.sr.heldout_examples (the OpenMoji emoji after
  the training subset, a validation/test split, else fixed training examples; see there), the
  same noise at every step. The grid (samples/step_N.png) has one row per image: the input
  nearest-upsampled, bicubic, the stage's output (EMA params, config.sample settings) and the
  real image. Metrics (means over the images, logged as sr/...): PSNR and SSIM of the output and
  of bicubic against the real image, gain_db = psnr - psnr_bicubic, and consistency_psnr (the
  output downsampled back against the input). Compiled once, inputs split by row where the mesh
  divides them and outputs replicated, then a barrier, as the base grid, so every host holds the
  whole result.
  """
  from imagen_jax.data import preprocess
  from imagen_jax.evaluate import sr as sr_eval

  heldout = sr_eval.heldout_examples(config, int(config.train.num_sample_prompts))
  log.info('SR sample grids: %d images of %s.', len(heldout.captions), heldout.origin)
  text_embs, text_mask = sr_eval.text_for(heldout.captions, config, text_cache)
  lowres = preprocess.to_float(heldout.lowres)  # [N, r, r, 3]
  real = preprocess.to_float(heldout.images)  # [N, R, R, 3]
  everywhere = sharding.replicated(mesh)
  keys = cascade.image_keys(int(config.seed), range(len(heldout.captions)))
  inputs = sharding.sampler_inputs(mesh, text_embs, text_mask, keys, lowres, real)
  eval_fn = sr_eval.make_sr_eval_fn(config, graphdef, cascade.SamplingOptions.from_config(config))
  eval_replicated = multihost.compiled_together(
    jax.jit(eval_fn, out_shardings=everywhere), 'imagen_jax:sr_grid_compiled'
  )
  out_dir = workdir_path / 'samples'

  def grid_fn(ema_params, step):
    output, bicubic, metrics = jax.device_get(eval_replicated(ema_params, *inputs))
    grid = sr_eval.comparison_grid(lowres=lowres, bicubic=bicubic, output=output, real=real)
    if jax.process_index() == 0:
      out_dir.mkdir(exist_ok=True)
      images.save_png(grid, out_dir / f'step_{step:08d}.png', overwrite=True)
    return grid, {f'sr/{k}': v for k, v in sr_eval.summarise(metrics).items()}

  return grid_fn
