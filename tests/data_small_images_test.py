"""Too-small images (data.small_images='skip'): sizes known without decoding (metadata, file
headers, json sidecars), dropped when listed with one log line of the counts; the others
refused from their header when decoded and counted apart. Neither counts toward
data.max_skip_fraction; the run stops only when no example is left."""

import io
import json
import logging
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import pipeline, sizes, sources, webdataset
from imagen_jax.data.sources import DataError
from tests.conftest import FakeEmbeddingCache, pipeline_config


def _encode(size, colour, fmt='PNG') -> bytes:
  buf = io.BytesIO()
  Image.new('RGB', size, colour).save(buf, format=fmt)
  return buf.getvalue()


def _config(path, source='folder', **data) -> ml_collections.ConfigDict:
  return pipeline_config(path, batch_size=2, source=source, **{'resolution': 16, **data})


def _iterator(config):
  source = sources.build_source(config.data)
  return pipeline.make_iterator(config, text_cache=FakeEmbeddingCache(), source=source)


def _mostly_small_folder(root, large=3, small=30):
  """`large` 16x24 images (red = 50 * i + 50) and `small` 6x9 ones: a typical web mix."""
  root.mkdir()
  for i in range(large):
    (root / f'large{i}.png').write_bytes(_encode((16, 24), (50 * i + 50, 0, 0)))
    (root / f'large{i}.txt').write_text(f'large picture {i}')
  for i in range(small):
    (root / f'small{i:02d}.png').write_bytes(_encode((6, 9), (0, 0, 255)))
    (root / f'small{i:02d}.txt').write_text(f'small picture {i}')
  return root


def _reds(batch) -> set[int]:
  return set(np.round((batch['image'][:, 0, 0, 0] + 1) * 127.5).astype(int).tolist())


def _shard(path, items) -> None:
  """items: (key, {ext: bytes}) as img2dataset writes key.png / key.txt / key.json."""
  with tarfile.open(path, 'w') as tar:
    for key, members in items:
      for ext, data in members.items():
        info = tarfile.TarInfo(f'{key}.{ext}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.mark.unit
def test_sizes_from_headers_and_fields(tmp_path):
  (tmp_path / 'a.jpg').write_bytes(_encode((33, 17), (1, 2, 3), 'JPEG'))
  assert sizes.read_size(tmp_path / 'a.jpg') == (33, 17)
  assert sizes.read_size(_encode((5, 7), (0, 0, 0))) == (5, 7)
  assert sizes.read_size(b'not an image') is None and sizes.read_size(tmp_path / 'none') is None
  assert sizes.size_from_fields({'WIDTH': '640', 'Height': 480, 'x': 1}) == (640, 480)
  assert sizes.size_from_fields({'width': 640}) is None
  assert sizes.size_from_fields({'width': 0, 'height': 5}) is None
  assert sizes.size_from_fields({'width': None, 'height': 5}) is None


@pytest.mark.unit
def test_filter_counts_and_log_line():
  result = sizes.filter_small(
    np.array([[20, 30], [10, 40], [0, 0], [64, 64], [5, 100]]), min_side=16
  )
  np.testing.assert_array_equal(result.kept, [0, 2, 3])
  assert (result.total, result.small, result.unknown) == (5, 2, 1)
  assert result.message('web').startswith(
    'web: kept 3 of 5 images; 2 smaller than 16 px skipped (data.small_images=upsample keeps '
    'them); 1 without a size in the metadata are checked when decoded'
  )


@pytest.mark.unit
def test_folder_sizes_from_metadata_first_then_headers(tmp_path):
  rows = [
    {'file_name': 'a.png', 'text': 'a', 'width': 4, 'height': 4},  # the metadata is believed
    {'file_name': 'b.png', 'text': 'b'},
    {'file_name': 'c.png', 'text': 'c'},
  ]
  (tmp_path / 'a.png').write_bytes(_encode((20, 20), (0, 0, 0)))
  (tmp_path / 'b.png').write_bytes(_encode((12, 30), (0, 0, 0)))
  (tmp_path / 'c.png').write_bytes(b'broken')
  (tmp_path / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  source = sources.build_source(_config(tmp_path).data)
  np.testing.assert_array_equal(source.image_sizes(), [[4, 4], [12, 30], [0, 0]])


@pytest.mark.unit
def test_mostly_small_dataset_trains_within_a_one_percent_skip_limit(tmp_path, caplog):
  config = _config(_mostly_small_folder(tmp_path / 'web'))  # max_skip_fraction 1 %
  with caplog.at_level(logging.INFO, logger='imagen_jax.data.pipeline'):
    it = _iterator(config)
    seen = set()
    for _ in range(6):  # 4 epochs of the 3 large images
      seen |= _reds(next(it))
  assert 'kept 3 of 33 images; 30 smaller than 16 px skipped' in caplog.text
  assert 'data.small_images=upsample keeps them' in caplog.text
  assert seen == {50, 100, 150}  # only the large images
  assert (it.num_seen, it.num_skipped, it.num_small) == (12, 0, 0)
  # 'upsample' keeps them all (no filter, no count).
  upsampled = _iterator(_config(tmp_path / 'web', small_images='upsample'))
  for _ in range(17):
    next(upsampled)
  assert upsampled.num_seen == 34 and upsampled.num_skipped == 0


@pytest.mark.unit
def test_sizes_found_when_decoded_are_counted_apart_from_broken_files(tmp_path, caplog):
  """Webdataset shards without json sidecars: sizes unknown until decoded."""
  items = [
    (f'l{i}', {'png': _encode((16, 16), (50 * i + 50, 0, 0)), 'txt': b'large'}) for i in range(3)
  ]
  items += [(f's{i:02d}', {'png': _encode((8, 8), (0, 0, 9)), 'txt': b'small'}) for i in range(26)]
  items += [('broken', {'png': b'\x89PNG broken', 'txt': b'broken'})]
  (tmp_path / 'shards').mkdir()
  _shard(tmp_path / 'shards' / '00000.tar', items)
  config = _config(tmp_path / 'shards', source='webdataset', max_skip_fraction=0.5)
  assert not sources.build_source(config.data).image_sizes().any()  # nothing known
  with caplog.at_level(logging.INFO, logger='imagen_jax.data.pipeline'):
    it = _iterator(config)
    seen = set()
    while it.num_seen < 60:  # two epochs
      seen |= _reds(next(it))
  assert seen == {50, 100, 150}
  epochs = it.num_seen / 30
  assert it.num_skipped <= int(epochs) + 1 and it.num_skipped >= int(epochs)  # broken only
  assert 26 * int(epochs) <= it.num_small <= 26 * (int(epochs) + 1)
  assert 'first epoch: 26 of 30 examples were smaller than 16 px' in caplog.text
  warned = {r.getMessage().split(': ')[1] for r in caplog.records if r.levelno == logging.WARNING}
  assert warned == {'skipping 00000.tar/broken'}  # too-small images are no warnings
  # The broken file is 1 of 4 usable (25 %): over a 20 % limit, and the message says so.
  strict = _iterator(_config(tmp_path / 'shards', source='webdataset', max_skip_fraction=0.2))
  with pytest.raises(DataError, match=r'1 of 4 examples seen \(besides 26 too small\)'):
    for _ in range(40):
      next(strict)
  # The count is part of the iterator state and comes back with it.
  state = json.loads(json.dumps(it.get_state()))
  resumed = _iterator(config)
  resumed.set_state(state)
  assert (resumed.num_seen, resumed.num_small) == (it.num_seen, it.num_small)
  np.testing.assert_array_equal(next(resumed)['image'], next(it)['image'])
  del state['num_small']  # a state saved before the field
  resumed.set_state(state)
  assert resumed.num_small == 0


@pytest.mark.unit
def test_no_example_left_is_a_clear_error(tmp_path):
  root = tmp_path / 'folder'
  root.mkdir()
  for i in range(3):
    (root / f'{i}.png').write_bytes(_encode((8, 8), (0, 0, 0)))
    (root / f'{i}.txt').write_text(f'small {i}')
  with pytest.raises(DataError, match=r'all 3 images are smaller than data.resolution=16 px'):
    _iterator(_config(root))
  (tmp_path / 'shards').mkdir()
  _shard(
    tmp_path / 'shards' / '0.tar',
    [(f'k{i}', {'png': _encode((8, 8), (0, 0, 0)), 'txt': b'small'}) for i in range(3)],
  )
  it = _iterator(_config(tmp_path / 'shards', source='webdataset'))
  with pytest.raises(DataError, match='no usable example in a whole epoch of 3: 3 smaller'):
    next(it)


@pytest.mark.unit
def test_all_too_small_is_refused_before_the_captions_are_encoded(tmp_path, monkeypatch):
  # The refusal came from the iterator, after every caption was T5-encoded into the cache.
  from configs import base64
  from imagen_jax import precompute, train_lib

  root = tmp_path / 'folder'
  root.mkdir()
  for i in range(3):
    (root / f'{i}.png').write_bytes(_encode((8, 8), (0, 0, 0)))
    (root / f'{i}.txt').write_text(f'small {i}')
  config = base64.get_config('tiny')
  config.data.source, config.data.path, config.data.resolution = 'folder', str(root), 16
  config.train.batch_size = 8  # the test process's 8 CPU devices
  monkeypatch.setattr(
    precompute, 'open_or_build_cache', lambda *a, **k: pytest.fail('the cache was opened')
  )
  with pytest.raises(DataError, match=r'all 3 images are smaller than data.resolution=16 px'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.unit
def test_exactly_max_skip_fraction_unusable_trains(tmp_path):
  # 29 of 100 at data.max_skip_fraction=0.29 is not more than it; 0.29 * 100 is
  # 28.999999999999996 in floats, which stopped the run at the 29th skip.
  (tmp_path / 'shards').mkdir()
  good = _encode((16, 16), (200, 0, 0))
  items = [
    (f'k{i:03d}', {'png': b'broken' if i < 29 else good, 'txt': f'c{i}'.encode()})
    for i in range(100)
  ]
  _shard(tmp_path / 'shards' / '0.tar', items)
  it = _iterator(_config(tmp_path / 'shards', source='webdataset', max_skip_fraction=0.29))
  for _ in range(36):  # the 36th batch takes the epoch's 71st usable example: all 100 read
    next(it)
  assert it.num_seen > 100 and it.num_skipped >= 29


@pytest.mark.unit
def test_no_example_left_names_the_fix_for_its_cause(tmp_path):
  # Only unreadable files used to get the small-image advice (larger images, upsample).
  (tmp_path / 'broken').mkdir()
  _shard(tmp_path / 'broken' / '0.tar', [('k0', {'png': b'not a png', 'txt': b'broken'})])
  with pytest.raises(DataError) as e:
    next(_iterator(_config(tmp_path / 'broken', source='webdataset')))
  assert '0 smaller than data.resolution=16 px, 1 unreadable' in str(e.value)
  assert str(e.value).endswith('Replace or remove the unreadable files (logged above).')
  (tmp_path / 'both').mkdir()
  _shard(
    tmp_path / 'both' / '0.tar',
    [
      ('k0', {'png': b'not a png', 'txt': b'broken'}),
      ('k1', {'png': _encode((8, 8), 0), 'txt': b's'}),
    ],
  )
  config = _config(tmp_path / 'both', source='webdataset', max_skip_fraction=1.0)
  with pytest.raises(DataError, match='unreadable files .*; use larger images, or keep small'):
    next(_iterator(config))


@pytest.mark.unit
def test_webdataset_json_sidecar_sizes_filter_when_listed(tmp_path, caplog):
  def pair(key, size, colour):
    meta = {'caption': key, 'width': size[0], 'height': size[1], 'original_width': 999}
    return key, {'jpg': _encode(size, colour, 'JPEG'), 'json': json.dumps(meta).encode()}

  (tmp_path / 'shards').mkdir()
  items = [pair(f'big{i}', (20, 16), (200, 0, 0)) for i in range(2)]
  items += [pair(f'small{i}', (12, 40), (0, 200, 0)) for i in range(5)]
  _shard(tmp_path / 'shards' / '00000.tar', items)
  index = webdataset.index_tar(tmp_path / 'shards' / '00000.tar')
  assert index['widths'] == [20, 20, 12, 12, 12, 12, 12] and index['heights'][0] == 16
  config = _config(tmp_path / 'shards', source='webdataset')
  with caplog.at_level(logging.INFO, logger='imagen_jax.data.pipeline'):
    it = _iterator(config)
    batches = [next(it) for _ in range(3)]
  assert 'kept 2 of 7 images; 5 smaller than 16 px skipped' in caplog.text
  assert all((np.round((b['image'][..., 0] + 1) * 127.5) > 150).all() for b in batches)
  assert it.num_small == 0 and it.num_skipped == 0


@pytest.mark.unit
def test_array_record_sizes_from_the_image_headers(tmp_path):
  from array_record.python import array_record_module

  root = tmp_path / 'records'
  root.mkdir()
  writer = array_record_module.ArrayRecordWriter(str(root / 'a.array_record'), 'group_size:1')
  for i, size in enumerate([(20, 18), (7, 30), (16, 16)]):
    writer.write(webdataset.example_bytes({'image': _encode(size, (9, 9, 9)), 'text': f'p {i}'}))
  writer.close()
  source = sources.build_source(_config(root, source='arrayrecord').data)
  np.testing.assert_array_equal(source.image_sizes(), [[20, 18], [7, 30], [16, 16]])
  it = pipeline.make_iterator(
    _config(root, source='arrayrecord'), text_cache=FakeEmbeddingCache(), source=source
  )
  next(it)
  assert it.num_small == 0 and it.num_seen == 2  # p 1 was dropped when listed


@pytest.mark.smoke
def test_hf_width_height_columns(tmp_path):
  datasets = pytest.importorskip('datasets')
  shapes = [(20, 20), (8, 30), (40, 17), (5, 5)]
  ds = datasets.Dataset.from_dict(
    {
      'image': [Image.new('RGB', s, (0, 0, 0)) for s in shapes],
      'text': ['a', '', 'c', 'd'],  # row 1 has no caption: the sizes follow the kept rows
      'WIDTH': [s[0] for s in shapes],
      'HEIGHT': [s[1] for s in shapes],
    },
    features=datasets.Features(
      {
        'image': datasets.Image(),
        'text': datasets.Value('string'),
        'WIDTH': datasets.Value('int32'),
        'HEIGHT': datasets.Value('int32'),
      }
    ),
  )
  ds.save_to_disk(str(tmp_path / 'saved'))
  config = _config(tmp_path / 'saved', source='hf', max_skip_fraction=0.5)
  source = sources.build_source(config.data)
  np.testing.assert_array_equal(source.image_sizes(), [[20, 20], [40, 17], [5, 5]])
  it = pipeline.make_iterator(config, text_cache=FakeEmbeddingCache(), source=source)
  next(it)
  assert it.num_seen == 2 and it.num_small == 0  # 'd' (5x5) dropped when listed
