"""Mesh construction, logical-axis rules, sharded U-Net forward and sampling placements on 8 fake
CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from imagen_jax import sharding
from imagen_jax.models import PRESETS, UNet

pytestmark = pytest.mark.unit

MESHES = [(8, 1), (2, 4), (1, 8)]


@pytest.fixture(scope='module')
def tiny():
  """Tiny U-Net (random, non-zero output conv) split into graphdef and state."""
  config = PRESETS['tiny']
  abstract = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  rng = np.random.default_rng(0)
  state = jax.tree.map(
    lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), abstract_state
  )
  return config, graphdef, state


def test_eight_fake_devices():
  assert jax.device_count() == 8, 'conftest.py must set 8 fake CPU devices before jax import'


@pytest.mark.parametrize('shape', MESHES)
def test_make_mesh_shapes_and_auto_axes(shape):
  mesh = sharding.make_mesh({'data': shape[0], 'fsdp': shape[1]})
  assert dict(mesh.shape) == {'data': shape[0], 'fsdp': shape[1]}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  inferred = sharding.make_mesh({'data': -1, 'fsdp': shape[1]})
  assert dict(inferred.shape) == dict(mesh.shape)


def test_make_mesh_rejects_bad_sizes():
  with pytest.raises(ValueError, match='divide'):
    sharding.make_mesh({'data': 3, 'fsdp': 1})
  with pytest.raises(ValueError, match='device count'):
    sharding.make_mesh({'data': 2, 'fsdp': 2})
  with pytest.raises(ValueError, match='-1'):
    sharding.make_mesh({'data': -1, 'fsdp': -1})


def test_logical_to_mesh():
  specs = {
    'conv': ('conv_h', 'conv_w', 'conv_in', 'conv_out'),
    'x': ('batch', None),
    'y': ('unknown',),
  }
  out = sharding.logical_to_mesh(specs)
  assert out == {'conv': P(None, None, None, 'fsdp'), 'x': P(('data', 'fsdp'), None), 'y': P(None)}
  # A mesh axis is used at most once per spec.
  assert sharding.logical_to_mesh(('mlp', 'heads')) == P('fsdp', None)


@pytest.mark.parametrize('shape', MESHES)
def test_tiny_unet_partition_specs_resolve(tiny, shape):
  _, _, state = tiny
  mesh = sharding.make_mesh({'data': shape[0], 'fsdp': shape[1]})
  shardings = sharding.state_shardings(state, mesh)
  flat = {'/'.join(map(str, p)): v.get_value() for p, v in shardings.flat_state()}
  values = {'/'.join(map(str, p)): v.get_value() for p, v in state.flat_state()}
  assert set(flat) == set(values)
  for path, sh in flat.items():
    assert isinstance(sh, jax.sharding.NamedSharding)
    sh.shard_shape(values[path].shape)  # raises if not divisible
  fsdp = shape[1]
  kernel = flat['down_1_res_0/conv_0/kernel']  # [3, 3, 32, 32]
  assert kernel.spec == P(None, None, None, 'fsdp')  # 32 channels divide over any fsdp size
  # 3 output channels do not divide over fsdp > 1: replicated instead of crashing.
  assert flat['output_conv/kernel'].spec == P(None, None, None, 'fsdp' if fsdp == 1 else None)
  assert flat['output_norm/scale'].spec == P(None)


def test_optimizer_state_shardings_follow_params(tiny):
  _, _, state = tiny
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  for tx in (optax.adamw(1e-3), optax.adafactor(1e-3, min_dim_size_to_factor=8)):
    abstract_opt = jax.eval_shape(tx.init, state)
    opt_shardings = sharding.state_shardings(abstract_opt, mesh)
    assert jax.tree.structure(opt_shardings) == jax.tree.structure(abstract_opt)
    leaves = jax.tree.leaves(abstract_opt)
    shs = jax.tree.leaves(opt_shardings)
    assert any(s.spec != P() for s in shs)  # full-shape moments are sharded like params
    for leaf, sh in zip(leaves, shs, strict=True):
      sh.shard_shape(leaf.shape)


def test_sharded_forward_matches_unsharded(tiny):
  config, graphdef, state = tiny
  b = 8
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((b, 8, 8, 3)), jnp.float32)
  logsnr = jnp.linspace(-5.0, 5.0, b)
  text_embs = jnp.asarray(rng.standard_normal((b, 4, config.text_dim)), jnp.float32)
  text_mask = jnp.asarray(rng.random((b, 4)) < 0.7).at[:, 0].set(True)
  batch = (x, logsnr, text_embs, text_mask)

  def forward(state, x, logsnr, text_embs, text_mask):
    return nnx.merge(graphdef, state)(x, logsnr, text_embs, text_mask)

  expected = jax.jit(forward)(state, *batch)
  assert float(jnp.abs(expected).max()) > 0
  for shape in [(2, 4), (1, 8)]:
    mesh = sharding.make_mesh({'data': shape[0], 'fsdp': shape[1]})
    param_sh = sharding.state_shardings(state, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
      sharded_state = jax.device_put(state, param_sh)
      sharded_batch = jax.device_put(batch, batch_sh)
      fn = jax.jit(forward, in_shardings=(param_sh, *(batch_sh,) * 4), out_shardings=batch_sh)
      out = fn(sharded_state, *sharded_batch)
    assert out.sharding.spec == P(('data', 'fsdp'))
    # f32 tiny U-Net, sharded vs unsharded: same math, other reduction order and collectives;
    # outputs O(1), measured 7.4e-7: 1e-4 leaves >100x, a wrong shard layout is O(0.1-1) off.
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_bytes_per_device(tiny):
  _, _, state = tiny
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 8})
  full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  shardings = sharding.state_shardings(state, mesh)
  per_device = sharding.bytes_per_device(state, shardings)
  assert full / 8 < per_device < full
  formats = sharding.state_formats(shardings, state, 'conv_ohwi')  # the layout keeps the bytes
  assert sharding.bytes_per_device(state, formats) == per_device
  assert (
    sharding.bytes_per_device(
      state, sharding.state_shardings(state, sharding.make_mesh({'data': 8, 'fsdp': 1}))
    )
    == full
  )


def test_conv_ohwi_state_layout_keeps_values_and_shards(tiny):
  config, graphdef, state = tiny
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  shs = sharding.state_shardings(state, mesh)
  formats = sharding.state_formats(shs, state, 'conv_ohwi')
  assert sharding.state_formats(shs, state, 'default') is shs
  assert sharding.state_layout('auto') == 'default'  # the suite runs on CPU
  assert sharding.plain_shardings(formats) == shs
  with pytest.raises(ValueError, match='conv_ohwi'):
    sharding.state_layout('nhwc')

  is_4d = [leaf.ndim == 4 for leaf in jax.tree.leaves(state)]
  assert any(is_4d) and not all(is_4d)
  for leaf, sh, fmt in zip(
    jax.tree.leaves(state), jax.tree.leaves(shs), jax.tree.leaves(formats), strict=True
  ):
    if leaf.ndim == 4:  # a [kh, kw, I, O] kernel, stored O-major, I-minor
      assert fmt.layout.major_to_minor == (3, 0, 1, 2) and fmt.sharding == sh
    else:
      assert fmt is sh

  # relayout donates what it relays: fresh buffers (device_put could share the fixture's)
  placed = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shs)(state)
  old = jax.tree.leaves(placed)
  laid = sharding.relayout(placed, formats)
  leaves = jax.tree.leaves(laid)
  for before, leaf, ref, sh in zip(
    old, leaves, jax.tree.leaves(state), jax.tree.leaves(shs), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))  # logical values kept
    assert leaf.sharding.spec == sh.spec  # FSDP shards kept
    assert before.is_deleted() == (leaf.ndim == 4)  # only the relaid leaves were donated
    want = (3, 0, 1, 2) if leaf.ndim == 4 else tuple(range(leaf.ndim))
    assert leaf.format.layout.major_to_minor == want
  again = jax.tree.leaves(sharding.relayout(laid, formats))  # already laid out: nothing copied
  assert all(a is b for a, b in zip(again, leaves, strict=True))

  b = 8
  rng = np.random.default_rng(2)
  batch = (
    jnp.asarray(rng.standard_normal((b, 8, 8, 3)), jnp.float32),
    jnp.linspace(-5.0, 5.0, b),
    jnp.asarray(rng.standard_normal((b, 4, config.text_dim)), jnp.float32),
    jnp.ones((b, 4), bool),
  )

  def forward(state, *batch):
    return nnx.merge(graphdef, state)(*batch)

  expected = jax.jit(forward)(state, *batch)
  with jax.set_mesh(mesh):
    fn = jax.jit(forward, in_shardings=(formats, *(sharding.batch_sharding(mesh),) * 4))
    got = fn(laid, *jax.device_put(batch, sharding.batch_sharding(mesh)))
  # The sharded forward (its collectives reorder f32 sums) against the unsharded one: 8.3e-7 off
  # on outputs O(1), the same as with row-major kernels (bit-equal to it here); 1e-4 as in
  # test_sharded_forward_matches_unsharded, while a transposed kernel is O(0.1-1) off.
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape', MESHES)
def test_sampler_inputs_split_rows_the_mesh_divides_else_replicate(shape):
  mesh = sharding.make_mesh({'data': shape[0], 'fsdp': shape[1]})
  text = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2)
  mask = np.arange(8 * 3).reshape(8, 3) % 2 == 0
  for rows, split in ((8, True), (16, True), (3, False)):
    picked = np.arange(rows) % 8
    arrays = sharding.sampler_inputs(mesh, text[picked], mask[picked])
    for got, want in zip(arrays, (text[picked], mask[picked]), strict=True):
      np.testing.assert_array_equal(np.asarray(got), want)
      assert got.sharding == (sharding.batch_sharding(mesh) if split else sharding.replicated(mesh))
      assert {s.data.shape[0] for s in got.addressable_shards} == {rows // 8 if split else rows}


def test_batch_devices_split_what_they_divide_and_put_the_rest_on_the_first():
  from imagen_jax import cascade

  devices = cascade.BatchDevices(jax.devices()[:2])
  params = jax.device_put({'w': jnp.float32(3.0)}, devices.params_sharding)
  sample_fn = jax.jit(lambda params, x, rng: x * params['w'] + jax.random.normal(rng, x.shape))
  x = np.arange(6, dtype=np.float32).reshape(6, 1)
  rng = jax.random.key(0)
  want = np.asarray(jax.jit(sample_fn.__wrapped__)({'w': 3.0}, x, rng))  # one device
  assert devices.splits(6) and not devices.splits(5)
  assert (devices.describe(True), devices.describe(False)) == (
    ' over 2 devices',
    ' on the first device',
  )
  fn, placed, put = devices.place(sample_fn, params, split=True)
  out = fn(placed, put(x), rng)
  assert out.sharding.spec == P('batch') and len(out.sharding.device_set) == 2
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6)  # the same noise, by index
  assert devices.place(sample_fn, params, split=True)[0] is fn  # compiled once per sampler
  # The split sampler is traced under its devices' mesh, called or lowered ahead (sample.py),
  # so that the TPU splash attention runs in a shard_map (XLA cannot partition its kernel).
  seen = []

  def probe(params, x, rng):
    seen.append(dict(jax.sharding.get_abstract_mesh().shape))
    return sample_fn(params, x, rng)

  probe_fn, placed, put = devices.place(probe, params, split=True)
  compiled = probe_fn.lower(placed, put(x), rng).compile()
  np.testing.assert_allclose(np.asarray(compiled(placed, put(x), rng)), want, rtol=1e-6)
  called = devices.place(lambda *a: probe(*a), params, split=True)[0]  # traced by its call
  called(placed, put(x), rng)
  assert seen == [{'batch': 2}, {'batch': 2}]
  fn, placed, put = devices.place(sample_fn, params, split=False)
  assert placed['w'].devices() == {jax.devices()[0]}  # the first device's replica
  out = fn(placed, put(x[:5]), rng)
  assert out.devices() == {jax.devices()[0]}
  want_odd = np.asarray(jax.jit(sample_fn.__wrapped__)({'w': 3.0}, x[:5], rng))
  np.testing.assert_allclose(np.asarray(out), want_odd, rtol=1e-6)
  one = cascade.BatchDevices(jax.devices()[:1])
  assert one.mesh is None and not one.splits(4) and one.describe(True) == ''
