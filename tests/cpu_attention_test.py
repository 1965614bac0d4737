"""The CPU attention path (`imagen_jax.models.cpu_attention`) against jax's reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.models import cpu_attention


def _inputs(b, t, s, h, d, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (
    jax.random.normal(kk, shape, jnp.float32).astype(dtype)
    for kk, shape in zip(ks[:3], [(b, t, h, d), (b, s, h, d), (b, s, h, d)], strict=True)
  )
  d_out = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
  return q, k, v, d_out


def _reference(q, k, v, lengths):
  return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation='xla')


def _value_and_grads(fn, q, k, v, d_out):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * d_out)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize(
  'b,t,s,lengths,block_bytes',
  [
    (3, 64, 64 + 8, [72, 65, 64], 1 << 10),  # self-attention over pixels + a text prefix
    (2, 48, 12, [1, 12], 1 << 10),  # cross-attention; one caption dropped (null token only)
    (2, 36, 20, None, 1 << 30),  # no lengths, one block
    (1, 21, 9, [4], 3 * 4 * 2 * 9 * 4),  # 21 queries: blocks of 3 (7 blocks)
    # Length 0 (jax: uniform weights over all keys); the U-Net never gives it, but the function
    # promises jax's result, gradients included (they were S times too large here).
    (2, 16, 5, [0, 5], 1 << 10),
  ],
)
def test_matches_reference_forward_and_gradients(b, t, s, lengths, block_bytes):
  h, d = 2, 8
  q, k, v, d_out = _inputs(b, t, s, h, d)
  lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  got = jax.jit(
    lambda q, k, v: cpu_attention.blocked_attention(q, k, v, lengths, block_bytes=block_bytes)
  )(q, k, v)
  want = _reference(q, k, v, lengths)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got_loss, got_grads = _value_and_grads(
    lambda q, k, v: cpu_attention.blocked_attention(q, k, v, lengths, block_bytes=block_bytes),
    q,
    k,
    v,
    d_out,
  )
  want_loss, want_grads = _value_and_grads(
    lambda q, k, v: _reference(q, k, v, lengths), q, k, v, d_out
  )
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-4)
  for g, w in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))
  if lengths is not None:  # keys past each example's length get no gradient at all
    _, dk, dv = got_grads
    for i, n in enumerate(np.asarray(lengths)):
      if n > 0:
        assert not np.any(np.asarray(dk[i, n:])) and not np.any(np.asarray(dv[i, n:]))


def test_keys_past_the_length_do_not_matter():
  q, k, v, _ = _inputs(2, 16, 10, 2, 8)
  lengths = jnp.asarray([3, 7], jnp.int32)
  base = cpu_attention.blocked_attention(q, k, v, lengths, block_bytes=1 << 9)
  noise = jax.random.normal(jax.random.key(5), k.shape) * 100
  past = (jnp.arange(10)[None, :] >= lengths[:, None])[:, :, None, None]
  moved = cpu_attention.blocked_attention(
    q, jnp.where(past, k + noise, k), jnp.where(past, v - noise, v), lengths, block_bytes=1 << 9
  )
  np.testing.assert_array_equal(base, moved)


def test_bfloat16_inputs_follow_the_reference():
  q, k, v, d_out = _inputs(2, 32, 24, 2, 16, dtype=jnp.bfloat16)
  lengths = jnp.asarray([24, 5], jnp.int32)
  got = cpu_attention.blocked_attention(q, k, v, lengths, block_bytes=1 << 10)
  assert got.dtype == jnp.bfloat16
  want = _reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), lengths)
  # bf16 output rounding (8 bits of mantissa) bounds the difference.
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)
  _, grads = _value_and_grads(
    lambda q, k, v: cpu_attention.blocked_attention(q, k, v, lengths, block_bytes=1 << 10),
    q,
    k,
    v,
    d_out,
  )
  assert all(g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_query_blocks():
  # 4 x 4 heads x 1056 keys x 4 bytes = 67,584 bytes per query row: 16 MB holds 248 rows.
  assert cpu_attention.query_blocks(4, 1024, 1056, 4, 16 << 20) == 8
  assert cpu_attention.query_blocks(4, 256, 288, 4, 16 << 20) == 1
  assert cpu_attention.query_blocks(1, 7, 10, 1, 1) == 7  # nothing fits: one query per block
  assert cpu_attention.query_blocks(1, 21, 9, 1, 3 * 36) == 7
