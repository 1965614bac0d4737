"""The digits data source: seeded disjoint split, held-out templates, images, pipeline."""

import hashlib

import ml_collections
import numpy as np
import pytest

from imagen_jax.data import digits, sources

pytestmark = pytest.mark.unit


def data_config(**overrides) -> ml_collections.ConfigDict:
  fields = dict(source='digits', split='train', resolution=16, max_examples=0)
  fields.update(max_skip_fraction=0.01, lowres_resolution=0, random_crop=False)
  fields.update(small_images='skip')
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def test_split_is_disjoint_complete_stratified_and_fixed():
  train, test = digits.split_indices('train'), digits.split_indices('test')
  assert not set(train) & set(test)
  assert sorted(set(train) | set(test)) == list(range(1797))
  _, labels = digits._raw()
  per_class = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
  # Integer counts (~180 per class, one example = 0.0056): a stratified split rounds each class
  # by < 1 example; 0.02 (3-4 examples) allows that, an unstratified split misses by more.
  np.testing.assert_allclose(per_class, digits.TEST_FRACTION, atol=0.02)
  # Pinned: a change of the split must be deliberate (bump DATASET_VERSION).
  assert (len(train), len(test)) == (1438, 359)
  assert test[:6].tolist() == [3, 4, 15, 17, 18, 24]
  assert hashlib.sha256(test.tobytes()).hexdigest()[:16] == '29779e84fa514323'


def test_heldout_templates_never_in_any_source_caption():
  heldout = {digits.caption(c, t) for c in range(10) for t in digits.HELDOUT_TEMPLATES}
  seen = {digits.caption(c, t) for c in range(10) for t in digits.SEEN_TEMPLATES}
  assert len(heldout) == 10 * len(digits.HELDOUT_TEMPLATES)
  assert len(seen) == 10 * len(digits.SEEN_TEMPLATES)
  for split in digits.SPLITS:
    captions = set(digits.DigitsSource(split=split).captions())
    assert not captions & heldout
    assert captions == seen  # every (class, seen template) pair occurs in both splits
  longest = max(len(c) for c in heldout | seen)
  assert longest <= digits.MAX_CAPTION_CHARS


def test_records_images_labels_and_captions_agree():
  source = sources.build_source(data_config(resolution=32))
  assert len(source) == 1438
  record = source[5]
  assert set(record) == {'image', 'caption', 'id', 'label'}
  assert record['image'].shape == (32, 32, 3) and record['image'].dtype == np.uint8
  word = digits.CLASS_NAMES[record['label']]
  assert word in record['caption'] or str(record['label']) in record['caption']
  images, labels = digits.load_split('train', 32)
  np.testing.assert_array_equal(images[5], record['image'])
  assert labels[5] == record['label']
  # White on black with an exactly-black border of R // 8 pixels.
  assert images[:, :4].max() == 0 and images[:, -4:].max() == 0
  assert images.max() == 255 and np.median(images) == 0


def test_fingerprint_ignores_resolution_and_tracks_split_and_subset():
  fp = lambda **kw: sources.build_source(data_config(**kw)).fingerprint()
  assert fp(resolution=16) == fp(resolution=32)
  assert fp(split='train') != fp(split='test')
  assert fp(max_examples=32) != fp()
  assert len(sources.build_source(data_config(max_examples=32))) == 32


def test_bad_split_is_a_clear_error():
  with pytest.raises(sources.DataError, match='data.split'):
    sources.build_source(data_config(split='validation'))


def test_goes_through_the_pipeline_preprocessing():
  from imagen_jax.data import preprocess

  source = sources.build_source(data_config(resolution=16))
  options = preprocess.PreprocessOptions.from_config(data_config(resolution=16))
  image, lowres = preprocess.load_and_preprocess(source[0]['image'], options)
  np.testing.assert_array_equal(image, source[0]['image'])  # same size: no resampling
  assert lowres is None
