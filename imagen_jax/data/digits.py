"""The labelled text-to-image benchmark: scikit-learn's bundled handwritten digits.

`sklearn.datasets.load_digits()` holds 1,797 real 8x8 scans (values 0..16, 10 classes) inside
the scikit-learn wheel, so nothing is downloaded. This module turns them into a data source
(`--config.data.source=digits`) and gives the evaluator (imagen_jax.evaluate) its prompts:

* split: a fixed, seeded (`SPLIT_SEED`, hash-based), stratified 80/20 split; `data.split` is 'train'
  (1,438 images) or 'test' (359). The two are disjoint; together they are the whole set.
* images: white digit on a black background (ink 16 -> 255, background 0 -> 0), upsampled
  from 8x8 with Pillow's bicubic filter to `data.resolution` minus an exactly-black border of
  R // 8 pixels per side (one source pixel), as RGB uint8 [R, R, 3]; the pipeline maps them
  to [-1, 1] (the border exactly -1).
* captions: `SEEN_TEMPLATES` name the class by word ('seven') or numeral ('7'); every image
  gets one seen template, cycling by its rank within its class, so each (class, template)
  pair has ~18 training images. Every caption is at most `MAX_CAPTION_CHARS` ASCII characters,
  so a byte-level tokenizer (t5-tiny-random) needs text.max_length >= 32 to keep the class
  name (shorter limits truncate it away). `HELDOUT_TEMPLATES` never appear in any caption
  of the source (train or test): they exist only in evaluation prompts, to test
  generalisation to unseen phrasings.

Records are `{'image': uint8 [R, R, 3], 'caption': str, 'id': 'digits-train[17]', 'label': int}`
(the id's index is the row of `load_digits()`).
"""

import functools
import hashlib

import numpy as np

from imagen_jax.data.sources import DataError, Source, _hash

DATASET_VERSION = 1  # bump when images, captions or the split change (text caches rebuild)
SPLIT_SEED = 20240611
TEST_FRACTION = 0.2
SPLITS = ('train', 'test')
MAX_VALUE = 16  # load_digits pixel range is 0..16

CLASS_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
NUM_CLASSES = len(CLASS_NAMES)

# '{word}' -> 'seven', '{numeral}' -> '7'.
SEEN_TEMPLATES = (
  'a handwritten digit {word}',
  'the number {numeral}, scanned',
  'a scan of a handwritten {word}',
  'digit {numeral}',
  '{word}',
  'a picture of the digit {numeral}',
  'the numeral {word}, by hand',
  'a {numeral} drawn with a pen',
)
HELDOUT_TEMPLATES = (
  'an image of the number {word}',
  'a handwritten {numeral}',
)

MAX_CAPTION_CHARS = 31


def caption(label: int, template: str) -> str:
  """`template` filled with class `label`'s word and numeral."""
  if not 0 <= int(label) < NUM_CLASSES:
    raise ValueError(f'label must be in [0, {NUM_CLASSES}), got {label}.')
  return template.format(word=CLASS_NAMES[int(label)], numeral=str(int(label)))


@functools.cache
def _raw() -> tuple[np.ndarray, np.ndarray]:
  """(scans [1797, 8, 8] uint8 in 0..16, labels [1797] int32), read-only."""
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:
    raise DataError(
      "data.source='digits' needs scikit-learn (pip install 'scikit-learn>=1.3')."
    ) from e
  bunch = load_digits()
  scans = np.asarray(bunch.images).round().astype(np.uint8)
  labels = np.asarray(bunch.target, np.int32)
  scans.setflags(write=False)
  labels.setflags(write=False)
  return scans, labels


def _row_key(row: int) -> bytes:
  """A seeded pseudo-random sort key per row (BLAKE2b: the same on every numpy version)."""
  return hashlib.blake2b(f'{SPLIT_SEED}:{row}'.encode(), digest_size=8).digest()


@functools.cache
def split_indices(split: str) -> np.ndarray:
  """Rows of `load_digits()` in `split`, sorted. Per class, rows are ordered by a seeded hash
  of their index; the first round(TEST_FRACTION * n_class) are 'test', the rest 'train'."""
  if split not in SPLITS:
    raise DataError(f'digits: data.split must be one of {SPLITS}, got {split!r}.')
  _, labels = _raw()
  is_test = np.zeros(len(labels), bool)
  for label in range(NUM_CLASSES):
    rows = sorted(np.flatnonzero(labels == label).tolist(), key=_row_key)
    is_test[rows[: round(TEST_FRACTION * len(rows))]] = True
  rows = np.flatnonzero(is_test if split == 'test' else ~is_test).astype(np.int64)
  rows.setflags(write=False)
  return rows


def upsample(scans: np.ndarray, resolution: int) -> np.ndarray:
  """[N, 8, 8] values 0..16 -> [N, R, R, 3] uint8 white-on-black.

  Each scan is resized (Pillow bicubic) to R - 2m pixels, m = R // 8 (one source pixel),
  and pasted in the centre, so every image has an exactly-black border of m pixels.
  """
  from PIL import Image

  if resolution < 1:
    raise DataError(f'data.resolution must be positive, got {resolution}.')
  margin = resolution // 8
  inner = resolution - 2 * margin
  grey = np.clip(np.rint(np.asarray(scans, np.float32) * (255.0 / MAX_VALUE)), 0, 255)
  grey = grey.astype(np.uint8)  # [N, 8, 8]
  out = np.zeros((len(grey), resolution, resolution, 3), np.uint8)
  for i, scan in enumerate(grey):
    image = Image.fromarray(scan, mode='L').resize((inner, inner), Image.Resampling.BICUBIC)
    out[i, margin : margin + inner, margin : margin + inner] = np.asarray(image)[..., None]
  return out


def template_ids(labels: np.ndarray) -> np.ndarray:
  """Seen-template index per image: its rank among same-class images, mod len(SEEN_TEMPLATES)."""
  labels = np.asarray(labels)
  ids = np.zeros(len(labels), np.int64)
  for label in range(NUM_CLASSES):
    where = np.flatnonzero(labels == label)
    ids[where] = np.arange(len(where)) % len(SEEN_TEMPLATES)
  return ids


@functools.cache
def load_split(split: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """(images [N, R, R, 3] uint8, labels [N] int32) of a whole split, in row order."""
  scans, labels = _raw()
  rows = split_indices(split)
  images = upsample(scans[rows], int(resolution))
  images.setflags(write=False)
  split_labels = np.array(labels[rows])
  split_labels.setflags(write=False)
  return images, split_labels


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1], exactly like the training pipeline."""
  return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


class DigitsSource(Source):
  """One split of the digits at one resolution; captions from `SEEN_TEMPLATES` only.

  The fingerprint ignores the resolution (the captions do not depend on it), so all
  resolutions share one text-embedding cache.
  """

  def __init__(self, *, split: str = 'train', resolution: int = 32, max_examples: int = 0):
    super().__init__()
    self.split, self.resolution = split, int(resolution)
    self.max_examples = int(max_examples)
    self.name = f'digits[{split}]'
    scans, labels = _raw()
    rows = split_indices(split)
    templates = template_ids(labels[rows])  # assigned on the whole split: stable subsets
    if self.max_examples > 0:
      rows, templates = rows[: self.max_examples], templates[: self.max_examples]
    self._rows = rows
    self._scans = scans
    self.labels = np.array(labels[rows])  # [N] int32
    self._captions = [
      caption(int(label), SEEN_TEMPLATES[t])
      for label, t in zip(self.labels, templates, strict=True)
    ]
    if self.resolution < 1:
      raise DataError(f'data.resolution must be positive, got {self.resolution}.')

  def __getitem__(self, index: int) -> dict:
    index = self._check_index(index)
    row = int(self._rows[index])
    image = upsample(self._scans[row][None], self.resolution)[0]  # [R, R, 3]
    return {
      'image': image,
      'caption': self._captions[index],
      'id': f'digits-{self.split}[{row}]',
      'label': int(self.labels[index]),
    }

  def fingerprint(self) -> str:
    return _hash(
      ['digits', DATASET_VERSION, SPLIT_SEED, self.split, self.max_examples, self._captions]
    )


def load_source(data_config) -> DigitsSource:
  """The digits source for `data_config` (split, resolution, max_examples)."""
  return DigitsSource(
    split=str(data_config.get('split', 'train')),
    resolution=int(data_config.resolution),
    max_examples=int(data_config.get('max_examples', 0)),
  )
