"""Optimizer factory (optax), learning-rate schedule and EMA of parameters.

Fields come from `config.optim` (configs/common.py). Schedules count optimizer updates: with
`grad_accum_steps = k > 1`, `make_optimizer(cfg, num_steps)` treats `num_steps` as
micro-steps (calls to `update`) and builds the schedule over `num_steps // k` updates;
`warmup_steps` is always in optimizer updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

_SCHEDULES = ('cosine', 'constant')
_OPTIMIZERS = ('adamw', 'adafactor')


# Adafactor's settings when a config lacks them (configs made before they were fields), the values
# runs trained with then; configs/common.py sets the same.
ADAFACTOR_DEFAULTS = {
  'adafactor_min_dim': 128,
  'adafactor_decay_rate': 0.8,
  'adafactor_momentum': 0.0,
}


def _field(cfg: Any, name: str, default: Any = None) -> Any:
  if hasattr(cfg, 'get'):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def make_lr_schedule(optim_config: Any, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then 'cosine' decay to
  `min_lr_ratio * lr` at `num_steps`, or 'constant' at `lr`."""
  lr = float(optim_config.lr)
  kind = optim_config.schedule
  if kind not in _SCHEDULES:
    raise ValueError(f'Unknown optim.schedule {kind!r}; use one of {_SCHEDULES}.')
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
  warmup = int(min(max(int(optim_config.warmup_steps), 0), num_steps))
  if kind == 'constant':
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
    )
  end = lr * float(optim_config.min_lr_ratio)
  if warmup >= num_steps:
    return optax.linear_schedule(0.0, lr, warmup)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=num_steps, end_value=end
  )


def _decay_mask(params: Any) -> Any:
  """Weight decay only on matrices / conv kernels (ndim >= 2), not on biases and norms."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


class _ScheduledDecayState(NamedTuple):
  count: jax.Array


def _scheduled_weight_decay(
  weight_decay: float, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """updates - schedule(step) * weight_decay * params on matrices and kernels (AdamW's
  decoupled decay), for optimizers whose own decay ignores the learning rate."""

  def init(params: Any) -> _ScheduledDecayState:
    del params
    return _ScheduledDecayState(count=jnp.zeros([], jnp.int32))

  def update(updates: Any, state: _ScheduledDecayState, params: Any = None):
    if params is None:
      raise ValueError('weight decay needs the params passed to update().')
    rate = weight_decay * schedule(state.count)

    def decay(u, p, on):
      return u - (rate * p).astype(u.dtype) if on else u

    updates = jax.tree.map(decay, updates, params, _decay_mask(params))
    return updates, _ScheduledDecayState(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)


def make_optimizer(optim_config: Any, num_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> adamw | adafactor, wrapped in optax.MultiSteps when
  grad_accum_steps > 1."""
  accum = int(_field(optim_config, 'grad_accum_steps', 1))
  if accum < 1:
    raise ValueError(f'optim.grad_accum_steps must be >= 1, got {accum}.')
  schedule = make_lr_schedule(optim_config, max(1, num_steps // accum))
  name = optim_config.optimizer
  if name == 'adamw':
    opt = optax.adamw(
      schedule,
      b1=float(optim_config.b1),
      b2=float(optim_config.b2),
      eps=float(optim_config.eps),
      weight_decay=float(optim_config.weight_decay),
      mask=_decay_mask,
    )
  elif name == 'adafactor':
    # Factored second moments, no first moment by default: O(rows + cols) state per matrix.
    def adafactor(field):  # a config made before the field existed: what it ran with
      return _field(optim_config, field, ADAFACTOR_DEFAULTS[field])

    weight_decay = float(optim_config.weight_decay)
    opt = optax.adafactor(
      learning_rate=schedule,
      min_dim_size_to_factor=int(adafactor('adafactor_min_dim')),
      decay_rate=float(adafactor('adafactor_decay_rate')),
      multiply_by_parameter_scale=False,  # lr means the same as for Adam
      clipping_threshold=1.0,
      momentum=float(adafactor('adafactor_momentum') or 0.0) or None,  # 0: none
    )
    if weight_decay > 0:
      # Not optax's weight_decay_rate: that decay is added after the learning rate, so 0.1
      # took 10 % of the weights each step. Scaled by the schedule, as AdamW's is.
      opt = optax.chain(opt, _scheduled_weight_decay(weight_decay, schedule))
  else:
    raise ValueError(f'Unknown optim.optimizer {name!r}; use one of {_OPTIMIZERS}.')
  clip = float(optim_config.grad_clip)
  tx = optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
  return tx


def ema_decay(step: jax.Array | int, optim_config: Any) -> jax.Array:
  """min(ema_decay, (1 + step) / (10 + step)) with ema_warmup, else ema_decay (float32)."""
  decay = jnp.asarray(float(optim_config.ema_decay), jnp.float32)
  if not optim_config.ema_warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params: Any, params: Any, decay: jax.Array | float) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf (dtype of ema kept)."""
  decay = jnp.asarray(decay, jnp.float32)

  def update(e, p):
    e32 = e.astype(jnp.float32)
    return (e32 + (1.0 - decay) * (p.astype(jnp.float32) - e32)).astype(e.dtype)

  return jax.tree.map(update, ema_params, params)


GRADIENT_LAYOUTS = ('auto', 'barrier', 'row_major', 'none')


def gradient_layout(how: str = 'auto') -> str:
  """'auto' -> 'barrier' on GPU, 'none' elsewhere (settle_gradients); other names as given."""
  if how not in GRADIENT_LAYOUTS:
    raise ValueError(f'settle_gradients: how={how!r}; choose one of {", ".join(GRADIENT_LAYOUTS)}.')
  if how == 'auto':
    return 'barrier' if jax.default_backend() == 'gpu' else 'none'
  return how


def settle_gradients(grads: Any, how: str = 'auto') -> Any:
  """The gradients, fixed before the optimizer reads them; values are unchanged.

  On GPU, cuDNN's filter-gradient convolution returns a kernel's gradient laid out
  [O, kh, kw, I] while the parameter is stored [kh, kw, I, O]. XLA then ran AdamW in the
  gradient's layout: one fusion per kernel transposed the parameter and both moments in and
  the three results out (base64, batch 16, on an H100: 116 fusions, 36 ms of a 172 ms step,
  at about a third of the memory bandwidth).

  'barrier' (what training uses on GPU: 'auto') puts an optimization barrier between the
  backward pass and the optimizer. Measured on the H100: those fusions 36.3 -> 29.0 ms per
  step, layout copies 9.4 -> 5.1 ms, the step 0.1725 -> 0.164 s. XLA still gives the barrier
  the gradient's layout, so most of the transposes stay. They are gone where the state is
  stored in the gradient's layout (`train.state_layout`, 'conv_ohwi' on GPU: the step 0.1783 ->
  0.1524 s on the same H100, with the barrier; `sharding.state_formats`).
  'row_major' constrains each gradient to the parameters' row-major layout
  (`jax.experimental.layout.with_layout_constraint`), which should leave one transpose per
  kernel, on the gradient alone. Not yet compiled on a GPU: `bench/unet.py --grad_layout`
  measures it.
  'none' leaves XLA to choose: what 'auto' picks off GPU. On this project's 2-core CPU the
  barrier cost 4-5 % of the small64 training step (interleaved runs), and TPU has not been
  measured.
  """
  how = gradient_layout(how)
  if how == 'none':
    return grads
  if how == 'barrier':
    return jax.lax.optimization_barrier(grads)
  if how == 'row_major':
    from jax.experimental.layout import Layout, with_layout_constraint

    def row_major(g):
      return with_layout_constraint(g, Layout(major_to_minor=tuple(range(g.ndim))))

    return jax.tree.map(row_major, grads)
