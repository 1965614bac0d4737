"""U-Net tests on the tiny presets: shapes, masks, classifier-free dropping, remat, names."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from imagen_jax.models import PRESETS, UNet, UNetConfig, config_from_dict, count_params, layers

pytestmark = pytest.mark.unit

B, RES, L = 2, 8, 6


def _init(config: UNetConfig, seed: int = 0, *, randomize: bool = False) -> UNet:
  """Builds the model inside one jit (eager init dispatches every op separately).

  With `randomize`, all params (zero-initialised ones included) are replaced by random
  values drawn on the host, so outputs are nonzero and every input path matters.
  """
  abstract = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract)
  if randomize:
    rng = np.random.default_rng(seed)
    state = jax.tree.map(
      lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), abstract_state
    )
  else:
    state = jax.jit(lambda: nnx.state(UNet(config, rngs=nnx.Rngs(seed))))()
  assert jax.tree.structure(state) == jax.tree.structure(abstract_state)
  return nnx.merge(graphdef, state)


def _perturbed(config: UNetConfig, seed: int = 0) -> UNet:
  return _init(config, seed, randomize=True)


def _inputs(config: UNetConfig, seed: int = 0):
  k = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(k[0], (B, RES, RES, config.image_channels))
  logsnr = jnp.array([-3.0, 4.0])
  text_embs = jax.random.normal(k[1], (B, L, config.text_dim))
  text_mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
  extra = {}
  if config.lowres_cond:
    extra = dict(
      lowres=jax.random.normal(k[2], x.shape), aug_level=jnp.array([0.1, 0.4], jnp.float32)
    )
  return x, logsnr, text_embs, text_mask, extra


@nnx.jit
def _forward(model, x, logsnr, text_embs, text_mask, drop_text):
  return model(x, logsnr, text_embs, text_mask, drop_text=drop_text)


@pytest.fixture(scope='module')
def tiny_model():
  return _perturbed(PRESETS['tiny'])


def test_output_shape_and_dtype_base():
  config = PRESETS['tiny']
  model = _init(config)
  x, logsnr, text_embs, text_mask, _ = _inputs(config)
  out = _forward(model, x, logsnr, text_embs, text_mask, None)
  assert out.shape == x.shape and out.dtype == jnp.float32
  # Zero-initialised output conv: a fresh model predicts exactly zero (0 * finite = 0).
  np.testing.assert_array_equal(np.asarray(out), 0.0)


@nnx.jit
def _forward_sr(model, x, logsnr, text_embs, text_mask, lowres, aug_level):
  return model(x, logsnr, text_embs, text_mask, lowres=lowres, aug_level=aug_level)


def test_output_shape_and_dtype_sr():
  config = PRESETS['tiny_sr']
  model = _perturbed(config)
  x, logsnr, text_embs, text_mask, extra = _inputs(config)
  lowres, aug = extra['lowres'], extra['aug_level']
  out = _forward_sr(model, x, logsnr, text_embs, text_mask, lowres, aug)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and float(jnp.abs(out).max()) > 0
  # The low-res image and the aug level both condition the output.
  out_lowres = _forward_sr(model, x, logsnr, text_embs, text_mask, -lowres, aug)
  out_aug = _forward_sr(model, x, logsnr, text_embs, text_mask, lowres, 1 - aug)
  # "Differs" checks (np.allclose defaults): rounding can never make a real change look equal.
  assert not np.allclose(out, out_lowres) and not np.allclose(out, out_aug)
  with pytest.raises(ValueError, match='lowres'):
    model(x, logsnr, text_embs, text_mask)


def test_bad_inputs_raise_clear_errors(tiny_model):
  x, logsnr, text_embs, text_mask, _ = _inputs(PRESETS['tiny'])
  with pytest.raises(ValueError, match='text_dim'):
    tiny_model(x, logsnr, text_embs[..., :5], text_mask)
  with pytest.raises(ValueError, match='divisible'):
    tiny_model(x[:, :7, :7], logsnr, text_embs, text_mask)
  with pytest.raises(ValueError, match='lowres_cond=False'):
    tiny_model(x, logsnr, text_embs, text_mask, lowres=x, aug_level=logsnr)


def test_masked_text_tokens_change_nothing(tiny_model):
  x, logsnr, text_embs, text_mask, _ = _inputs(PRESETS['tiny'])
  no_drop = jnp.zeros((B,), bool)
  out = _forward(tiny_model, x, logsnr, text_embs, text_mask, no_drop)
  garbage = 100.0 * jax.random.normal(jax.random.key(7), text_embs.shape)
  changed = jnp.where(text_mask[..., None], text_embs, garbage)
  out_changed = _forward(tiny_model, x, logsnr, changed, text_mask, no_drop)
  # f32, same compiled function and shapes: masked keys get exactly zero attention weight, so
  # the outputs match bitwise (measured 0). 1e-5 on outputs O(1) only allows an additive-mask
  # implementation's rounding; garbage of scale 100 that leaked would move them by O(1).
  np.testing.assert_allclose(out, out_changed, atol=1e-5)
  # ...while a visible token does change the output.
  visible = text_embs.at[:, 0].add(1.0)
  assert not np.allclose(out, _forward(tiny_model, x, logsnr, visible, text_mask, no_drop))


def test_drop_text_ignores_text_inputs(tiny_model):
  x, logsnr, text_embs, text_mask, _ = _inputs(PRESETS['tiny'])
  drop = jnp.array([True, False])
  # atol 1e-5 below: f32, same compiled function, dropped text is masked out exactly (measured
  # 0); text that still reached the output would change it by O(0.1-1).
  out = _forward(tiny_model, x, logsnr, text_embs, text_mask, drop)
  other_embs = jax.random.normal(jax.random.key(3), text_embs.shape)
  other_mask = jnp.ones_like(text_mask)
  out_other = _forward(tiny_model, x, logsnr, other_embs, other_mask, drop)
  np.testing.assert_allclose(out[0], out_other[0], atol=1e-5)  # dropped: text is ignored
  assert not np.allclose(out[1], out_other[1])  # kept: text matters
  # Dropped output differs from the text-conditioned output for the same example.
  cond = _forward(tiny_model, x, logsnr, text_embs, text_mask, jnp.zeros((B,), bool))
  assert not np.allclose(out[0], cond[0])
  np.testing.assert_allclose(out[1], cond[1], atol=1e-5)
  # An all-False mask means "no text": same as dropping.
  empty = _forward(
    tiny_model, x, logsnr, text_embs, text_mask.at[0].set(False), jnp.zeros((B,), bool)
  )
  np.testing.assert_allclose(empty[0], out[0], atol=1e-5)


def test_remat_same_output_and_gradient():
  # One level: input conv, res blocks, self-attention with text, cross-attention, output.
  config = dataclasses.replace(
    PRESETS['tiny'], channel_mults=(1,), attn_levels=(0,), cross_attn_levels=(0,)
  )
  x, logsnr, text_embs, text_mask, _ = _inputs(config)
  models = [_perturbed(dataclasses.replace(config, remat=remat), seed=0) for remat in (False, True)]

  def loss_and_grad(model):
    graphdef, params = nnx.split(model)

    def loss(p):
      out = nnx.merge(graphdef, p)(x, logsnr, text_embs, text_mask)
      return jnp.mean(out**2)

    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = [loss_and_grad(m) for m in models]
  # f32, two programs (remat recomputes the forward inside the backward), so fusion and
  # rounding may differ: loss ~1 ulp, gradients (|g| <= 0.024) measured 2e-9. rtol 1e-4 with
  # atol 1e-6 (4e-5 of the largest gradient) leaves > 100x; a wrong recomputation is O(1) off.
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_param_paths_are_stable_and_annotated():
  model = nnx.eval_shape(lambda: UNet(PRESETS['tiny'], rngs=nnx.Rngs(0)))
  flat = list(nnx.state(model, nnx.Param).flat_state())
  paths = {'/'.join(map(str, p)) for p, _ in flat}
  expected = [
    'down_0_res_0/conv_0/kernel',
    'down_1_attn_0/text_kv/kernel',
    'down_1_cross_0/kv/kernel',
    'down_1_downsample/conv/kernel',
    'input_conv/kernel',
    'logsnr_emb/dense_0/kernel',
    'mid_attn/qkv/kernel',
    'mid_cross/q/kernel',
    'mid_res_1/film/kernel',
    'null_text',
    'output_conv/kernel',
    'text_pool/query',
    'up_0_res_0/skip/kernel',
    'up_1_upsample/conv/kernel',
  ]
  assert sorted(p for p in paths if p in expected) == expected
  assert not any(p.startswith('aug_emb') for p in paths)  # base model: no aug embedding
  for path, var in flat:
    names = var.get_metadata().get('logical_axes')
    assert names is not None and len(names) == len(var.get_value().shape), path
  assert count_params(model) == sum(np.prod(v.get_value().shape) for _, v in flat)


def test_bfloat16_compute_is_finite_and_returns_float32():
  config = dataclasses.replace(PRESETS['tiny'], dtype='bfloat16')
  model = _perturbed(config)
  x, logsnr, text_embs, text_mask, _ = _inputs(config)
  out = _forward(model, x, logsnr, text_embs, text_mask, None)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)


def _near_clean_pair(seed: int = 0, *, flat: bool = False):
  """A bfloat16-exact image in [0.55, 0.95] (or flat at 0.75) and the same plus noise of 0.0015
  (sigma at log-SNR ~13): below half a bfloat16 ulp there (2^-9 ~ 0.00195), so both round to
  the same bfloat16."""
  k = jax.random.split(jax.random.key(seed), 2)
  clean = jax.random.uniform(k[0], (B, RES, RES, 3), minval=0.55, maxval=0.95)
  clean = jnp.full_like(clean, 0.75) if flat else clean.astype(jnp.bfloat16).astype(jnp.float32)
  noisy = clean + 0.0015 * jnp.where(jax.random.bernoulli(k[1], 0.5, clean.shape), 1.0, -1.0)
  assert bool(jnp.all(noisy.astype(jnp.bfloat16) == clean.astype(jnp.bfloat16)))
  return clean, noisy


def test_bfloat16_model_sees_noise_below_bfloat16_resolution():
  """The input convolution runs in float32 in a bfloat16 model, so noise that bfloat16 cannot
  represent at the input still changes the output; with a bfloat16 input convolution (the
  previous behaviour) both inputs give bit-identical outputs."""
  config = dataclasses.replace(PRESETS['tiny'], dtype='bfloat16')
  model = _perturbed(config)
  clean, noisy = _near_clean_pair()
  _, _, text_embs, text_mask, _ = _inputs(config)
  logsnr = jnp.full((B,), 13.0)
  out = lambda z: np.asarray(_forward(model, z, logsnr, text_embs, text_mask, None))
  assert np.abs(out(noisy) - out(clean)).max() > 0
  model.input_conv.dtype = jnp.bfloat16
  np.testing.assert_array_equal(out(noisy), out(clean))


def test_float32_input_conv_keeps_detail_in_bfloat16_activations():
  """Mechanism of the above: a high-pass (zero-sum) input filter cancels a flat image; in
  float32 the noise it leaves survives the cast of the activations to bfloat16 (relative
  precision, 2^-9), while a bfloat16 convolution sees no noise at all."""
  clean, noisy = _near_clean_pair(1, flat=True)
  conv = layers.Conv(3, 1, 3, pinit=layers.ParamInit(jax.random.key(0)), dtype=jnp.float32)
  laplacian = jnp.array([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
  conv.kernel.set_value(jnp.broadcast_to(laplacian[:, :, None, None], (3, 3, 3, 1)) / 3.0)
  inner = (slice(None), slice(1, -1), slice(1, -1))  # away from the zero padding
  exact = np.asarray(conv(noisy) - conv(clean))[inner]
  kept = np.asarray(conv(noisy).astype(jnp.bfloat16), np.float32) - np.asarray(
    conv(clean).astype(jnp.bfloat16), np.float32
  )
  assert np.corrcoef(kept[inner].ravel(), exact.ravel())[0, 1] > 0.999
  conv.dtype = jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(conv(noisy)), np.asarray(conv(clean)))


def test_film_in_float32_inside_the_norm():
  """FiLM scale/shift are applied in float32 before the one cast to the compute dtype."""
  pinit = layers.ParamInit(jax.random.key(0))
  norm = layers.GroupNorm(8, 2, pinit=pinit, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
  scale = jax.random.normal(jax.random.key(2), (2, 8))
  shift = jax.random.normal(jax.random.key(3), (2, 8))
  y = norm(x, film_scale=scale, film_shift=shift)
  norm.dtype = jnp.float32
  y32 = norm(x) * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y32.astype(jnp.bfloat16)))


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_config_from_dict_round_trips(name):
  preset = PRESETS[name]
  as_dict = dataclasses.asdict(preset)
  assert config_from_dict(as_dict) == preset
  assert config_from_dict(ml_collections.ConfigDict(as_dict)) == preset
  listed = {k: list(v) if isinstance(v, tuple) else v for k, v in as_dict.items()}
  assert config_from_dict(listed) == preset


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match='Unknown U-Net config keys'):
    config_from_dict({**dataclasses.asdict(PRESETS['tiny']), 'dimm': 3})
  with pytest.raises(ValueError, match='num_groups'):
    dataclasses.replace(PRESETS['tiny'], num_groups=5)
  with pytest.raises(ValueError, match='attn_levels'):
    dataclasses.replace(PRESETS['tiny'], attn_levels=(4,))
  levels = len(PRESETS['tiny'].channel_mults)
  for blocks in (0, (0,) + (1,) * (levels - 1)):  # was an AssertionError inside the U-Net
    with pytest.raises(ValueError, match='at least 1 on every level'):
      dataclasses.replace(PRESETS['tiny'], num_res_blocks=blocks)
  # Whole numbers only: a level 0.5 matched no level (self-attention silently gone), and a
  # block count 2.5 was a TypeError at the first step.
  for field, value in (
    ('attn_levels', (0.5,)),
    ('cross_attn_levels', (True,)),
    ('num_res_blocks', (1, 2.5)),
    ('num_res_blocks', 1.0),
  ):
    with pytest.raises(ValueError, match=f'{field}=.* must hold whole numbers'):
      dataclasses.replace(PRESETS['tiny'], **{field: value})
  with pytest.raises(ValueError, match=r'one entry per level \(2 levels'):
    dataclasses.replace(PRESETS['tiny'], num_res_blocks=(1, 1, 1))


def test_one_block_count_in_a_tuple_is_every_level():
  # `--config.model.num_res_blocks=2` on a preset that holds a tuple (the SR presets) reaches
  # the config as (2,): it was refused as 'must be an int'.
  one = dataclasses.replace(PRESETS['tiny'], num_res_blocks=(2,))
  assert one.blocks_per_level() == (2, 2)
  two = dataclasses.replace(PRESETS['tiny'], num_res_blocks=2)
  shapes = [nnx.eval_shape(lambda c=c: UNet(c, rngs=nnx.Rngs(0))) for c in (one, two)]
  assert count_params(shapes[0]) == count_params(shapes[1])


def test_preset_param_counts_from_abstract_shapes():
  counts = {
    name: count_params(nnx.eval_shape(lambda c=c: UNet(c, rngs=nnx.Rngs(0))))
    for name, c in PRESETS.items()
    if name in ('small64', 'base64', 'sr256', 'sr1024')
  }
  assert 1.4e9 < counts['base64'] < 1.8e9
  assert 0.55e9 < counts['sr256'] < 0.85e9
  assert 0.55e9 < counts['sr1024'] < 0.85e9
  assert counts['small64'] < counts['sr1024']


def test_param_init_draws_pieces_without_the_flat_vector_bit_for_bit():
  """Large leaves are drawn from their own threefry counters (no flat vector of all params):
  the values are exactly those of the one flat draw, so checkpoints and runs are unchanged."""
  key = jax.random.fold_in(jax.random.key(3), 7)
  shapes = ((3, 4), (100,), (2, 3, 5), (100,), (7,), (50, 2), (10, 10, 10), (10,))
  stds = tuple(0.5 * (i + 1) for i in range(len(shapes)))
  flat = layers._truncated_normal_pieces(key, shapes, stds, 10**9)  # one flat draw
  split = layers._truncated_normal_pieces(key, shapes, stds, 100)  # small + lax.map per size
  loops = lambda limit: (
    layers._truncated_normal_pieces.lower(key, shapes, stds, limit).as_text().count('while')
  )
  assert loops(100) > loops(10**9)  # the lax.map path really ran (and differs from the flat)
  total = sum(int(np.prod(s)) for s in shapes)
  reference = jax.jit(lambda k: jax.random.truncated_normal(k, -2.0, 2.0, (total,)))(key)
  offset = 0
  for a, b, shape, std in zip(flat, split, shapes, stds, strict=True):
    assert a.shape == b.shape == shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    size = int(np.prod(shape))
    expected = reference[offset : offset + size] * (std * layers._TRUNC_STD_CORRECTION)
    np.testing.assert_array_equal(np.asarray(b), np.asarray(expected.reshape(shape)))
    offset += size


def test_param_init_pieces_under_a_mesh_are_the_same_values():
  """Under jax.set_mesh each device draws a slice of every stack (partitionable threefry); the
  values do not depend on it."""
  from imagen_jax import sharding

  key = jax.random.key(11)
  shapes = ((8, 40), (320,), (4, 4), (16, 20), (7,))
  stds = (1.0, 0.5, 2.0, 0.1, 1.0)
  single = layers._truncated_normal_pieces(key, shapes, stds, 100)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
  with jax.set_mesh(mesh):
    spread = layers._truncated_normal_pieces(key, shapes, stds, 100)
  for a, b in zip(single, spread, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
