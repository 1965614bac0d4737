"""Sharded sources: webdataset tar shards (img2dataset layout) and ArrayRecord files of
tf.train.Example: listing, brace patterns, random access, corrupt / truncated / missing data
skipped and counted, the on-disk tar index, and the grain pipeline over them (per-process
slicing, exact resume, a process left without data)."""

import io
import json
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import pipeline, sources, webdataset
from imagen_jax.data.sources import DataError
from tests.conftest import FakeEmbeddingCache, pipeline_config


def _image_bytes(i: int, fmt: str = 'PNG') -> bytes:
  buf = io.BytesIO()
  Image.new('RGB', (8, 8), (10 * i, 255 - 10 * i, 7)).save(buf, format=fmt)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shard(path, items) -> None:
  """items: (key, {ext: bytes}) in order, as img2dataset writes key.jpg / key.txt / key.json."""
  with tarfile.open(path, 'w') as tar:
    for key, members in items:
      for ext, data in members.items():
        _add(tar, f'{key}.{ext}', data)


def _pair(i: int, fmt: str = 'png') -> tuple[str, dict]:
  members = {fmt: _image_bytes(i, 'JPEG' if fmt == 'jpg' else fmt.upper())}
  members['txt'] = f'picture number {i}'.encode()
  members['json'] = json.dumps({'caption': f'picture number {i}', 'key': f'{i:09d}'}).encode()
  return f'{i:09d}', members


@pytest.fixture
def shards(tmp_path):
  """3 shards of 4 good pairs each (jpg, png and webp images)."""
  root = tmp_path / 'shards'
  root.mkdir()
  for s, fmt in enumerate(['jpg', 'png', 'webp']):
    write_shard(root / f'{s:05d}.tar', [_pair(4 * s + j, fmt) for j in range(4)])
  return root


def _config(path, source='webdataset', **data_overrides) -> ml_collections.ConfigDict:
  return pipeline_config(
    path, batch_size=4, source=source, **{'max_skip_fraction': 0.0, **data_overrides}
  )


@pytest.mark.unit
def test_expand_braces():
  assert webdataset.expand_braces('s/{00008..00011}.tar') == [
    's/00008.tar',
    's/00009.tar',
    's/00010.tar',
    's/00011.tar',
  ]
  assert webdataset.expand_braces('{a,b}/{1..2}.tar') == [
    'a/1.tar',
    'a/2.tar',
    'b/1.tar',
    'b/2.tar',
  ]
  assert webdataset.expand_braces('plain.tar') == ['plain.tar']


@pytest.mark.unit
def test_folder_brace_and_glob_list_the_same_pairs(shards):
  by_folder = sources.build_source(_config(shards).data)
  by_brace = sources.build_source(_config(f'{shards}/{{00000..00002}}.tar').data)
  by_glob = sources.build_source(_config(f'{shards}/*.tar').data)
  assert len(by_folder) == 12 and not by_folder.skipped
  assert by_folder.captions() == [f'picture number {i}' for i in range(12)]
  assert by_folder.fingerprint() == by_brace.fingerprint() == by_glob.fingerprint()
  for i in (0, 5, 11):
    record = by_brace[i]
    assert record['caption'] == f'picture number {i}'
    assert record['id'] == f'{i // 4:05d}.tar/{i:09d}'
    image = np.asarray(Image.open(io.BytesIO(record['image'])).convert('RGB'))
    assert image.shape == (8, 8, 3) and abs(int(image[0, 0, 0]) - 10 * i) <= 8  # jpg/webp loss
  limited = sources.build_source(_config(shards, max_examples=6).data)
  assert len(limited) == 6 and limited.fingerprint() != by_folder.fingerprint()


@pytest.mark.unit
def test_bad_members_are_skipped_and_counted(tmp_path):
  root = tmp_path / 'bad'
  root.mkdir()
  items = [_pair(i) for i in range(6)]
  items[1] = ('000000001', {'png': b'this is not an image', 'txt': b'undecodable picture'})
  items[2] = ('000000002', {'png': _image_bytes(2)})  # no caption
  items[3] = ('000000003', {'png': _image_bytes(3), 'txt': b'   '})  # empty caption
  items[4] = ('000000004', {'txt': b'caption without image'})
  items.append(('000000006', {'jpg': _image_bytes(6, 'JPEG'), 'json': b'{"caption": "json"}'}))
  write_shard(root / '00000.tar', items)
  # A truncated shard: cut in the middle of its third pair's image.
  write_shard(root / '00001.tar', [_pair(10 + j) for j in range(4)])
  data = (root / '00001.tar').read_bytes()
  cut = data.index(b'picture number 12') - 300
  (root / '00001.tar').write_bytes(data[:cut])

  with pytest.raises(DataError, match='items have no usable caption'):
    sources.build_source(_config(root).data)  # max_skip_fraction=0
  source = sources.build_source(_config(root, max_skip_fraction=0.9).data)
  ids = [source[i]['id'] for i in range(len(source))]
  assert ids == [
    '00000.tar/000000000',
    '00000.tar/000000001',  # listed: the image is only decoded (and skipped) by the pipeline
    '00000.tar/000000005',
    '00000.tar/000000006',  # caption from key.json
    '00001.tar/000000010',
    '00001.tar/000000011',
  ]
  assert source[3]['caption'] == 'json'
  reasons = dict(source.skipped)
  assert reasons['00000.tar/000000002'] == 'no caption member (.txt)'
  assert reasons['00000.tar/000000003'] == 'empty caption'
  assert reasons['00000.tar/000000004'].startswith('no image member')
  assert 'truncated tar' in reasons['00001.tar/000000012']
  assert reasons['00001.tar'].startswith('truncated tar (no end-of-archive marker): kept the 2')
  assert len(source.skipped) == 5
  # max_examples keeps the first usable pairs; the skips are counted against the whole listing
  # of the shards read (they were against the kept pairs: 3 of 3 + 3 here).
  source = sources.build_source(_config(root, max_skip_fraction=0.9, max_examples=3).data)
  assert len(source) == 3 and len(source.skipped) == 3 and source.num_listed() == 7

  # The undecodable image is dropped and counted by the pipeline, like any bad file.
  it = pipeline.make_iterator(
    _config(root, max_skip_fraction=0.9), text_cache=FakeEmbeddingCache(), source=source
  )
  next(it)
  next(it)
  assert it.num_skipped >= 1 and it.num_seen - it.num_skipped == 8


@pytest.mark.unit
def test_missing_and_empty_shard_lists(shards, tmp_path):
  with pytest.raises(DataError, match='matches no tar file'):
    sources.build_source(_config(tmp_path / 'nothing-*.tar').data)
  with pytest.raises(DataError, match='needs --config.data.path'):
    sources.build_source(_config('').data)
  # A failed img2dataset shard (a gap in the brace list) is skipped and counted (as the 4 pairs
  # of an average readable shard: 4 of 16 items).
  source = sources.build_source(
    _config(f'{shards}/{{00000..00003}}.tar', max_skip_fraction=0.3).data
  )
  assert len(source) == 12 and source.skipped[0][1].startswith('shard file does not exist')
  (shards / '00003.tar').write_bytes(b'\x1f\x8b' + b'gzip, not a plain tar' * 40)
  source = sources.build_source(_config(shards, max_skip_fraction=0.3).data)
  assert (
    len(source) == 12
    and source.skipped == [('00003.tar', source.skipped[0][1])]
    and 'not a readable uncompressed tar' in source.skipped[0][1]
  )
  (tmp_path / 'empty').mkdir()
  write_shard(tmp_path / 'empty' / '00000.tar', [])
  with pytest.raises(DataError, match='No usable .image, caption. pair in 1 tar shard'):
    sources.build_source(_config(tmp_path / 'empty').data)


@pytest.mark.unit
def test_unopenable_tar_and_folder_matched_by_a_glob(shards, tmp_path):
  # A tar that cannot be opened is skipped; its members were then read anyway (and raised).
  (tmp_path / 'folder.tar').mkdir()
  index = webdataset.index_tar(tmp_path / 'folder.tar')
  assert index['keys'] == [] and 'unreadable tar (IsADirectoryError' in index['skipped'][0][1]
  # A glob keeps files only: a folder named like a shard is no shard.
  (shards / '00003.tar').mkdir()
  source = sources.build_source(_config(f'{shards}/*.tar').data)
  assert len(source) == 12 and not source.skipped
  # An index of a tar that could not be opened (no permission, I/O) is not saved: after the fix
  # (chmod leaves the mtime) the shard must be read, not found empty in the saved index.
  index_dir = tmp_path / 'index'
  saved = webdataset._cached_index(tmp_path / 'folder.tar', 'text', str(index_dir))
  assert saved['keys'] == [] and 'transient' not in saved
  assert not index_dir.exists() or not list(index_dir.glob('*.json'))


@pytest.mark.unit
def test_index_dir_is_written_and_reused(shards, tmp_path, monkeypatch):
  index_dir = tmp_path / 'index'
  first = sources.build_source(_config(shards, index_dir=str(index_dir)).data)
  assert len(list(index_dir.glob('*.json'))) == 3

  def no_reindex(*args):
    raise AssertionError('the saved index should have been used')

  monkeypatch.setattr(webdataset, 'index_tar', no_reindex)
  again = sources.build_source(_config(shards, index_dir=str(index_dir)).data)
  assert again.fingerprint() == first.fingerprint() and again[7]['image'] == first[7]['image']


@pytest.mark.unit
def test_member_names_and_caption_encodings_from_other_systems(tmp_path):
  # A Latin-1 member name failed the listing with a UnicodeEncodeError (fingerprint, index);
  # a .txt with a byte-order mark kept it in the caption, and a UTF-16 one became NULs.
  root = tmp_path / 'enc'
  root.mkdir()
  with tarfile.open(root / '00000.tar', 'w', format=tarfile.GNU_FORMAT, encoding='latin-1') as t:
    for key, caption in [('caf\xe9', b'a cafe'), ('bom', '\ufeffa red car'.encode())]:
      _add(t, f'{key}.png', _image_bytes(1))
      _add(t, f'{key}.txt', caption)
    _add(t, 'wide.png', _image_bytes(2))
    _add(t, 'wide.txt', 'a blue car'.encode('utf-16'))
  index_dir = tmp_path / 'index'
  config = _config(root, max_skip_fraction=0.5, index_dir=str(index_dir)).data
  for _ in range(2):  # listed, then read back from the saved index
    source = sources.build_source(config)
    assert source.captions() == ['a cafe', 'a red car']
    assert [source[i]['id'] for i in range(2)] == ['00000.tar/caf\udce9', '00000.tar/bom']
    assert dict(source.skipped) == {
      '00000.tar/wide': 'caption (.txt) is not UTF-8 text; write it as UTF-8'
    }
  assert len(list(index_dir.glob('*.json'))) == 1


@pytest.mark.unit
def test_pipeline_per_process_slices_and_exact_resume(shards):
  config = _config(shards)
  config.train.batch_size = 4
  source = sources.build_source(config.data)
  cache = FakeEmbeddingCache()

  seen = []
  for index in range(2):  # 2 hosts x 2 examples per batch: disjoint halves of the records
    it = pipeline.make_iterator(
      config, text_cache=cache, process_index=index, process_count=2, source=source
    )
    reds = {int(v) for _ in range(3) for v in np.round(next(it)['image'][:, 0, 0, 0] * 100)}
    seen.append(reds)
  assert not seen[0] & seen[1]

  it = pipeline.make_iterator(config, text_cache=cache, source=source)
  for _ in range(2):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  resumed = pipeline.make_iterator(config, text_cache=cache, source=source)
  resumed.set_state(json.loads(json.dumps(state)))
  for batch in want:
    got = next(resumed)
    for name in batch:
      np.testing.assert_array_equal(got[name], batch[name])


@pytest.mark.unit
def test_a_process_without_data_is_refused(tmp_path):
  root = tmp_path / 'one'
  root.mkdir()
  write_shard(root / '00000.tar', [_pair(0)])
  config = _config(root)
  config.train.batch_size = 2
  with pytest.raises(DataError, match='fewer than the 2 hosts'):
    pipeline.make_iterator(
      config, text_cache=FakeEmbeddingCache(), process_index=1, process_count=2
    )


def _write_array_record(path, records) -> None:
  from array_record.python import array_record_module

  writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
  for record in records:
    writer.write(record)
  writer.close()


@pytest.mark.unit
def test_example_bytes_round_trip():
  record = webdataset.example_bytes(
    {'image': b'\x00\xffpng', 'text': 'ünïcode', 'multi': [b'a', b'b']}
  )
  assert webdataset.parse_example(record) == {
    'image': [b'\x00\xffpng'],
    'text': ['ünïcode'.encode()],
    'multi': [b'a', b'b'],
  }
  with pytest.raises(ValueError):
    webdataset.parse_example(b'\x0a\xff\xff\xff')


@pytest.mark.unit
def test_array_record_source(tmp_path):
  root = tmp_path / 'records'
  root.mkdir()
  good = [
    webdataset.example_bytes({'image': _image_bytes(i), 'text': f'pic {i}'}) for i in range(5)
  ]
  _write_array_record(root / 'train.array_record-00000-of-00002', good[:3] + [b'\x0a\xff\xff'])
  no_caption = webdataset.example_bytes({'image': _image_bytes(9)})
  _write_array_record(root / 'train.array_record-00001-of-00002', good[3:] + [no_caption])

  with pytest.raises(DataError, match='items have no usable caption'):
    sources.build_source(_config(root, source='arrayrecord').data)
  source = sources.build_source(_config(root, source='arrayrecord', max_skip_fraction=0.5).data)
  assert source.captions() == [f'pic {i}' for i in range(5)] and len(source.skipped) == 2
  assert source[4]['image'] == _image_bytes(4) and source[4]['id'] == 'record 5'
  by_glob = sources.build_source(
    _config(f'{root}/train.array_record-*', source='arrayrecord', max_skip_fraction=0.5).data
  )
  assert by_glob.fingerprint() == source.fingerprint()
  it = pipeline.make_iterator(
    _config(root, source='arrayrecord', max_skip_fraction=0.5),
    text_cache=FakeEmbeddingCache(),
    source=source,
  )
  assert next(it)['image'].shape == (4, 8, 8, 3)
  # A caption feature with an empty bytes_list is no caption (it raised IndexError).
  _write_array_record(
    root / 'train.array_record-00001-of-00002',
    good[3:] + [webdataset.example_bytes({'image': _image_bytes(9), 'text': []})],
  )
  source = sources.build_source(_config(root, source='arrayrecord', max_skip_fraction=0.5).data)
  assert len(source) == 5
  assert source.skipped[-1] == ('record 6', "no or empty caption feature 'text'")
  with pytest.raises(DataError, match='matches no array_record file'):
    sources.build_source(_config(tmp_path / 'none', source='arrayrecord').data)


@pytest.mark.unit
def test_keys_with_more_dots_are_counted_skips_naming_their_members(tmp_path):
  # WebDataset keys end at the first dot: photo.2023.jpg + photo.2023.txt are the key 'photo'
  # with the extensions '2023.jpg' / '2023.txt', neither image nor caption. Such groups were
  # dropped without being counted (half a dataset of dotted names vanished in silence).
  root = tmp_path / 'dots'
  root.mkdir()
  items = [_pair(0)]
  for name in ('photo.2023', 'IMG_0001.v2'):
    items.append((name, {'jpg': _image_bytes(1, 'JPEG'), 'txt': f'caption of {name}'.encode()}))
  items.append(('scan', {'png': _image_bytes(2), 'final.txt': b'the caption, after a dot'}))
  items.append(('notes', {'md': b'not a pair at all'}))
  write_shard(root / '00000.tar', items)
  with pytest.raises(DataError, match=r'4 of 5 listed items .*WebDataset keys end at the first'):
    sources.build_source(_config(root).data)
  source = sources.build_source(_config(root, max_skip_fraction=0.9).data)
  assert [source[i]['id'] for i in range(len(source))] == ['00000.tar/000000000']
  reasons = dict(source.skipped)
  assert sorted(reasons) == [
    '00000.tar/IMG_0001',
    '00000.tar/notes',
    '00000.tar/photo',
    '00000.tar/scan',
  ]
  assert reasons['00000.tar/photo'].startswith(
    "key 'photo' has no image (.jpg/.png/.webp/...) and no caption (.txt/.json) member (its "
    'members: photo.2023.jpg, photo.2023.txt): WebDataset keys end at the first dot of the file '
    'name'
  )
  assert (
    "key 'scan' has no caption (.txt/.json) member (its members: scan.final.txt, scan.png)"
    in (reasons['00000.tar/scan'])
  )
  assert 'notes.md' in reasons['00000.tar/notes']
  assert source.num_listed() == 5


@pytest.mark.unit
def test_a_lost_shard_counts_as_the_pairs_of_an_average_shard(tmp_path):
  # Losing 5 of 10 shards counted 5 skipped items against 1000 pairs: a 1 % limit passed.
  root = tmp_path / 'half'
  root.mkdir()
  for s in range(0, 10, 2):  # shards 1, 3, 5, 7 and 9 are missing
    write_shard(root / f'{s:05d}.tar', [_pair(4 * s + j) for j in range(4)])
  spec = f'{root}/{{00000..00009}}.tar'
  with pytest.raises(DataError) as error:
    sources.build_source(_config(spec, max_skip_fraction=0.01).data)
  message = str(error.value)
  assert '20 of 40 listed items have no usable caption or file (each of the 5 lost shards ' in (
    message
  )
  assert 'counts as 4 items, the average number of pairs of the 5 readable shards) (50.0% >' in (
    message
  )
  assert '\n' not in message
  source = sources.build_source(_config(spec, max_skip_fraction=0.6).data)
  assert len(source) == 20 and len(source.skipped) == 5
  assert source.num_skipped() == 20 and source.num_listed() == 40
  # A shard that is not a tar that opens is lost too.
  (root / '00001.tar').write_bytes(b'\x1f\x8b' + b'gzip, not a plain tar' * 40)
  source = sources.build_source(_config(spec, max_skip_fraction=0.6).data)
  assert source.num_skipped() == 20 and 'not a readable uncompressed tar' in dict(
    source.skipped
  ).get('00001.tar', '')
  # max_examples reading 1 of the 5 readable shards: the 4 missing shards (00001.tar is not read)
  # weigh their share of the whole dataset (one item each here), not 16 items against 4 read.
  source = sources.build_source(_config(spec, max_skip_fraction=0.6, max_examples=2).data)
  assert len(source) == 2 and source.num_skipped() == 4 and source.num_listed() == 8
  assert 'scaled to the 1 of them that max_examples read' in source.skip_note
  # Every shard lost: one line, as before.
  for s in range(0, 10, 2):
    (root / f'{s:05d}.tar').write_bytes(b'not a tar')
  with pytest.raises(DataError, match=r'No usable .image, caption. pair in 6 tar shard') as error:
    sources.build_source(_config(spec, max_skip_fraction=0.6).data)
  assert '\n' not in str(error.value)


@pytest.mark.unit
def test_captions_that_are_not_utf8_or_not_text_are_counted_skips(tmp_path):
  # ArrayRecord bytes were decoded with errors='replace' ('caf\ufffd' was trained on); a json
  # caption that is a dict became its str().
  root = tmp_path / 'records'
  root.mkdir()
  records = [
    webdataset.example_bytes({'image': _image_bytes(0), 'text': 'caf\u00e9'}),
    webdataset.example_bytes({'image': _image_bytes(1), 'text': b'caf\xe9'}),  # Latin-1
  ]
  _write_array_record(root / 'a.array_record', records)
  source = sources.build_source(_config(root, source='arrayrecord', max_skip_fraction=0.5).data)
  assert source.captions() == ['caf\u00e9']
  assert source.skipped == [('record 1', "caption is not UTF-8 (feature 'text')")]
  tars = tmp_path / 'tars'
  tars.mkdir()
  items = [_pair(0)]
  items.append(('000000001', {'png': _image_bytes(1), 'json': b'{"caption": {"en": "a dog"}}'}))
  items.append(('000000002', {'png': _image_bytes(2), 'json': b'{"caption": true}'}))
  write_shard(tars / '00000.tar', items)
  source = sources.build_source(_config(tars, max_skip_fraction=0.9).data)
  assert source.captions() == ['picture number 0']
  assert source.skipped == [
    ('00000.tar/000000001', 'caption is a value of type dict, not text (.json)'),
    ('00000.tar/000000002', 'caption is a value of type bool, not text (.json)'),
  ]
