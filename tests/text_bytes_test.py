"""Text embeddings reach the train step in bfloat16, trimmed to the run's length bucket, and
the model sees the same values (and gives the same loss) as with float32 full-length ones."""

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import base64
from imagen_jax import optim, sharding, train_lib
from imagen_jax.data import pipeline
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import encoder as encoder_lib

MAX_LENGTH = 64
CAPTIONS = ['a cat', 'a red bus on a bridge at night', 'dog', 'two birds on a wire']


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  encoder = encoder_lib.load_text_encoder('t5-tiny-random', max_length=MAX_LENGTH)
  root = tmp_path_factory.mktemp('emb')
  return cache_lib.build_cache(str(root), CAPTIONS, encoder, dataset_fingerprint='bytes')


@pytest.mark.unit
def test_length_buckets():
  assert [pipeline.text_length_bucket(n, 128) for n in (0, 1, 8, 9, 17, 100, 128)] == [
    8,
    8,
    8,
    16,
    32,
    128,
    128,
  ]
  assert pipeline.text_length_bucket(40, 32) == 32  # capped at text.max_length
  assert pipeline.text_length_bucket(5, 6) == 6


@pytest.mark.unit
def test_trimmed_bf16_lookup_is_the_cache(cache):
  longest = max(len(cache.get(c)) for c in CAPTIONS)
  assert cache.longest_caption == longest < MAX_LENGTH
  length = pipeline.run_text_length(cache)
  assert length == pipeline.text_length_bucket(longest, MAX_LENGTH) < MAX_LENGTH
  embs, mask = pipeline.lookup_text(cache, CAPTIONS, length=length, dtype=ml_dtypes.bfloat16)
  assert embs.shape == (4, length, cache.dim) and embs.dtype == ml_dtypes.bfloat16
  for i, caption in enumerate(CAPTIONS):
    cached = cache.get(caption)  # [n, D] bfloat16
    n = len(cached)
    np.testing.assert_array_equal(mask[i], np.arange(length) < n)
    assert embs[i, :n].tobytes() == np.asarray(cached).tobytes()  # the very bits
    assert not embs[i, n:].astype(np.float32).any()
  full, full_mask = cache.lookup(CAPTIONS)  # [B, max_length, D] float32
  np.testing.assert_array_equal(embs.astype(np.float32), full[:, :length])
  np.testing.assert_array_equal(mask, full_mask[:, :length])
  # Bytes: bf16 halves each value, trimming drops max_length - length padded slots.
  assert embs.nbytes * 2 * MAX_LENGTH == full.nbytes * length


@pytest.mark.smoke
def test_train_step_loss_same_as_float32_full_length(cache):
  config = base64.get_config('tiny')
  config.model.text_dim = cache.dim
  config.text.max_length = MAX_LENGTH
  config.train.batch_size = 4
  tx = optim.make_optimizer(config.optim, 10)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  length = pipeline.run_text_length(cache)
  trimmed = pipeline.lookup_text(cache, CAPTIONS, length=length, dtype=ml_dtypes.bfloat16)
  full = cache.lookup(CAPTIONS)  # float32 [B, 32, D], zero-padded
  with jax.set_mesh(mesh):
    graphdef, state, _ = train_lib.create_train_state(config, tx, mesh)
    step = jax.jit(train_lib.make_train_step(config, graphdef, tx))
    losses = {}
    for name, (embs, mask) in {'trimmed_bf16': trimmed, 'full_f32': full}.items():
      _, metrics = step(state, {'image': image, 'text_embs': embs, 'text_mask': mask})
      losses[name] = float(metrics['loss'])
  # Same input values (the f32 model widens the bf16 exactly) and the extra slots are masked:
  # only the summation order over the longer padded text axis may differ (float32 rounding,
  # ~1e-7 relative); 1e-5 leaves room across CPU models (AVX2 vs AVX-512).
  assert np.isfinite(losses['full_f32'])
  np.testing.assert_allclose(losses['trimmed_bf16'], losses['full_f32'], rtol=1e-5)
