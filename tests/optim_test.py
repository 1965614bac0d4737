"""Optimizer factory, LR schedule and EMA tests."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imagen_jax import optim

pytestmark = pytest.mark.unit


def _config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
    dict(
      optimizer='adamw',
      lr=1e-3,
      schedule='cosine',
      warmup_steps=10,
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,
      grad_accum_steps=1,
      ema_decay=0.9999,
      ema_warmup=True,
    )
  )
  c.update(overrides)
  return c


def _params():
  return {
    'kernel': jnp.ones((256, 512)),
    'bias': jnp.zeros((512,)),
    'conv': jnp.ones((3, 3, 256, 128)),
  }


def test_cosine_schedule_values():
  schedule = optim.make_lr_schedule(_config(), num_steps=110)
  # f32 schedule values (a few ops: lerp, cos): ~1 ulp (6e-8 relative), measured 5e-8; rtol
  # 1e-5 (1e-4 after the cosine) leaves >= 100x; an off-by-one warmup or mid-decay step is >= 2 %.
  np.testing.assert_allclose(schedule(0), 0.0, atol=1e-12)  # 0 * lr: exactly zero
  np.testing.assert_allclose(schedule(5), 0.5e-3, rtol=1e-5)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-5)
  # Halfway through the decay: min + (max - min) / 2.
  np.testing.assert_allclose(schedule(60), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-4)
  np.testing.assert_allclose(schedule(110), 1e-4, rtol=1e-4)
  np.testing.assert_allclose(schedule(500), 1e-4, rtol=1e-4)


def test_constant_schedule_values():
  schedule = optim.make_lr_schedule(_config(schedule='constant', warmup_steps=4), num_steps=100)
  # f32 values against float64 constants: the old default rtol=1e-7 was 1 ulp (measured 0.5 of
  # it); 1e-6 is ~8 ulp of f32 rounding and far below a 1-step warmup error (>= 25 %).
  np.testing.assert_allclose(
    [schedule(s) for s in (0, 2, 4, 50, 99)], [0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6
  )
  no_warmup = optim.make_lr_schedule(_config(schedule='constant', warmup_steps=0), num_steps=100)
  np.testing.assert_allclose(no_warmup(0), 1e-3, rtol=1e-6)


def test_bad_names_raise():
  with pytest.raises(ValueError, match='schedule'):
    optim.make_lr_schedule(_config(schedule='linear'), 10)
  with pytest.raises(ValueError, match='optimizer'):
    optim.make_optimizer(_config(optimizer='sgd'), 10)


def _state_size(state) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state) if hasattr(x, 'shape'))


def test_adafactor_state_is_factored_and_smaller_than_adamw():
  params = _params()
  n_params = _state_size(params)
  adamw_state = optim.make_optimizer(_config(), 100).init(params)
  adafactor_state = optim.make_optimizer(_config(optimizer='adafactor'), 100).init(params)
  assert _state_size(adamw_state) >= 2 * n_params
  assert _state_size(adafactor_state) < 0.1 * n_params
  shapes = {x.shape for x in jax.tree.leaves(adafactor_state)}
  assert (256,) in shapes and (512,) in shapes  # row / column statistics of the matrix


def test_updates_move_params_and_clip_bounds_them():
  params = _params()
  grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
  for name in ('adamw', 'adafactor'):
    tx = optim.make_optimizer(_config(optimizer=name, warmup_steps=0, schedule='constant'), 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    leaves = jax.tree.leaves(updates)
    assert all(np.all(np.isfinite(u)) for u in leaves)
    assert all(float(jnp.abs(u).max()) > 0 for u in leaves), name
    # With lr 1e-3 and unit-scale normalised steps nothing moves by more than a few lr.
    assert max(float(jnp.abs(u).max()) for u in leaves) < 1e-2, name


def test_adamw_weight_decay_skips_vectors():
  params = _params()
  tx = optim.make_optimizer(
    _config(weight_decay=0.1, warmup_steps=0, schedule='constant', grad_clip=0.0), 10
  )
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  params = {**params, 'bias': jnp.ones((512,))}
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # f32 product of three factors: <= 2 ulp; 1e-5 leaves ~80x.
  np.testing.assert_allclose(updates['kernel'], -1e-3 * 0.1 * params['kernel'], rtol=1e-5)
  np.testing.assert_array_equal(updates['bias'], 0.0)


def test_adafactor_weight_decay_is_scaled_by_the_learning_rate():
  # AdamW's decoupled decay: lr * weight_decay * p per step (optax's adafactor weight_decay_rate
  # alone ignores the lr: 0.1 would take 10 % of the weights every step).
  params = {**_params(), 'bias': jnp.ones((512,))}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  config = _config(
    optimizer='adafactor', weight_decay=0.1, warmup_steps=2, schedule='constant', grad_clip=0.0
  )
  tx = optim.make_optimizer(config, 10)
  state = tx.init(params)
  schedule = optim.make_lr_schedule(config, 10)
  for step in range(3):  # through the warm-up: the decay follows the schedule
    updates, state = tx.update(zero_grads, state, params)
    # f32 product of three factors: <= 2 ulp; 1e-5 leaves ~80x.
    expected = -float(schedule(step)) * 0.1 * params['kernel']
    np.testing.assert_allclose(updates['kernel'], expected, rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(updates['bias'], 0.0)
  assert float(schedule(2)) == pytest.approx(1e-3)


def test_multisteps_accumulates_gradients():
  params = {'w': jnp.zeros((4,))}
  tx = optim.make_optimizer(
    _config(grad_accum_steps=2, warmup_steps=0, schedule='constant', grad_clip=0.0), 10
  )
  state = tx.init(params)
  updates, state = tx.update({'w': jnp.full((4,), 1.0)}, state, params)
  np.testing.assert_array_equal(updates['w'], 0.0)  # first micro-step: nothing applied
  updates, state = tx.update({'w': jnp.full((4,), 3.0)}, state, params)
  # Adam's first step moves by -lr * sign(mean grad) = -1e-3 (mean of 1 and 3 is 2 > 0).
  # f32: exact step is -lr * 2 / (2 + eps) = -1e-3 * (1 - 5e-9); rtol 1e-4 covers eps and
  # rounding, a wrong sign or a missing bias correction is off by >= 100 %.
  np.testing.assert_allclose(updates['w'], -1e-3, rtol=1e-4)
  reference = optax.adam(1e-3).update({'w': jnp.full((4,), 2.0)}, optax.adam(1e-3).init(params))
  # Same f32 Adam math on the same numbers (mean of 1 and 3 is exact): a few ulp at most.
  np.testing.assert_allclose(updates['w'], reference[0]['w'], rtol=1e-5)


def test_ema_decay_and_update():
  config = _config()
  # f32 (1 + step) / (10 + step) and min(): one or two roundings (<= 1.2e-7 relative, measured
  # 2.9e-8); rtol 1e-6 is ~8 ulp. The same holds for the f32 lerps of ema_update below.
  np.testing.assert_allclose(optim.ema_decay(0, config), 0.1, rtol=1e-6)
  np.testing.assert_allclose(optim.ema_decay(90, config), 91 / 100, rtol=1e-6)
  np.testing.assert_allclose(optim.ema_decay(10**7, config), 0.9999, rtol=1e-6)
  np.testing.assert_allclose(optim.ema_decay(0, _config(ema_warmup=False)), 0.9999, rtol=1e-6)
  ema = {'a': jnp.array([1.0, 2.0]), 'b': jnp.array(4.0, jnp.bfloat16)}
  params = {'a': jnp.array([3.0, 6.0]), 'b': jnp.array(0.0, jnp.bfloat16)}
  new = optim.ema_update(ema, params, 0.75)
  np.testing.assert_allclose(new['a'], [1.5, 3.0], rtol=1e-6)
  assert new['b'].dtype == jnp.bfloat16 and float(new['b']) == 3.0
  # Works under jit with a traced decay.
  jitted = jax.jit(optim.ema_update)(ema, params, optim.ema_decay(jnp.array(0), config))
  np.testing.assert_allclose(jitted['a'], [0.1 * 1 + 0.9 * 3, 0.1 * 2 + 0.9 * 6], rtol=1e-6)


@pytest.mark.parametrize('how', optim.GRADIENT_LAYOUTS)
def test_settle_gradients_keeps_values_and_puts_its_op_in_the_step(how):
  """Each way of fixing the gradients before the optimizer is a value no-op inside a jitted
  train step (a conv kernel's gradient, as on GPU); 'barrier' and 'row_major' show up in the
  lowered step, and an unknown name is refused."""
  k = jax.random.normal(jax.random.key(0), (3, 3, 4, 6))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))

  def loss(kernel):
    y = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    return jnp.mean(jnp.square(y))

  def step(kernel):
    bias = jnp.zeros((6,))  # a 1-D and a 0-D leaf go through as well
    grads = {'k': jax.grad(loss)(kernel), 'b': bias, 's': jnp.float32(1.0)}
    grads = optim.settle_gradients(grads, how)
    return kernel - 0.1 * grads['k'] * grads['s'] + grads['b']

  want = k - 0.1 * jax.grad(loss)(k)
  np.testing.assert_allclose(jax.jit(step)(k), want, rtol=1e-6, atol=1e-6)
  # The same with the kernel sharded over its output channels (FSDP's rule for kernels).
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('fsdp',))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, None, 'fsdp'))
  out = jax.jit(step)(jax.device_put(k, sharded))
  assert out.sharding.spec == sharded.spec
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  text = jax.jit(step).lower(k).as_text()
  marker = {'barrier': 'optimization_barrier', 'row_major': 'LayoutConstraint', 'none': None}.get(
    optim.gradient_layout(how)
  )
  if marker:
    assert marker in text
  else:
    assert 'optimization_barrier' not in text and 'LayoutConstraint' not in text


def test_settle_gradients_refuses_an_unknown_way():
  with pytest.raises(ValueError, match="how='transpose'.*auto, barrier, row_major, none"):
    optim.settle_gradients({'k': jnp.ones((2, 2))}, 'transpose')
  # 'auto' is the barrier on GPU only: on CPU it cost 4-5 % of the small64 step.
  assert optim.gradient_layout('auto') == ('barrier' if jax.default_backend() == 'gpu' else 'none')


def _fresh_state_and_step(config, params):
  """A train state at step 0 (EMA = params) and the jitted optimizer-and-EMA half of the step."""
  from imagen_jax import train_lib

  tx = optim.make_optimizer(config, num_steps=100)
  state = {
    'step': jnp.zeros((), jnp.int32),
    'rng': jax.random.key(0),
    'params': params,
    'ema_params': jax.tree.map(jnp.copy, params),
    'opt_state': tx.init(params),
  }
  return state, jax.jit(lambda s, g: train_lib.update_state(s, g, tx, config))


@pytest.mark.parametrize('accum', [2, 4])
def test_an_accumulating_run_keeps_the_ema_of_the_same_updates(accum):
  """k micro-steps of the same gradient make one update equal to one plain step's; the EMA
  must be equal too. Its warm-up counted micro-steps: decay (1 + kj) / (10 + kj) at update j,
  so the random init kept a larger share of the EMA."""

  params = {'kernel': jnp.full((4, 8), 0.1), 'bias': jnp.zeros((8,))}

  def run(k):
    c = _config(grad_accum_steps=k, schedule='constant', warmup_steps=0, grad_clip=0.0)
    state, step = _fresh_state_and_step(c, params)
    for update in range(6):
      g = jax.tree.map(lambda x, v=0.5 + update: jnp.full_like(x, v), params)
      for _ in range(k):
        state, _ = step(state, g)
    return state

  plain, accumulated = run(1), run(accum)
  for key, rtol in (('params', 1e-6), ('ema_params', 1e-5)):
    pairs = zip(jax.tree.leaves(plain[key]), jax.tree.leaves(accumulated[key]), strict=True)
    for a, b in pairs:
      np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7, err_msg=key)


@pytest.mark.parametrize('accum', [1, 2])
@pytest.mark.parametrize('optimizer', ['adamw', 'adafactor'])
def test_finite_gradients_keep_the_state_finite(optimizer, accum):
  """The train step checks only its loss and gradient norm (train_lib.make_train_step); the
  state is checked before it is saved, sampled or scored. From a finite state, finite gradients
  (small, clipped huge, zero) keep every leaf of the new state finite (params, EMA, optimizer
  state), so a NaN reaches the state only through a non-finite gradient norm (seen at that step)
  or one the update makes: AdamW with eps=0 and a zero gradient (0/0), which the state check
  exists for."""

  config = _config(
    optimizer=optimizer,
    grad_accum_steps=accum,
    weight_decay=0.01,
    adafactor_min_dim=8,  # factor these small matrices as the large ones are
    schedule='constant',
    warmup_steps=0,
  )
  params = {
    'bias': jnp.zeros((32,)),
    'conv': jnp.full((3, 3, 8, 16), 0.1),
    'kernel': jnp.full((16, 32), 0.1),
  }

  def fresh(eps=None):
    c = _config(**{**config.to_dict(), **({} if eps is None else {'eps': eps})})
    return _fresh_state_and_step(c, params)

  def grads(scale, seed=0, **replace):
    keys = jax.random.split(jax.random.key(seed), len(params))
    pairs = zip(params.items(), keys, strict=True)
    g = {k: scale * jax.random.normal(kk, v.shape) for (k, v), kk in pairs}
    return {**g, **replace}

  def finite(state) -> bool:  # params, EMA and optimizer state
    leaves = jax.tree.leaves([state['params'], state['ema_params'], state['opt_state']])
    return all(
      bool(jnp.all(jnp.isfinite(x))) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)
    )

  def run(state, step, grads_seq) -> list[tuple[bool, bool]]:
    """(gradient norm finite, new state finite) of each step."""
    seen = []
    for g in grads_seq:
      state, norm = step(state, g)
      seen.append((bool(jnp.isfinite(norm)), finite(state)))
    return seen

  cycle = 2 * accum
  state, step = fresh()
  for scale in (1.0, 1e15, 0.0):  # 1e15 is clipped
    assert run(state, step, [grads(scale, seed=i) for i in range(cycle)]) == [(True, True)] * cycle
  nan_grads = grads(1.0, bias=jnp.full((32,), jnp.nan))
  assert run(state, step, [nan_grads])[0][0] is False  # seen at its own step
  if optimizer == 'adamw':  # 0 / (sqrt(0) + 0) in the applied update of the zero-gradient bias
    state, step = fresh(eps=0.0)
    seen = run(state, step, [grads(1.0, bias=jnp.zeros((32,)))] * accum)
    assert seen[-1] == (True, False)  # finite gradient norm, NaN state: the loop's state check
