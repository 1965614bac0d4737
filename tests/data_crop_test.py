"""Training crops (data.crop_size < data.resolution, sr1024): the aligned image / low-res crop
windows, the batch shapes, the self-attention refusal, the stage configs, and one real train
step on crops."""

import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import sr256, sr1024
from imagen_jax.data import pipeline, preprocess
from imagen_jax.data.preprocess import PreprocessOptions
from imagen_jax.data.sources import DataError
from tests.conftest import FakeEmbeddingCache


def _noise(size, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)


def _lowres_frame(frame: np.ndarray, low: int) -> np.ndarray:
  """What preprocess makes of the whole frame: antialiased bicubic to low x low."""
  return np.asarray(Image.fromarray(frame).resize((low, low), Image.Resampling.BICUBIC))


@pytest.mark.unit
def test_crop_is_an_aligned_window_of_the_frame_and_of_its_lowres():
  frame = _noise(32)  # exactly the resolution: the frame is the whole image
  options = PreprocessOptions(32, lowres_resolution=8, random_crop=True, crop_size=16)
  assert (options.image_size, options.lowres_size) == (16, 4)
  low_frame = _lowres_frame(frame, 8)
  offsets = set()
  for seed in range(12):
    crop, lowres = preprocess.preprocess_image(
      Image.fromarray(frame), options, np.random.default_rng(seed)
    )
    assert crop.shape == (16, 16, 3) and lowres.shape == (4, 4, 3)
    hits = [
      (t, l) for t in range(17) for l in range(17) if (frame[t : t + 16, l : l + 16] == crop).all()
    ]
    assert len(hits) == 1, hits
    top, left = hits[0]
    assert top % 4 == 0 and left % 4 == 0  # whole low-res pixels
    # The low-res crop is the matching window of the low-res whole frame (what sampling sees),
    # not a downsampled crop.
    np.testing.assert_array_equal(
      lowres, low_frame[top // 4 : top // 4 + 4, left // 4 : left // 4 + 4]
    )
    offsets.add((top, left))
  assert len(offsets) > 3  # random positions
  again = preprocess.preprocess_image(Image.fromarray(frame), options, np.random.default_rng(5))
  first = preprocess.preprocess_image(Image.fromarray(frame), options, np.random.default_rng(5))
  np.testing.assert_array_equal(again[0], first[0])  # deterministic per rng


@pytest.mark.unit
def test_centre_crop_without_random_crop_and_no_crop_at_full_size():
  frame = _noise(32, seed=1)
  centre, low = preprocess.preprocess_image(
    Image.fromarray(frame), PreprocessOptions(32, lowres_resolution=8, crop_size=16)
  )
  np.testing.assert_array_equal(centre, frame[8:24, 8:24])
  np.testing.assert_array_equal(low, _lowres_frame(frame, 8)[2:6, 2:6])
  whole, _ = preprocess.preprocess_image(
    Image.fromarray(frame), PreprocessOptions(32, lowres_resolution=8, crop_size=32)
  )
  np.testing.assert_array_equal(whole, frame)  # crop_size == resolution: no crop


@pytest.mark.unit
def test_bad_crop_sizes_are_refused_naming_the_field():
  with pytest.raises(DataError, match=r'data.crop_size must be in \[0, resolution=32\]'):
    PreprocessOptions(32, lowres_resolution=8, crop_size=48)
  with pytest.raises(DataError, match='must be a multiple of resolution / lowres_resolution = 4'):
    PreprocessOptions(32, lowres_resolution=8, crop_size=18)
  with pytest.raises(DataError, match='multiple of data.lowres_resolution=12'):
    PreprocessOptions(32, lowres_resolution=12, crop_size=16)


def _config(folder, **data) -> ml_collections.ConfigDict:
  """sr1024:tiny (tiny_sr U-Net: no self-attention) reading `folder`."""
  c = sr1024.get_config('tiny')
  c.data.source = 'folder'
  c.data.path = str(folder)
  c.data.max_examples = 0
  c.data.prefetch = 0
  c.data.update(data)
  return c


def _smooth(size, seed) -> np.ndarray:
  """A random 5x5 pattern upsampled to size x size: structure at the low-res scale."""
  coarse = Image.fromarray(_noise(5, seed))
  return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))


def _folder(root, n=6, size=40):
  root.mkdir()
  for i in range(n):
    Image.fromarray(_smooth(size, seed=i)).save(root / f'{i}.png')
    (root / f'{i}.txt').write_text(f'noise picture {i}')
  return root


@pytest.mark.unit
def test_crop_batches_match_batch_spec(tmp_path):
  config = _config(_folder(tmp_path / 'noise'))
  assert (config.data.resolution, config.data.lowres_resolution) == (32, 8)
  assert config.data.crop_size == 16
  cache = FakeEmbeddingCache(int(config.text.max_length), int(config.model.text_dim))
  it = pipeline.make_iterator(config, text_cache=cache)
  batch = next(it)
  spec = pipeline.batch_spec(config, int(config.train.batch_size))
  assert spec['image'][0] == (4, 16, 16, 3) and spec['lowres'][0] == (4, 4, 4, 3)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
  # Each low-res crop shows the same place as its image crop: close to the downsampled crop
  # (they differ only by the filter's reach past the crop's edge), far from the others'.
  image = np.round((batch['image'] + 1) * 127.5).astype(np.uint8)
  down = np.stack([_lowres_frame(x, 4) for x in image]).astype(float)
  low = np.round((batch['lowres'] + 1) * 127.5)
  matched = np.abs(down - low).mean()
  mismatched = np.abs(down - np.roll(low, 1, axis=0)).mean()
  assert matched < mismatched / 3, (matched, mismatched)


@pytest.mark.unit
def test_crops_refused_for_a_unet_with_self_attention(tmp_path):
  config = _config(_folder(tmp_path / 'noise', n=2))
  config.model.attn_levels = (1,)
  with pytest.raises(DataError) as error:
    pipeline.check_crops(config)
  message = str(error.value)
  assert '\n' not in message and 'model.attn_levels=(1,)' in message
  assert '--config.data.crop_size=0' in message
  with pytest.raises(DataError, match='self-attention'):
    pipeline.make_iterator(config, text_cache=FakeEmbeddingCache())
  config.data.crop_size = 0  # whole images: fine with self-attention
  assert not pipeline.check_crops(config).crops
  config.model.attn_levels = ()
  config.model.channel_mults = (1, 2, 4, 8)
  config.data.crop_size = 4
  with pytest.raises(DataError, match='multiple of 8, the downsampling factor'):
    pipeline.check_crops(config)


@pytest.mark.unit
def test_stage_configs_crop_where_the_unet_allows():
  full_1024, full_256 = sr1024.get_config(''), sr256.get_config('')
  assert (full_1024.data.resolution, full_1024.data.crop_size) == (1024, 256)
  assert pipeline.check_crops(full_1024).crops and full_1024.model.attn_levels == ()
  spec = pipeline.batch_spec(full_1024, 8)
  assert spec['image'][0] == (8, 256, 256, 3) and spec['lowres'][0] == (8, 64, 64, 3)
  assert full_256.data.crop_size == 0 and full_256.model.attn_levels == (3,)
  assert pipeline.batch_spec(full_256, 8)['image'][0] == (8, 256, 256, 3)
  full_256.data.crop_size = 128
  with pytest.raises(DataError, match='self-attention'):
    pipeline.check_crops(full_256)


@pytest.mark.smoke
def test_one_train_step_on_crops(tmp_path):
  """The real train step on a pipeline batch of crops: the U-Net, the low-res upsampling and
  the loss take the crop size from the batch; the schedule stays at data.resolution."""
  import jax
  import jax.numpy as jnp

  from imagen_jax import optim, sharding, train_lib

  config = _config(_folder(tmp_path / 'noise'))
  config.mesh.data = 1
  cache = FakeEmbeddingCache(int(config.text.max_length), int(config.model.text_dim))
  batch = next(pipeline.make_iterator(config, text_cache=cache))
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx = optim.make_optimizer(config.optim, int(config.train.num_steps))
  with jax.set_mesh(mesh):
    graphdef, state, _ = train_lib.create_train_state(config, tx, mesh)
    new_state, metrics = jax.jit(train_lib.make_train_step(config, graphdef, tx))(
      state, {k: jnp.asarray(v) for k, v in batch.items()}
    )
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  assert int(new_state['step']) == 1


@pytest.mark.unit
def test_crop_of_an_upsampled_small_image(tmp_path):
  """small_images='upsample' makes the frame first, then crops it."""
  data = io.BytesIO()
  Image.fromarray(_noise(20)).save(data, format='PNG')
  options = PreprocessOptions(
    32, lowres_resolution=8, random_crop=True, small_images='upsample', crop_size=16
  )
  crop, low = preprocess.load_and_preprocess(data.getvalue(), options, np.random.default_rng(0))
  assert crop.shape == (16, 16, 3) and low.shape == (4, 4, 3)
  with pytest.raises(preprocess.ImageTooSmall):
    preprocess.load_and_preprocess(
      data.getvalue(), PreprocessOptions(32, crop_size=16), np.random.default_rng(0)
    )
