"""The TPU splash attention path (`imagen_jax.models.tpu_attention`), run in Pallas interpret
mode on CPU against `jax.nn.dot_product_attention(implementation='xla')`, and the TPU plan.

Tolerances: float32 differs from the reference only by the order of the float32 sums (online
softmax over key blocks; O(1) inputs, S <= 640): 1e-5, well above the 1e-6 level at which
CPU models disagree. bfloat16 rounds q/k/v, the pre-scaled q and the output to bfloat16 (eps
7.8e-3, outputs of at most a few units): 3e-2 for values; gradients are compared relative to
their largest entry.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from imagen_jax.models import PRESETS, layers, tpu_attention
from tests.attention_test import _perturbed_tiny, _preset_attention_shapes

pytestmark = pytest.mark.unit

_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}


def _qkv(b, t, s, h=2, d=8, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, h, d)).astype(dtype)
  k = jax.random.normal(kk, (b, s, h, d)).astype(dtype)
  v = jax.random.normal(kv, (b, s, h, d)).astype(dtype)
  return q, k, v


def _xla(q, k, v, lengths):
  return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation='xla')


_splash = jax.jit(
  lambda q, k, v, lengths: tpu_attention.splash_attention(q, k, v, lengths, interpret=True)
)


@pytest.mark.parametrize(
  'case, t, s, lengths, dtype',
  [
    # T and S not multiples of 128; lengths 1 (first key only), mid, full.
    ('generic', 130, 150, [1, 77, 150], jnp.float32),
    ('generic', 130, 150, [1, 77, 150], jnp.bfloat16),
    # Self-attention with the text appended: 144 pixels (12x12), then 20 text tokens of which
    # the first 3 / 20 are valid.
    ('pixels+text', 144, 144 + 20, [144 + 3, 144 + 20], jnp.float32),
    ('pixels+text', 144, 144 + 20, [144 + 3, 144 + 20], jnp.bfloat16),
    # Cross-attention: 256 pixels (16x16) to 130 text tokens.
    ('cross', 256, 130, [5, 130], jnp.float32),
    # Several key blocks (640 = 5 x 128): the online softmax across blocks, a length mid-block.
    ('blocks', 130, 640, [300, 1], jnp.bfloat16),
  ],
)
def test_splash_matches_xla(case, t, s, lengths, dtype):
  lengths = jnp.array(lengths, jnp.int32)
  q, k, v = _qkv(len(lengths), t, s, dtype=dtype)
  out = _splash(q, k, v, lengths)
  assert out.shape == q.shape and out.dtype == dtype, case
  expected = np.asarray(_xla(q, k, v, lengths), np.float32)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=_TOL[dtype], rtol=0)


def test_splash_all_keys_and_ignored_padding():
  """kv_lengths None attends to every key; keys past a length change nothing (bitwise)."""
  q, k, v = _qkv(2, 128, 200)
  np.testing.assert_allclose(
    np.asarray(_splash(q, k, v, None)), np.asarray(_xla(q, k, v, None)), atol=1e-5, rtol=0
  )
  lengths = jnp.array([1, 130], jnp.int32)
  valid = (jnp.arange(200)[None, :] < lengths[:, None])[:, :, None, None]
  out = _splash(q, k, v, lengths)
  garbage = _splash(q, jnp.where(valid, k, 1e3), jnp.where(valid, v, -1e3), lengths)
  np.testing.assert_array_equal(np.asarray(garbage), np.asarray(out))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_splash_gradients_match_xla(dtype):
  """Training differentiates through attention: the kernel's own backward (custom VJP) gives
  the gradients of XLA's attention with respect to q, k and v."""
  lengths = jnp.array([1, 200], jnp.int32)
  q, k, v = _qkv(2, 130, 300, dtype=dtype)
  cotangent = jax.random.normal(jax.random.key(1), q.shape)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, lengths).astype(jnp.float32) * cotangent)

  got = jax.jit(jax.grad(loss(_splash), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(_xla), argnums=(0, 1, 2))(q, k, v)
  rel = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}[dtype]
  for name, a, b in zip('qkv', got, want, strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=rel * np.abs(b).max(), rtol=0, err_msg=name)
  # Keys past each length get no gradient.
  assert not np.asarray(got[1], np.float32)[0, 1:].any() and not np.asarray(got[2])[1, 200:].any()


def test_splash_under_a_mesh_shards_the_batch():
  """With an active mesh the kernel runs in a shard_map over the batch (XLA cannot partition
  a Mosaic kernel): same numbers, batch-sharded output."""
  # The project's ('data', 'fsdp') mesh of Auto axes; a size-1 axis is not split over.
  mesh = jax.make_mesh(
    (2, 1, 2), ('data', 'other', 'fsdp'), axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:4]
  )
  lengths = jnp.array([1, 77, 150, 9], jnp.int32)
  q, k, v = _qkv(4, 130, 150)
  with jax.set_mesh(mesh):
    batch = NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))
    args = jax.device_put((q, k, v, lengths), batch)
    assert tpu_attention._batch_axes(4) == ('data', 'fsdp') and tpu_attention._batch_axes(2) == ()
    out = _splash(*args)
    assert 'shard_map' in str(jax.make_jaxpr(_splash)(*args))
  assert out.sharding.spec[0] == ('data', 'fsdp')
  np.testing.assert_allclose(np.asarray(out), np.asarray(_xla(q, k, v, lengths)), atol=1e-5, rtol=0)


def test_splash_lowers_for_a_tpu_under_a_mesh_whatever_the_batch():
  """XLA cannot partition a Mosaic kernel: lowered for a TPU (jax.export, no TPU needed) over
  two devices, the kernel must sit in a shard_map, for a batch the devices divide and for one
  they do not (each device then runs the whole batch); outside a mesh the lowering refuses."""
  mesh = jax.make_mesh((2,), ('data',), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
  rows = NamedSharding(mesh, PartitionSpec('data'))
  fn = jax.jit(lambda *a: tpu_attention.splash_attention(*a, interpret=False))

  def spec(b, sharding=None):
    qkv = jax.ShapeDtypeStruct((b, 128, 2, 64), jnp.bfloat16, sharding=sharding)
    return (qkv, qkv, qkv, jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding))

  def lowered(*args):
    return jax.export.export(fn, platforms=['tpu'])(*args).mlir_module()

  with jax.set_mesh(mesh):
    for args in (spec(2, rows), spec(3)):
      module = lowered(*args)
      assert 'tpu_custom_call' in module and 'sdy.manual_computation' in module, args[0].shape
  with pytest.raises(NotImplementedError, match='cannot be automatically partitioned'):
    lowered(*spec(2, rows))


def test_splash_refuses_what_it_does_not_take():
  q, k, v = _qkv(1, 64, 150)
  with pytest.raises(tpu_attention.SplashUnsupportedError, match='64 queries'):
    tpu_attention.splash_attention(q, k, v, None, interpret=True)
  assert issubclass(tpu_attention.SplashUnsupportedError, NotImplementedError)


def _tpu_plan(q, k):
  """`layers.attention_plan` as a TPU would make it (the kernel then runs in interpret mode)."""
  return layers.plan_attention(
    backend='tpu',
    cuda=False,
    dtype=q.dtype,
    q_len=q.shape[1],
    head_dim=q.shape[3],
    head_dim_limit=0,
    kv_len=k.shape[1],
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_attention_routes_through_splash_when_planned(monkeypatch, dtype):
  monkeypatch.setattr(layers, 'attention_plan', _tpu_plan)
  lengths = jnp.array([3, 150], jnp.int32)
  q, k, v = _qkv(2, 130, 150, dtype=dtype)
  with layers.record_attention_plans() as plans:
    out = jax.jit(lambda *a: layers.attention(*a, name='probe'))(q, k, v, lengths)
  assert [(p['name'], p['implementation']) for p in plans] == [('probe', 'splash')]
  expected = np.asarray(_xla(q, k, v, lengths), np.float32)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=_TOL[dtype], rtol=0)
  # The compiled program runs the kernel (interpret mode: no TPU custom call on CPU), not XLA's
  # [B, H, T, S] softmax.
  jaxpr = str(jax.make_jaxpr(lambda *a: layers.attention(*a))(q, k, v, lengths))
  assert 'pallas_call' in jaxpr


def test_attention_falls_back_to_xla_when_splash_refuses(monkeypatch, caplog):
  """A splash plan for a shape the splash path refuses (raised while tracing) logs a warning
  and uses XLA; other errors are not caught."""
  monkeypatch.setattr(layers, 'attention_plan', lambda q, k: ('splash', 'forced'))
  lengths = jnp.array([1, 30], jnp.int32)
  q, k, v = _qkv(2, 16, 30)
  with caplog.at_level(logging.WARNING), layers.record_attention_plans() as plans:
    out = layers.attention(q, k, v, lengths, name='small')
  assert 'splash refused' in caplog.text
  assert plans[0]['implementation'] == 'xla' and 'splash refused' in plans[0]['reason']
  np.testing.assert_array_equal(np.asarray(out), np.asarray(_xla(q, k, v, lengths)))


def test_tpu_plan_cases():
  plan = lambda **kw: layers.plan_attention(
    **{
      'backend': 'tpu',
      'cuda': False,
      'dtype': jnp.bfloat16,
      'q_len': 1024,
      'kv_len': 1152,
      'head_dim': 64,
      'head_dim_limit': 0,
      **kw,
    }
  )
  assert plan() == ('splash', 'Pallas splash attention, key/value lengths as segment ids')
  assert plan(dtype=jnp.float32)[0] == 'splash'
  assert plan(dtype=jnp.float16) == ('xla', 'float16: the splash path takes bfloat16 or float32')
  assert plan(q_len=1)[1].startswith('a single query')
  assert plan(q_len=64)[0] == 'xla' and plan(q_len=128)[0] == 'splash'
  assert plan(kv_len=32)[0] == 'xla' and plan(kv_len=128)[0] == 'splash'
  assert plan(head_dim=8)[0] == 'splash' and plan(head_dim=256)[0] == 'splash'
  assert plan(head_dim=512) == ('xla', 'head dim 512 > 256: not tried with the splash kernel')
  # Other backends are unchanged: CPU gets its blocked attention, GPU cuDNN.
  assert plan(backend='cpu')[0] == 'blocked'
  assert plan(backend='gpu', cuda=True, head_dim_limit=128)[0] == 'cudnn'


@pytest.mark.parametrize(
  'name, resolution', [('small64', 64), ('base64', 64), ('sr256', 256), ('sr1024', 1024)]
)
@pytest.mark.parametrize('text_len', [128, 32])
def test_preset_attention_on_tpu(name, resolution, text_len):
  """On TPU in bfloat16 every self-attention with at least 128 pixels gets splash, and the
  cross-attention too when the text has at least 128 tokens; the single-query text pooling,
  the 8x8 level of base64 (64 queries) and cross-attention to 32 tokens use XLA."""
  plans = _preset_attention_shapes(name, resolution, text_len=text_len)
  for p in plans:
    impl, reason = layers.plan_attention(
      backend='tpu',
      cuda=False,
      dtype=p['dtype'],
      q_len=p['q'][1],
      head_dim=p['q'][3],
      head_dim_limit=0,
      kv_len=p['k'][1],
    )
    short = p['q'][1] < 128 or p['k'][1] < 128
    expected = 'xla' if p['name'] == 'text_pool' or short else 'splash'
    assert impl == expected, (name, p, reason)
    if p['name'].endswith('attn') or '_attn_' in p['name']:  # self-attention
      assert impl == ('splash' if p['q'][1] >= 128 else 'xla'), (name, p)


def test_unet_gradients_through_splash(monkeypatch):
  """The tiny U-Net at 32x32 (attention over 16x16 = 256 pixels, 128 text tokens) with the
  TPU plan: every self- and cross-attention runs the kernel, the text pooling XLA, and the
  loss and its parameter gradients are those of the all-XLA model."""
  config = PRESETS['tiny']
  graphdef, state = nnx.split(_perturbed_tiny(config))
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (2, 32, 32, 3))
  logsnr = jnp.array([-2.0, 3.0])
  text_embs = jax.random.normal(keys[1], (2, 128, config.text_dim))
  text_mask = jnp.arange(128)[None, :] < jnp.array([[5], [128]])

  def loss(state):
    return jnp.mean(nnx.merge(graphdef, state)(x, logsnr, text_embs, text_mask) ** 2)

  want_loss, want_grads = jax.jit(jax.value_and_grad(loss))(state)
  monkeypatch.setattr(layers, 'attention_plan', _tpu_plan)
  with layers.record_attention_plans() as plans:
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(state)
  impls = {p['name']: p['implementation'] for p in plans}
  assert impls.pop('text_pool') == 'xla' and set(impls.values()) == {'splash'}, impls
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max(), rtol=0)
