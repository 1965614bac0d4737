"""Attention over a prefix of the keys (key/value lengths, what cuDNN's fused kernel takes)
against a masked reference, the per-backend implementation plan, and the U-Net's text prefix.

Tolerances: the reference is a float64 NumPy softmax attention. The float32 path rounds the
logits, the softmax and a sum over at most S = 40 values, each to float32 (eps 1.2e-7), with
O(1) inputs: errors stay well below 1e-5 (and the DESIGN notes that 1e-6 can fail across CPU
models). The bfloat16 path rounds q/k/v and the probabilities to bfloat16 (eps 7.8e-3): 3e-2.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.models import PRESETS, UNet, cpu_attention, layers

pytestmark = pytest.mark.unit


def _reference(q, k, v, mask):
  """float64 softmax(q k^T / sqrt(D)) v with mask [B, S] (True = attend)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bhts,bshd->bthd', probs, v)


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_lengths_equal_masked_reference(dtype, tol):
  b, t, s, h, d = 3, 16, 40, 2, 8
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (b, t, h, d)).astype(dtype)
  k = jax.random.normal(kk, (b, s, h, d)).astype(dtype)
  v = jax.random.normal(kv, (b, s, h, d)).astype(dtype)
  lengths = jnp.array([1, 17, s], jnp.int32)
  mask = np.arange(s)[None, :] < np.asarray(lengths)[:, None]
  with layers.record_attention_plans() as plans:
    out = jax.jit(lambda *a: layers.attention(*a, name='probe'))(q, k, v, lengths)
  assert out.dtype == dtype and out.shape == q.shape
  expected = _reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=tol, rtol=0)
  # The keys past each length are ignored: garbage there changes nothing.
  k2 = jnp.where(jnp.asarray(mask)[:, :, None, None], k, 1e3)
  v2 = jnp.where(jnp.asarray(mask)[:, :, None, None], v, -1e3)
  np.testing.assert_array_equal(
    np.asarray(layers.attention(q, k2, v2, lengths), np.float32), np.asarray(out, np.float32)
  )
  # Traced once, logged once, with the implementation this backend gets.
  assert [p['name'] for p in plans] == ['probe']
  assert plans[0]['implementation'] == layers.attention_plan(q, k)[0]


def test_self_attention_with_text_matches_concatenated_mask():
  """Pixels then the valid text prefix as keys (kv length N + text length)."""
  ch, nh, hd, width, b, hw, length = 16, 2, 8, 12, 2, 4, 5
  pinit = layers.ParamInit(jax.random.key(0))
  attn = layers.SelfAttention(
    ch, num_heads=nh, head_dim=hd, num_groups=4, text_width=width, pinit=pinit
  )
  pinit.finalize()
  rng = np.random.default_rng(0)
  for _, p in nnx.iter_graph(attn):
    if isinstance(p, nnx.Param):  # nonzero everywhere (the output projection is zero-init)
      p.set_value(jnp.asarray(0.3 * rng.standard_normal(p.shape), jnp.float32))
  x = jnp.asarray(rng.standard_normal((b, hw, hw, ch)), jnp.float32)
  tokens = jnp.asarray(rng.standard_normal((b, length, width)), jnp.float32)
  text_lengths = jnp.array([2, 5], jnp.int32)
  out = attn(x, tokens, text_lengths)

  n = hw * hw
  qkv = attn.qkv(attn.norm(x).reshape(b, n, ch)).reshape(b, n, 3, nh, hd)
  text_kv = attn.text_kv(tokens).reshape(b, length, 2, nh, hd)
  k = np.concatenate([qkv[:, :, 1], text_kv[:, :, 0]], axis=1)
  v = np.concatenate([qkv[:, :, 2], text_kv[:, :, 1]], axis=1)
  mask = np.concatenate(
    [np.ones((b, n), bool), np.arange(length)[None, :] < np.asarray(text_lengths)[:, None]], 1
  )
  y = _reference(qkv[:, :, 0], k, v, mask).reshape(b, n, nh * hd)
  expected = np.asarray(x) + np.asarray(attn.out(jnp.asarray(y, jnp.float32))).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


def _perturbed_tiny(config):
  abstract = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


@nnx.jit
def _forward(model, x, logsnr, text_embs, text_mask):
  return model(x, logsnr, text_embs, text_mask)


def test_unet_any_mask_equals_its_prefix_form():
  """A non-prefix text mask gives the output of its valid tokens moved to the front: the
  model's stable sort makes every mask a prefix, and attention ignores key order."""
  config = PRESETS['tiny']
  model = _perturbed_tiny(config)
  k = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(k[0], (2, 8, 8, 3))
  logsnr = jnp.array([-2.0, 3.0])
  embs = jax.random.normal(k[1], (2, 6, config.text_dim))
  holes = jnp.array([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1]], bool)
  order = jnp.argsort(~holes, axis=1, stable=True)
  packed_embs = jnp.take_along_axis(embs, order[:, :, None], axis=1)
  packed_mask = jnp.take_along_axis(holes, order, axis=1)
  assert packed_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
  out_holes = _forward(model, x, logsnr, embs, holes)
  out_packed = _forward(model, x, logsnr, packed_embs, packed_mask)
  np.testing.assert_allclose(np.asarray(out_holes), np.asarray(out_packed), atol=1e-5, rtol=0)
  assert float(jnp.abs(out_packed).max()) > 0.1  # a real output, not zeros


def _preset_attention_shapes(name: str, resolution: int, text_len: int = 128) -> list[dict]:
  """Every attention call of a bfloat16 preset, traced abstractly (nothing allocated)."""
  config = dataclasses.replace(PRESETS[name], dtype='bfloat16')
  b = 2

  def run():
    model = UNet(config, rngs=nnx.Rngs(0))
    x = jnp.zeros((b, resolution, resolution, config.image_channels))
    extra = dict(lowres=x, aug_level=jnp.zeros((b,))) if config.lowres_cond else {}
    mask = jnp.ones((b, text_len), bool)
    return model(x, jnp.zeros((b,)), jnp.zeros((b, text_len, config.text_dim)), mask, **extra)

  with layers.record_attention_plans() as plans:
    jax.eval_shape(run)
  return plans


@pytest.mark.parametrize(
  'name, resolution', [('small64', 64), ('base64', 64), ('sr256', 256), ('sr1024', 1024)]
)
def test_every_preset_attention_is_fused_on_cuda(name, resolution):
  """On a CUDA GPU in bfloat16, every self- and cross-attention of every preset gets cuDNN
  (Hopper's head-dim limit 256 and Ampere's 128); only the single-query text pooling uses XLA.
  On this CPU backend, calls whose float32 logits exceed one cache-sized block are 'blocked'."""
  plans = _preset_attention_shapes(name, resolution)
  pixel_attention = [p for p in plans if p['name'] != 'text_pool']
  assert pixel_attention and len(plans) == len(pixel_attention) + 1
  for limit in (256, 128):
    for p in plans:
      impl, reason = layers.plan_attention(
        backend='gpu',
        cuda=True,
        dtype=p['dtype'],
        q_len=p['q'][1],
        head_dim=p['q'][3],
        head_dim_limit=limit,
      )
      expected = 'xla' if p['name'] == 'text_pool' else 'cudnn'
      assert impl == expected, (name, p, reason)
  if jax.default_backend() == 'cpu':
    for p in plans:
      (b, t, h, _), s = p['q'], p['k'][1]
      big = 4 * b * h * t * s > cpu_attention.DEFAULT_BLOCK_BYTES and t > 1
      assert p['implementation'] == ('blocked' if big else 'xla'), p


def test_plan_reasons():
  plan = lambda **kw: layers.plan_attention(
    **{
      'backend': 'gpu',
      'cuda': True,
      'dtype': jnp.bfloat16,
      'q_len': 64,
      'head_dim': 64,
      'head_dim_limit': 128,
      **kw,
    }
  )
  assert plan()[0] == 'cudnn'
  assert plan(dtype=jnp.float32) == (
    'xla',
    'float32: cuDNN flash attention needs bfloat16 or float16',
  )
  assert plan(head_dim=160)[0] == 'xla' and plan(head_dim=160, head_dim_limit=256)[0] == 'cudnn'
  assert plan(head_dim=36)[0] == 'xla'
  assert plan(cuda=False)[0] == 'xla'
  assert plan(backend='cpu')[0] == 'blocked' and plan(backend='cpu', q_len=1)[0] == 'xla'
  # CPU: blocked only where the float32 logits exceed one 16 MB block (small64's 32x32 level).
  cpu = lambda b_h, t, s: plan(backend='cpu', batch_heads=b_h, q_len=t, kv_len=s)[0]
  assert (
    cpu(16, 1024, 1056) == 'blocked' and cpu(16, 1024, 32) == 'xla' and cpu(16, 256, 288) == 'xla'
  )
