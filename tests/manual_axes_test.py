"""The U-Net and its CPU custom-VJP kernels differentiated inside a user's `jax.shard_map`
(batch split over 2 devices): the same gradients as without it (`models.manual_axes`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from imagen_jax.models import PRESETS, UNet, cpu_attention, cpu_conv, cpu_norm
from imagen_jax.models.manual_axes import match_varying

pytestmark = pytest.mark.unit

SHARDS = 2


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:SHARDS]), ('data',))


def _grads_both_ways(loss_sum, replicated, batched, count):
  """Gradients of sum-loss / count w.r.t. `replicated` (a pytree), computed plainly and inside
  shard_map with `batched` (a tuple of arrays) split over the batch axis. Under shard_map the
  replicated inputs' cotangents come back summed over the shards (JAX's transpose of the
  implicit broadcast), so each shard's loss is its own sum / the global count."""

  def loss(rep, *bat):
    return loss_sum(rep, *bat) / count

  plain = jax.jit(jax.grad(loss))(replicated, *batched)
  sharded_fn = jax.shard_map(
    jax.grad(loss),
    mesh=_mesh(),
    in_specs=(P(),) + (P('data'),) * len(batched),
    out_specs=P(),
  )
  sharded = jax.jit(sharded_fn)(replicated, *batched)
  return plain, sharded


def _assert_close(got, want):
  leaves = jax.tree.leaves(want)
  assert max(float(jnp.max(jnp.abs(w))) for w in leaves) > 0  # gradients there to compare
  for g, w in zip(jax.tree.leaves(got), leaves, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_unet_gradients_inside_shard_map_match():
  config = PRESETS['tiny']
  graphdef, params = nnx.split(UNet(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)  # nonzero everywhere (the output conv starts at zero)
  params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), params)
  b, res, length = 4, 8, 6
  x = jax.random.normal(jax.random.key(1), (b, res, res, 3))
  logsnr = jnp.linspace(-3.0, 3.0, b)
  text = jax.random.normal(jax.random.key(2), (b, length, config.text_dim))
  text_mask = jnp.ones((b, length), bool).at[1, 3:].set(False)

  def loss_sum(p, x, logsnr, text, text_mask):
    return jnp.sum(nnx.merge(graphdef, p)(x, logsnr, text, text_mask) ** 2)

  plain, sharded = _grads_both_ways(loss_sum, params, (x, logsnr, text, text_mask), x.size)
  _assert_close(sharded, plain)


def test_cpu_kernels_inside_shard_map_match():
  ks = jax.random.split(jax.random.key(3), 8)
  b = 4
  # attention: several query blocks (tiny block_bytes), a key prefix per example
  q = jax.random.normal(ks[0], (b, 16, 2, 8))
  k = jax.random.normal(ks[1], (b, 12, 2, 8))
  v = jax.random.normal(ks[2], (b, 12, 2, 8))
  lengths = jnp.asarray([12, 5, 9, 1], jnp.int32)
  wq = jax.random.normal(ks[3], (8, 8))  # a replicated weight in front of the attention

  def attention_sum(w, q, k, v, lengths):
    out = cpu_attention.blocked_attention(q @ w, k, v, lengths, block_bytes=1 << 9)
    return jnp.sum(out**2)

  plain, sharded = _grads_both_ways(attention_sum, wq, (q, k, v, lengths), q.size)
  _assert_close(sharded, plain)

  # convolution, image pairs side by side (each shard folds its own pairs)
  x = jax.random.normal(ks[4], (b, 6, 6, 4))
  kernel = jax.random.normal(ks[5], (3, 3, 4, 5))
  plain, sharded = _grads_both_ways(
    lambda kern, x: jnp.sum(cpu_conv.fold_both(x, kern) ** 2), kernel, (x,), x.size
  )
  _assert_close(sharded, plain)

  # GroupNorm with FiLM and SiLU: replicated scale and bias, per-example FiLM
  h = jax.random.normal(ks[6], (b, 4, 4, 8))
  film = jax.random.normal(ks[7], (2, b, 8))
  norm_params = (jnp.linspace(0.5, 1.5, 8), jnp.linspace(-0.2, 0.2, 8))

  def norm_sum(sb, h, film):
    y = cpu_norm.group_norm(
      h, *sb, groups=2, eps=1e-5, film_scale=film[0], film_shift=film[1], silu=True
    )
    return jnp.sum(y**2)

  film = jnp.moveaxis(film, 1, 0)  # batch first, to split it

  plain, sharded = _grads_both_ways(
    lambda sb, h, f: norm_sum(sb, h, jnp.moveaxis(f, 0, 1)), norm_params, (h, film), h.size
  )
  _assert_close(sharded, plain)


def test_match_varying_outside_shard_map_is_the_identity():
  x, w = jnp.ones((2, 3)), jnp.zeros(3)
  got = match_varying(x, None, w)
  assert got[0] is x and got[1] is None and got[2] is w
