"""Sources: image folders (imagefolder metadata / sidecar captions), HF datasets, tfds."""

import io
import json
import logging

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import preprocess, sources
from imagen_jax.data.sources import DataError
from tests.conftest import data_config


def _image(path, colour=(255, 0, 0), size=(8, 8)):
  Image.new('RGB', size, colour).save(path)


def _data_config(**overrides) -> ml_collections.ConfigDict:
  return data_config(**{'max_skip_fraction': 0.5, **overrides})


@pytest.mark.unit
def test_sidecar_folder_recursive_with_missing_and_empty_captions(tmp_path, caplog):
  (tmp_path / 'sub').mkdir()
  _image(tmp_path / 'a.png')
  (tmp_path / 'a.txt').write_text('a red square\n')
  _image(tmp_path / 'sub' / 'b.jpg', (0, 255, 0))
  (tmp_path / 'sub' / 'b.txt').write_text('a green square')
  _image(tmp_path / 'no_caption.png')
  _image(tmp_path / 'empty_caption.png')
  (tmp_path / 'empty_caption.txt').write_text('   \n')
  (tmp_path / 'notes.md').write_text('not an image, ignored')
  with caplog.at_level(logging.WARNING):
    source = sources.build_source(_data_config(path=str(tmp_path)))
  assert len(source) == 2
  assert source.captions() == ['a red square', 'a green square']
  record = source[1]
  assert record['id'] == 'sub/b.jpg' and record['caption'] == 'a green square'
  assert np.asarray(preprocess.decode_image(record['image']))[0, 0, 1] > 200
  assert sorted(i for i, _ in source.skipped) == ['empty_caption.png', 'no_caption.png']
  assert 'no_caption.png' in caplog.text and 'empty_caption.png' in caplog.text


@pytest.mark.unit
def test_imagefolder_metadata_and_max_examples(tmp_path):
  rows = []
  for i in range(5):
    _image(tmp_path / f'{i}.png', (i * 40, 0, 0))
    rows.append({'file_name': f'{i}.png', 'caption': f'image number {i}'})
  rows.append({'file_name': 'gone.png', 'caption': 'file does not exist'})
  rows.append({'file_name': '0.png', 'caption': ''})
  with open(tmp_path / 'metadata.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  config = _data_config(path=str(tmp_path), caption_column='caption')
  source = sources.build_source(config)
  assert len(source) == 5 and source.captions()[3] == 'image number 3'
  assert {i for i, _ in source.skipped} == {'gone.png', '0.png'}
  config.max_examples = 2
  limited = sources.build_source(config)
  assert limited.captions() == ['image number 0', 'image number 1']
  assert limited.fingerprint() != source.fingerprint()
  # Fingerprints are stable and follow file content.
  again = sources.build_source(_data_config(path=str(tmp_path), caption_column='caption'))
  assert again.fingerprint() == source.fingerprint()
  noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
  Image.fromarray(noise).save(tmp_path / '4.png')  # new content, new size
  rebuilt = sources.build_source(_data_config(path=str(tmp_path), caption_column='caption'))
  assert rebuilt.fingerprint() != source.fingerprint()


@pytest.mark.unit
def test_metadata_text_encodings(tmp_path):
  for i in range(2):
    _image(tmp_path / f'{i}.png', (i * 40, 0, 0))
  # Excel's 'CSV UTF-8' starts with a byte-order mark: the first column is still 'file_name'.
  (tmp_path / 'metadata.csv').write_bytes(
    '\ufefffile_name,text\n0.png,caf\u00e9 au lait\n1.png,un th\u00e9\n'.encode()
  )
  source = sources.build_source(_data_config(path=str(tmp_path)))
  assert source.captions() == ['caf\u00e9 au lait', 'un th\u00e9'] and not source.skipped
  # Latin-1 is not guessed at: one line naming the file and the fix.
  (tmp_path / 'metadata.csv').write_bytes('file_name,text\n0.png,caf\u00e9\n'.encode('latin-1'))
  with pytest.raises(DataError, match=r'metadata.csv is not UTF-8 text .*iconv'):
    sources.build_source(_data_config(path=str(tmp_path)))
  # Half a surrogate pair from a JSON escape becomes U+FFFD (UTF-8 cannot encode it).
  (tmp_path / 'metadata.csv').unlink()
  rows = [{'file_name': '0.png', 'text': 'smile \ud83d'}, {'file_name': '1.png', 'text': 'ok'}]
  (tmp_path / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  source = sources.build_source(_data_config(path=str(tmp_path)))
  assert source.captions() == ['smile \ufffd', 'ok']
  assert source.fingerprint()  # hashes the captions as UTF-8


@pytest.mark.unit
def test_folder_listing_of_real_world_trees(tmp_path):
  # Each of these failed or silently changed the dataset: a non-UTF-8 file name (a traceback
  # from the fingerprint), a symlinked subfolder (left out), a macOS zip's __MACOSX/._x files
  # (listed as pairs with binary captions), a caption file with a byte-order mark (a caption
  # that no prompt matches) or in UTF-16 (a caption of NULs).
  root = tmp_path / 'data'
  root.mkdir()
  _image(root / 'a.png')
  (root / 'a.txt').write_bytes('﻿a red car'.encode())  # 'UTF-8 with BOM'
  latin = bytes(root) + b'/caf\xe9.png'  # a Latin-1 name: not UTF-8
  _image(latin.decode('utf-8', 'surrogateescape'))
  with open(latin[:-4] + b'.txt', 'wb') as f:
    f.write(b'a cafe')
  _image(root / 'wide.png')
  (root / 'wide.txt').write_bytes('a blue car'.encode('utf-16'))
  elsewhere = tmp_path / 'part'
  elsewhere.mkdir()
  _image(elsewhere / 'b.png')
  (elsewhere / 'b.txt').write_text('a green car')
  (root / 'linked').symlink_to(elsewhere)
  (elsewhere / 'loop').symlink_to(root)  # a link loop ends: each real folder is walked once
  for hidden in (root / '__MACOSX', root / '.git'):
    hidden.mkdir()
    _image(hidden / 'a.png')
    (hidden / 'a.txt').write_bytes(b'\x00\x05\x16\x07Mac OS X')
  _image(root / '._a.png')
  (root / '._a.txt').write_bytes(b'\x00\x05\x16\x07Mac OS X')
  source = sources.build_source(_data_config(path=str(root)))
  assert [source[i]['id'] for i in range(len(source))] == ['a.png', 'caf\udce9.png', 'linked/b.png']
  assert source.captions() == ['a red car', 'a cafe', 'a green car']
  assert source.skipped == [
    ('wide.png', 'caption file wide.txt is not UTF-8 text; save it as UTF-8')
  ]
  assert source.fingerprint() == sources.build_source(_data_config(path=str(root))).fingerprint()
  assert preprocess.decode_image(source[1]['image']).size == (8, 8)


@pytest.mark.unit
def test_an_image_in_several_metadata_files_is_listed_once(tmp_path):
  # Each metadata file's rows were all listed: an image named by a top-level file and by its
  # subfolder's own was two examples. The nearest file wins, as in Hugging Face's imagefolder;
  # rows of one file that repeat an image (several captions) are kept.
  (tmp_path / 'sub').mkdir()
  _image(tmp_path / 'sub' / 'a.png')
  _image(tmp_path / 'b.png')
  top = [{'file_name': 'sub/a.png', 'text': 'far'}, {'file_name': 'b.png', 'text': 'b'}]
  (tmp_path / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in top))
  near = [{'file_name': 'a.png', 'text': 'near'}, {'file_name': 'a.png', 'text': 'near too'}]
  (tmp_path / 'sub' / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in near))
  source = sources.build_source(_data_config(path=str(tmp_path)))
  assert sorted(source.captions()) == ['b', 'near', 'near too']
  assert source.skipped == []  # the far row is the layout's, not bad data (it was a skip)
  (tmp_path / 'metadata.csv').write_text('file_name,text\nb.png,b\n')
  with pytest.raises(DataError, match=r'holds both metadata.jsonl and metadata.csv: .* Keep one'):
    sources.build_source(_data_config(path=str(tmp_path)))


@pytest.mark.unit
def test_the_skip_fraction_counts_only_bad_rows_of_the_whole_listing(tmp_path, caplog):
  """Three listings that stopped a run with little or no bad data, and two silent losses."""
  strict = {'max_skip_fraction': 0.01}
  # (1) A top-level metadata file and each subfolder's own, listing the same 100 images: the
  # 100 unused far rows counted as skipped, 50 % > 1 %.
  nested = tmp_path / 'nested'
  (nested / 'sub').mkdir(parents=True)
  rows = []
  for i in range(100):
    _image(nested / 'sub' / f'{i}.png')
    rows.append({'file_name': f'sub/{i}.png', 'text': f'far {i}'})
  (nested / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  near = [{'file_name': f'{i}.png', 'text': f'near {i}'} for i in range(100)]
  (nested / 'sub' / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in near))
  with caplog.at_level(logging.INFO, logger='imagen_jax.data.sources'):
    source = sources.build_source(data_config(path=str(nested), **strict))
  assert len(source) == 100 and source.skipped == [] and source.captions()[0] == 'near 0'
  assert '100 rows list an image that a nearer metadata file also lists' in caplog.text
  # (2) max_examples keeps the first usable pairs, but the skips came from the whole listing:
  # 1 missing caption of 200 (0.5 %) read as 1 of 21 (4.8 %).
  flat = tmp_path / 'flat'
  flat.mkdir()
  for i in range(200):
    _image(flat / f'{i:03d}.png')
    if i != 150:
      (flat / f'{i:03d}.txt').write_text(f'red {i}')
  source = sources.build_source(data_config(path=str(flat), max_examples=20, **strict))
  assert len(source) == 20 and len(source.skipped) == 1 and source.num_listed() == 200
  # (3) pandas writes a missing caption as the bare NaN, which json.loads reads as a float: it
  # was the caption 'nan'.
  nan = tmp_path / 'nan'
  nan.mkdir()
  for name in ('a', 'b'):
    _image(nan / f'{name}.png')
  (nan / 'metadata.jsonl').write_text(
    '{"file_name": "a.png", "text": "a red car"}\n{"file_name": "b.png", "text": NaN}\n'
  )
  source = sources.build_source(_data_config(path=str(nan)))
  assert source.captions() == ['a red car']
  assert source.skipped == [('b.png', 'empty caption in metadata.jsonl:2')]
  # (4) Sidecar pairs beside a metadata file anywhere in the tree were left out without a word.
  mixed = tmp_path / 'mixed'
  (mixed / 'extra').mkdir(parents=True)
  for i in range(5):
    _image(mixed / f'{i}.png')
    (mixed / f'{i}.txt').write_text(f'sidecar {i}')
  _image(mixed / 'extra' / 'x.png')
  (mixed / 'extra' / 'metadata.jsonl').write_text('{"file_name": "x.png", "text": "listed"}\n')
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='imagen_jax.data.sources'):
    source = sources.build_source(_data_config(path=str(mixed)))
  assert source.captions() == ['listed']
  assert (
    '5 images are listed in no metadata file (extra/metadata.jsonl) and are left out, e.g. '
    '0.png; with metadata files .txt captions are not read' in caplog.text
  )


@pytest.mark.unit
def test_metadata_jsonl_non_string_file_name_is_skipped(tmp_path):
  for i in range(3):
    _image(tmp_path / f'{i}.png', (i * 40, 0, 0))
  rows = [json.dumps({'file_name': f'{i}.png', 'text': f'c{i}'}) for i in range(3)]
  rows += [json.dumps({'file_name': 7, 'text': 'x'}), json.dumps({'file_name': ['0.png']})]
  (tmp_path / 'metadata.jsonl').write_text('\n'.join(rows))
  source = sources.build_source(_data_config(path=str(tmp_path)))  # raised TypeError
  assert source.captions() == ['c0', 'c1', 'c2']
  assert [i for i, _ in source.skipped] == ['metadata.jsonl:4', 'metadata.jsonl:5']
  assert all('is not a file name string' in r for _, r in source.skipped)


@pytest.mark.unit
def test_malformed_metadata_csv_is_one_clear_error(tmp_path):
  for i in range(3):
    _image(tmp_path / f'{i}.png', (i * 40, 0, 0))
  # One unclosed quote swallowed every later row without a word; now it is one clear error.
  (tmp_path / 'metadata.csv').write_text('file_name,text\n0.png,"c0\n1.png,c1\n2.png,c2\n')
  with pytest.raises(DataError, match=r'metadata.csv is not valid CSV at line 4 .*unclosed'):
    sources.build_source(_data_config(path=str(tmp_path)))
  # A field over csv's size limit was a csv.Error traceback.
  long_row = '1.png,"' + 'x' * 200_000 + '"'
  (tmp_path / 'metadata.csv').write_text(f'file_name,text\n0.png,c0\n{long_row}\n2.png,c2\n')
  with pytest.raises(DataError, match=r'not valid CSV at line 3 \(field larger than field limit'):
    sources.build_source(_data_config(path=str(tmp_path)))


@pytest.mark.unit
def test_folder_split_folders_follow_data_split(tmp_path):
  for split, n in [('train', 3), ('test', 2)]:
    (tmp_path / split).mkdir()
    with open(tmp_path / split / 'metadata.jsonl', 'w') as f:
      for i in range(n):
        _image(tmp_path / split / f'{i}.png')
        f.write(json.dumps({'file_name': f'{i}.png', 'text': f'{split} {i}'}) + '\n')
  train = sources.build_source(_data_config(path=str(tmp_path), split='train'))
  assert train.captions() == ['train 0', 'train 1', 'train 2']  # rglob mixed the test split in
  assert train.name == f'folder:{tmp_path.resolve() / "train"}' and train[0]['id'] == '0.png'
  test = sources.build_source(_data_config(path=str(tmp_path), split='test'))
  assert test.captions() == ['test 0', 'test 1']
  assert test.fingerprint() != train.fingerprint()
  with pytest.raises(DataError, match=r"split folders \['test', 'train'\], none named 'val'"):
    sources.build_source(_data_config(path=str(tmp_path), split='val'))
  # Pointing data.path at a split folder reads it whatever data.split says.
  direct = sources.build_source(_data_config(path=str(tmp_path / 'test'), split='val'))
  assert direct.captions() == test.captions()


@pytest.mark.unit
def test_folder_errors_are_clear(tmp_path):
  with pytest.raises(DataError, match='does not exist'):
    sources.build_source(_data_config(path=str(tmp_path / 'nope')))
  with pytest.raises(DataError, match='needs --config.data.path'):
    sources.build_source(_data_config(path=''))
  _image(tmp_path / 'a.png')  # no captions anywhere
  with pytest.raises(DataError, match=r'No usable \(image, caption\) pair in .*'):
    sources.build_source(_data_config(path=str(tmp_path)))
  with pytest.raises(DataError, match='Unknown data.source'):
    sources.build_source(_data_config(source='s3'))


@pytest.mark.unit
def test_listing_skip_fraction_aborts(tmp_path):
  for i in range(4):
    _image(tmp_path / f'{i}.png')
    if i < 2:
      (tmp_path / f'{i}.txt').write_text(f'caption {i}')
  with pytest.raises(DataError, match='max_skip_fraction'):
    sources.build_source(_data_config(path=str(tmp_path), max_skip_fraction=0.1))
  assert len(sources.build_source(_data_config(path=str(tmp_path), max_skip_fraction=0.5))) == 2


@pytest.mark.smoke
def test_hf_save_to_disk_dataset(tmp_path):
  datasets = pytest.importorskip('datasets')
  images = [Image.new('RGB', (8, 8), (i * 60, 10, 10)) for i in range(4)]
  ds = datasets.Dataset.from_dict(
    {'img': images, 'caption': ['zero', '', 'two', 'three']},
    features=datasets.Features({'img': datasets.Image(), 'caption': datasets.Value('string')}),
  )
  ds.save_to_disk(str(tmp_path / 'saved'))
  config = _data_config(source='hf', path=str(tmp_path / 'saved'), image_column='img')
  config.caption_column = 'caption'
  source = sources.build_source(config)
  assert source.captions() == ['zero', 'two', 'three']
  assert source.skipped == [('train[1]', 'empty or missing caption')]
  record = source[1]
  assert isinstance(record['image'], dict) and record['image']['bytes']  # still encoded
  assert np.asarray(preprocess.decode_image(record['image']))[0, 0, 0] == 120
  assert source.fingerprint() == sources.build_source(config).fingerprint()
  config.caption_column = 'text'
  with pytest.raises(DataError, match=r"no column\(s\) \['text'\]"):
    sources.build_source(config)


@pytest.mark.smoke
def test_hf_reads_decode_only_the_image_column(tmp_path):
  datasets = pytest.importorskip('datasets')

  def png(grey: int) -> dict:
    buf = io.BytesIO()
    Image.new('RGB', (8, 8), (grey, grey, grey)).save(buf, format='PNG')
    return {'bytes': buf.getvalue(), 'path': None}

  broken = {'bytes': png(1)['bytes'][:40], 'path': None}
  image = datasets.Image()
  features = {'image': image, 'conditioning_image': image, 'text': datasets.Value('string')}
  ds = datasets.Dataset.from_dict(
    {
      'image': [png(i * 50) for i in range(3)],
      'conditioning_image': [png(1), broken, png(1)],  # an unused column, broken in row 1
      'text': ['a', 'b', 'c'],
    },
    features=datasets.Features(features),
  )
  ds.save_to_disk(str(tmp_path / 'saved'))
  source = sources.build_source(_data_config(source='hf', path=str(tmp_path / 'saved')))
  for i in range(3):  # row 1 raised: reading a row decoded every image column
    record = source[i]
    assert isinstance(record['image'], dict) and record['image']['bytes']
    assert np.asarray(preprocess.decode_image(record['image']))[0, 0, 0] == i * 50


@pytest.mark.smoke
def test_hf_imagefolder_offline(tmp_path, monkeypatch):
  datasets = pytest.importorskip('datasets')
  monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'hf_cache')
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  folder = tmp_path / 'data'
  folder.mkdir()
  with open(folder / 'metadata.jsonl', 'w') as f:
    for i in range(3):
      _image(folder / f'{i}.png', (0, i * 100, 0))
      f.write(json.dumps({'file_name': f'{i}.png', 'text': f'green {i}'}) + '\n')
  source = sources.build_source(_data_config(source='hf', path=str(folder)))
  assert sorted(source.captions()) == ['green 0', 'green 1', 'green 2']
  greens = sorted(
    int(np.asarray(preprocess.decode_image(source[i]['image']))[0, 0, 1]) for i in range(3)
  )
  assert greens == [0, 100, 200]


def _prepare_tfds(tmp_path, class_name: str, image_feature, examples: list[dict]) -> str:
  """Prepares a tfds dataset of `examples` ('image' with `image_feature`, 'text') as array_record
  files under tmp_path/tfds, without TensorFlow; the dataset is named after `class_name` in
  snake_case. Returns the data_dir."""
  import types

  import tensorflow_datasets as tfds

  def body(ns):
    ns['VERSION'] = tfds.core.Version('1.0.0')
    ns['code_path'] = None  # no checksums file; avoids tfds' optional importlib_resources lookup

    def _info(self):
      features = {'image': image_feature, 'text': tfds.features.Text()}
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      yield from enumerate(examples)

    ns.update(
      _info=_info, _split_generators=_split_generators, _generate_examples=_generate_examples
    )

  builder = types.new_class(
    class_name, (tfds.core.GeneratorBasedBuilder,), {'skip_registration': True}, body
  )
  data_dir = str(tmp_path / 'tfds')
  builder(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


@pytest.mark.smoke
def test_tfds_array_record_data_source(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')

  # Tensor/Text features serialise without TensorFlow, so a tiny array_record dataset can
  # be prepared offline here; the source then reads it back through tfds.data_source.
  examples = [
    {
      'image': np.full((8, 8, 3), i * 50, np.uint8),
      'text': '' if i == 2 else f'grey level {i * 50}',
    }
    for i in range(4)
  ]
  data_dir = _prepare_tfds(
    tmp_path, 'TinyCaptionsForTest', tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8), examples
  )
  config = _data_config(source='tfds', path='tiny_captions_for_test', max_skip_fraction=0.5)
  config.data_dir = data_dir
  source = sources.build_source(config)
  assert sorted(source.captions()) == ['grey level 0', 'grey level 150', 'grey level 50']
  assert len(source.skipped) == 1
  # Sizes of the kept rows, from the images tfds decoded while the captions were listed.
  np.testing.assert_array_equal(source.image_sizes(), [[8, 8]] * 3)
  for i in range(len(source)):
    record = source[i]
    grey = int(np.asarray(preprocess.decode_image(record['image']))[0, 0, 0])
    assert record['caption'] == f'grey level {grey}'


@pytest.mark.smoke
def test_tfds_image_feature_is_listed_without_decoding(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  from PIL import Image

  # An Image feature given PNG files stores their bytes as they are (no TensorFlow needed).
  pngs = []
  for i in range(3):
    pngs.append(tmp_path / f'{i}.png')
    Image.fromarray(np.full((8 + i, 12, 3), i * 60, np.uint8)).save(pngs[-1])

  examples = [
    {'image': str(png), 'text': f'grey level {i * 60} rows {8 + i}'} for i, png in enumerate(pngs)
  ]
  image = tfds.features.Image(shape=(None, None, 3), encoding_format='png')
  data_dir = _prepare_tfds(tmp_path, 'TinyPngsForTest', image, examples)
  decoded = []
  original = tfds.features.Image.decode_example_np
  monkeypatch.setattr(
    tfds.features.Image,
    'decode_example_np',
    lambda self, *a, **k: decoded.append(1) or original(self, *a, **k),
  )
  config = _data_config(source='tfds', path='tiny_pngs_for_test')
  config.data_dir = data_dir
  source = sources.build_source(config)
  assert not decoded  # listing read the sizes from the PNG headers
  rows = [int(c.split()[-1]) for c in source.captions()]
  np.testing.assert_array_equal(source.image_sizes(), [[12, r] for r in rows])
  for i in range(len(source)):  # reads get the encoded bytes too: preprocess decodes them
    assert isinstance(source[i]['image'], bytes)
    image = np.asarray(preprocess.decode_image(source[i]['image']))
    assert image.shape == (rows[i], 12, 3)
    assert source[i]['caption'] == f'grey level {int(image[0, 0, 0])} rows {rows[i]}'
  assert not decoded


@pytest.mark.smoke
def test_tfds_corrupt_image_is_skipped_by_preprocess_not_raised_by_reads(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')

  pngs = []
  for i in range(3):
    pngs.append(tmp_path / f'{i}.png')
    Image.fromarray(np.full((8, 12, 3), i * 60, np.uint8)).save(pngs[-1])
  pngs[1].write_bytes(pngs[1].read_bytes()[:-20])  # header intact, pixel data cut
  examples = [{'image': str(png), 'text': f'grey {i}'} for i, png in enumerate(pngs)]
  image = tfds.features.Image(shape=(None, None, 3), encoding_format='png')
  config = _data_config(source='tfds', path='tiny_corrupt_pngs_for_test')
  config.data_dir = _prepare_tfds(tmp_path, 'TinyCorruptPngsForTest', image, examples)
  source = sources.build_source(config)
  assert len(source) == 3
  record = source[1]  # a decoding read raised OSError here, outside the pipeline's skips
  assert isinstance(record['image'], bytes)
  with pytest.raises(preprocess.SkipExample):
    preprocess.decode_image(record['image'])
  assert np.asarray(preprocess.decode_image(source[2]['image']))[0, 0, 0] == 120


@pytest.mark.unit
def test_hf_and_tfds_load_failures_are_data_errors(tmp_path):
  with pytest.raises(DataError, match='needs --config.data.path'):
    sources.build_source(_data_config(source='hf', path=''))
  with pytest.raises(DataError, match='Could not load Hugging Face dataset'):
    sources.build_source(_data_config(source='hf', path=str(tmp_path / 'missing_dir')))
  # No prepared array_record files: the message says how to prepare them.
  with pytest.raises(DataError, match='array_record'):
    sources.TfdsSource('no_such_dataset_xyz', data_dir=str(tmp_path))


@pytest.mark.unit
def test_metadata_csv_row_that_does_not_fit_its_header_is_a_counted_skip(tmp_path, caplog):
  # csv.DictReader put the fields past the header under the key None, which was dropped: the
  # unquoted 'a red car, parked next to a blue house' trained as 'a red car'.
  for i in range(4):
    _image(tmp_path / f'img{i}.png', (i * 40, 0, 0))
  (tmp_path / 'metadata.csv').write_text(
    'file_name,text\n'
    'img0.png,a red car, parked next to a blue house\n'
    'img1.png,a dog\n'
    'img2.png,"a cat, sleeping",\n'  # a trailing comma loses nothing: not a skip
    'img3.png\n'
  )
  with caplog.at_level(logging.WARNING, logger='imagen_jax.data.sources'):
    source = sources.build_source(_data_config(path=str(tmp_path)))
  assert [source[i]['id'] for i in range(len(source))] == ['img1.png', 'img2.png']
  assert source.captions() == ['a dog', 'a cat, sleeping']
  assert [i for i, _ in source.skipped] == ['metadata.csv:2', 'metadata.csv:5']
  too_many, too_few = (r for _, r in source.skipped)
  assert too_many.startswith('metadata.csv line 2 has 3 fields but the header has 2 (file_name')
  assert too_few.startswith('metadata.csv line 5 has 1 fields but the header has 2')
  assert all('quote a caption that contains commas' in r for _, r in source.skipped)
  assert 'listed in no metadata file' not in caplog.text  # img0.png is named, by the bad row
  # They count toward data.max_skip_fraction like any skip: one line names the row and the fix.
  with pytest.raises(DataError, match=r'2 of 4 listed items') as error:
    sources.build_source(_data_config(path=str(tmp_path), max_skip_fraction=0.01))
  assert 'metadata.csv:2: metadata.csv line 2 has 3 fields' in str(error.value)
  assert 'quote a caption that contains commas' in str(error.value)
  assert '\n' not in str(error.value)


@pytest.mark.unit
def test_sidecar_folder_reads_the_formats_pillow_decodes_and_counts_lone_captions(tmp_path):
  # A fixed extension list left .avif / .jpe / .apng / .qoi pairs out without a word, and a
  # caption whose image is a broken link was ignored.
  formats = {'a.png': 'PNG', 'b.jpe': 'JPEG', 'c.apng': 'PNG', 'd.qoi': 'QOI', 'e.avif': 'AVIF'}
  for i, (name, fmt) in enumerate(formats.items()):
    Image.new('RGB', (8, 8), (40 * i, 0, 0)).save(tmp_path / name, fmt)
    (tmp_path / name).with_suffix('.txt').write_text(f'{fmt} picture {name}')
  assert {'.jpe', '.apng', '.qoi', '.avif'} <= sources.IMAGE_EXTENSIONS
  assert {'.png', '.jpg', '.jpeg', '.webp', '.tif', '.pgm', '.jfif'} <= sources.IMAGE_EXTENSIONS
  (tmp_path / 'gone.png').symlink_to(tmp_path / 'missing_target.png')
  (tmp_path / 'gone.txt').write_text('a dangling link')
  (tmp_path / 'lonely.txt').write_text('no image at all')
  (tmp_path / 'README.txt').write_text('how this folder was made: not a caption')
  source = sources.build_source(_data_config(path=str(tmp_path)))
  ids = [source[i]['id'] for i in range(len(source))]
  assert ids == ['a.png', 'b.jpe', 'c.apng', 'd.qoi', 'e.avif']
  assert source.captions() == [f'{fmt} picture {name}' for name, fmt in formats.items()]
  for i in range(len(source)):
    assert preprocess.decode_image(source[i]['image']).size == (8, 8)
  reasons = dict(source.skipped)
  assert sorted(reasons) == ['gone.txt', 'lonely.txt']
  assert reasons['gone.txt'].startswith('caption file with no readable image beside it: gone.png')
  assert reasons['lonely.txt'].startswith('caption file with no image beside it')
  assert source.num_listed() == 7


@pytest.mark.unit
def test_unlisted_image_warning_knows_the_formats_pillow_decodes(tmp_path, caplog):
  _image(tmp_path / 'a.png')
  Image.new('RGB', (8, 8)).save(tmp_path / 'b.jpe', 'JPEG')
  (tmp_path / 'metadata.jsonl').write_text('{"file_name": "a.png", "text": "listed"}\n')
  with caplog.at_level(logging.WARNING, logger='imagen_jax.data.sources'):
    source = sources.build_source(_data_config(path=str(tmp_path)))
  assert source.captions() == ['listed']
  assert 'e.g. b.jpe' in caplog.text


@pytest.mark.unit
def test_metadata_without_the_configured_columns_is_one_error_naming_the_setting(tmp_path, caplog):
  # Captions under 'caption' with data.caption_column='text': 50 per-row warnings, then an
  # error naming neither the column found nor the setting.
  rows = []
  for i in range(60):
    _image(tmp_path / f'{i:03d}.png')
    rows.append({'file_name': f'{i:03d}.png', 'caption': f'caption {i}'})
  (tmp_path / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  with caplog.at_level(logging.WARNING, logger='imagen_jax.data.sources'):
    with pytest.raises(DataError, match='no row has the caption column') as error:
      sources.build_source(_data_config(path=str(tmp_path)))
  message = str(error.value)
  assert "'text' (data.caption_column); its columns: 'caption', 'file_name'" in message
  assert '--config.data.caption_column' in message and '\n' not in message
  assert 'skipping' not in caplog.text
  assert len(sources.build_source(_data_config(path=str(tmp_path), caption_column='caption'))) == 60
  # No image column: the error names the columns and the one folders read ('file_name').
  rows = [{'image': f'{i:03d}.png', 'text': f'caption {i}'} for i in range(60)]
  (tmp_path / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  with pytest.raises(DataError, match=r"no row has a 'file_name' column \(its columns: 'image'"):
    sources.build_source(_data_config(path=str(tmp_path)))
  # A CSV header with a space after each comma: ' text' was no 'text' column.
  (tmp_path / 'metadata.jsonl').unlink()
  (tmp_path / 'metadata.csv').write_text(
    'file_name, text\n000.png, a dog\n001.png, "a cat, sleeping"\n'
  )
  source = sources.build_source(_data_config(path=str(tmp_path), max_skip_fraction=1.0))
  assert source.captions() == ['a dog', 'a cat, sleeping']


@pytest.mark.unit
def test_captions_that_are_not_text_are_counted_skips(tmp_path):
  # A dict, a bool or a number was trained on as its str() ("{'en': 'a dog'}", 'True').
  rows = [
    {'file_name': '0.png', 'text': 'a real caption'},
    {'file_name': '1.png', 'text': {'en': 'a dog'}},
    {'file_name': '2.png', 'text': True},
    {'file_name': '3.png', 'text': [1, 2]},
    {'file_name': '4.png', 'text': 7},
    {'file_name': '5.png', 'text': ['', 'second of a list']},
  ]
  for i in range(len(rows)):
    _image(tmp_path / f'{i}.png')
  (tmp_path / 'metadata.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  source = sources.build_source(_data_config(path=str(tmp_path), max_skip_fraction=1.0))
  assert source.captions() == ['a real caption', 'second of a list']
  assert source.skipped == [
    ('1.png', 'caption is a value of type dict, not text (metadata.jsonl:2)'),
    ('2.png', 'caption is a value of type bool, not text (metadata.jsonl:3)'),
    ('3.png', 'caption is a list of int values, not text (metadata.jsonl:4)'),
    ('4.png', 'caption is a value of type int, not text (metadata.jsonl:5)'),
  ]
  with pytest.raises(sources.CaptionError, match='caption is not UTF-8'):
    sources._clean_caption(b'caf\xe9')
  assert sources._clean_caption([b'caf\xc3\xa9 ', 'x']) == 'caf\u00e9'


@pytest.mark.smoke
def test_hf_captions_that_are_not_utf8_or_not_text_are_counted_skips(tmp_path):
  datasets = pytest.importorskip('datasets')
  images = [Image.new('RGB', (8, 8), (i * 60, 10, 10)) for i in range(3)]
  image = datasets.Image()
  ds = datasets.Dataset.from_dict(
    {'image': images, 'text': [b'a cafe', b'caf\xe9', b'ok']},
    features=datasets.Features({'image': image, 'text': datasets.Value('binary')}),
  )
  ds.save_to_disk(str(tmp_path / 'bytes'))
  source = sources.build_source(_data_config(source='hf', path=str(tmp_path / 'bytes')))
  assert source.captions() == ['a cafe', 'ok']  # was 'caf\ufffd'
  assert source.skipped == [('train[1]', 'caption is not UTF-8')]
  ds = datasets.Dataset.from_dict({'image': images, 'text': [{'en': 'a dog'}] * 2 + [None]})
  ds.save_to_disk(str(tmp_path / 'dicts'))
  first = r"\(3 skipped; first: \[\('train\[0\]', 'caption is a value of type dict, not text'\)"
  with pytest.raises(DataError, match=first):
    sources.build_source(_data_config(source='hf', path=str(tmp_path / 'dicts')))
