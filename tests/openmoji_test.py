"""The embedded default dataset: OpenMoji rendered from its colour font, named captions."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import openmoji, sources

pytestmark = pytest.mark.unit


def _data_config(root, resolution=16, max_examples=20) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      source='openmoji',
      path='',
      split='train',
      image_column='image',
      caption_column='text',
      render_cache_dir=str(root),
      resolution=resolution,
      lowres_resolution=0,
      random_crop=False,
      small_images='skip',
      max_skip_fraction=0.01,
      max_examples=max_examples,
      num_workers=0,
      prefetch=2,
    )
  )


def test_catalog_has_about_four_thousand_named_emoji():
  catalog = openmoji.emoji_catalog()
  assert 3800 <= openmoji.available_count() == len(catalog) <= 5000
  captions = {code: caption for code, _, caption in catalog}
  assert captions['1F600'] == 'grinning face'
  assert captions['1F469-200D-1F52C'] == 'woman scientist'
  assert captions['1F1EB-1F1F7'] == 'flag of France'
  assert all(c.strip() == c and c for c in captions.values())
  assert not any(code.startswith('E0') for code in captions)  # private-use extras: no name


def test_render_subset_and_reuse(tmp_path):
  config = _data_config(tmp_path / 'openmoji')
  source = sources.build_source(config)
  assert len(source) == 20  # none of the first 20 renders blank
  folder = tmp_path / 'openmoji' / '16-first20'
  rows = [json.loads(line) for line in (folder / 'metadata.jsonl').read_text().splitlines()]
  assert len(rows) == 20 and all(r['text'] for r in rows)
  assert source.captions() == [r['text'] for r in rows]
  for i in range(len(source)):
    record = source[i]
    image = np.asarray(Image.open(record['image']))
    assert image.shape == (16, 16, 3)
    assert (image < 250).any(), record['id']  # not blank white
    assert (image[0] == 255).all() and (image[:, 0] == 255).all()  # white margin
  # The second use reuses the render (same files, untouched).
  mtime = (folder / 'metadata.jsonl').stat().st_mtime_ns
  again = sources.build_source(config)
  assert (folder / 'metadata.jsonl').stat().st_mtime_ns == mtime
  assert again.fingerprint() == source.fingerprint()
  assert not [p for p in (tmp_path / 'openmoji').iterdir() if p.name.startswith('.tmp')]


def test_a_render_another_process_finished_meanwhile_is_kept(tmp_path, monkeypatch):
  # Two hosts rendering into one shared folder: the one that finished second moved the first's
  # complete render aside as stale and deleted it while the first was reading it, which then
  # found no files ("No usable (image, caption) pair").
  root = tmp_path / 'openmoji'
  folder = openmoji.render_dataset(root, 16, max_examples=4)
  inode = (folder / 'metadata.jsonl').stat().st_ino
  is_complete = openmoji._is_complete
  calls = []

  def not_yet_on_the_first_look(path, info):  # this renderer started before the other finished
    calls.append(path)
    return len(calls) > 1 and is_complete(path, info)

  monkeypatch.setattr(openmoji, '_is_complete', not_yet_on_the_first_look)
  assert openmoji.render_dataset(root, 16, max_examples=4) == folder
  assert (folder / 'metadata.jsonl').stat().st_ino == inode  # the first render, untouched
  assert [p.name for p in root.iterdir()] == [folder.name]  # no temporary or stale folder left


def test_fingerprint_is_shared_across_resolutions(tmp_path):
  small = sources.build_source(_data_config(tmp_path, resolution=8, max_examples=5))
  large = sources.build_source(_data_config(tmp_path, resolution=24, max_examples=5))
  assert small.captions() == large.captions()
  assert small.fingerprint() == large.fingerprint()  # one text cache for every stage
  assert np.asarray(Image.open(large[0]['image'])).shape == (24, 24, 3)


def test_colour_rendering_of_a_known_emoji():
  image = np.asarray(openmoji.render_emoji('\U0001f600', 32)).astype(int)  # grinning face
  yellow = (image[..., 0] > 200) & (image[..., 1] > 150) & (image[..., 2] < 100)
  assert yellow.mean() > 0.2  # drawn in colour, not as a black outline
