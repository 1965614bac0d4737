"""Random-access (grain-compatible) sources of (image, caption) pairs.

`build_source(config.data)` dispatches on `config.data.source`:

* 'openmoji': the embedded default dataset, rendered once (see `openmoji.py`).
* 'folder':   a local folder, either in the Hugging Face `imagefolder` convention
              (`metadata.jsonl` / `metadata.csv` with `file_name` and the caption column)
              or image files with sidecar captions (`cat.png` + `cat.txt`), recursive; with
              split folders (`train/`, `test/`, ...) at its top, the one named `data.split`.
* 'hf':       `datasets.load_dataset(path, split=...)` (hub name or local script/data
              folder) or a folder written by `Dataset.save_to_disk`.
* 'tfds':     `tfds.data_source(path, split=...)` (array_record; no TensorFlow needed).
* 'digits':   scikit-learn's bundled 8x8 handwritten digits, upsampled, captioned from
              templates, with an integer 'label' per record (see `digits.py`).
* 'webdataset': tar shards as img2dataset writes them (`key.jpg` + `key.txt`): a folder,
              a brace pattern `shards/{00000..00099}.tar` or a glob (see `webdataset.py`).
* 'arrayrecord': ArrayRecord files of serialized tf.train.Example (image bytes + caption).

Records are `{'image': <path | bytes | HF image dict | array>, 'caption': str, 'id': str}`;
images are decoded later (in grain workers) by `preprocess.py`. Pairs with a missing or
empty caption, or one that is not text (bytes that are not UTF-8, a dict, a bool, a number), are
skipped at listing time with a warning naming them, and counted in `Source.skipped`.
`Source.image_sizes()` gives the sizes known without decoding (metadata, file headers), which
the pipeline uses to drop too-small images (see `sizes.py`).
"""

import csv
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from imagen_jax.data import sizes as sizes_lib

log = logging.getLogger(__name__)

# Formats Pillow registers for opening that it cannot decode by itself: stubs (a handler must be
# installed), MPEG (identified, never decoded), EPS/PS (needs Ghostscript).
_UNDECODABLE_FORMATS = frozenset({'BUFR', 'GRIB', 'HDF5', 'WMF', 'MPEG', 'EPS'})


def _pillow_image_extensions() -> frozenset[str]:
  """Lowercase file extensions ('.png') of the formats this Pillow can open and decode (an
  .avif, .jpe, .apng or .qoi beside its .txt was left out of a sidecar folder by a fixed list)."""
  from PIL import Image

  return frozenset(
    ext.lower()
    for ext, fmt in Image.registered_extensions().items()
    if fmt in Image.OPEN and fmt not in _UNDECODABLE_FORMATS
  ) | {'.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff', '.ppm', '.pgm', '.jfif'}


IMAGE_EXTENSIONS = _pillow_image_extensions()
# Text files of a sidecar folder that are documentation, not a caption without its image.
_NOT_CAPTION_FILES = frozenset(
  'readme license licence copying notice authors changelog citation requirements'.split()
)
_METADATA_FILES = ('metadata.jsonl', 'metadata.csv')
# Folder names that make a folder dataset's top level a set of splits (Hugging Face imagefolder).
_SPLIT_FOLDERS = frozenset(
  'train training test testing validation valid val dev eval evaluation'.split()
)
_MAX_LOGGED_SKIPS = 50
SOURCE_KINDS = ('openmoji', 'folder', 'hf', 'tfds', 'digits', 'webdataset', 'arrayrecord')


class DataError(ValueError):
  """A data problem the user has to fix; the message says what and how."""


def _hash(payload: Any) -> str:
  text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
  # surrogateescape: a file name that is not UTF-8 (a Latin-1 name from an old zip) reaches
  # Python as lone surrogates, which strict UTF-8 refuses (the whole listing failed).
  return hashlib.sha256(text.encode('utf-8', 'surrogateescape')).hexdigest()[:16]


def walk_files(root: pathlib.Path) -> list[pathlib.Path]:
  """Every file under `root`, sorted. Symlinked folders are followed (Path.rglob left them out
  without a word), each real folder once, so a link loop ends; hidden files and folders
  ('.name') and macOS's __MACOSX folders are left out: a macOS zip unpacked elsewhere holds
  '__MACOSX/._a.png' metadata next to every image, which is not one."""
  files, seen = [], set()
  for folder, subfolders, names in os.walk(root, followlinks=True):
    stat = os.stat(folder)
    if (stat.st_dev, stat.st_ino) in seen:
      subfolders[:] = []
      continue
    seen.add((stat.st_dev, stat.st_ino))
    subfolders[:] = [d for d in subfolders if not d.startswith('.') and d != '__MACOSX']
    files += [pathlib.Path(folder, n) for n in names if not n.startswith('.')]
  return sorted(files)


def read_caption_file(data: bytes) -> str | None:
  """A caption file's text: UTF-8, with or without a byte-order mark; None when it is not UTF-8
  (a UTF-16 'Unicode' file read leniently became a caption of NULs and replacement marks)."""
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError:
    return None


class CaptionError(ValueError):
  """A caption value that is not usable text; its message is the reason the pair is skipped."""


def _clean_caption(caption: Any) -> str:
  """Captions as stripped strings ('' for a missing one); a list of captions keeps its first
  non-empty one. Raises CaptionError for bytes that are not UTF-8 and for values that are not
  text (a dict, a bool, a number: their str() was trained on, e.g. "{'en': 'a dog'}")."""
  if isinstance(caption, np.ndarray):  # a tfds sequence feature
    caption = caption.tolist()
  if isinstance(caption, list | tuple):
    error = None
    for item in caption:
      try:
        text = _clean_caption(item)
      except CaptionError as e:
        error = error or e
        continue
      if text:
        return text
    if error is not None:
      kinds = sorted({type(c).__name__ for c in caption if not isinstance(c, str | bytes | None)})
      raise (
        CaptionError(f'caption is a list of {"/".join(kinds)} values, not text') if kinds else error
      )
    return ''
  if isinstance(caption, bytes):
    try:
      caption = caption.decode('utf-8')
    except UnicodeDecodeError:
      raise CaptionError('caption is not UTF-8') from None
  if caption is None or (isinstance(caption, float) and math.isnan(caption)):
    return ''  # NaN: pandas' missing value, which json.dumps writes as the bare NaN
  if not isinstance(caption, str):
    raise CaptionError(f'caption is a value of type {type(caption).__name__}, not text')
  try:
    caption.encode('utf-8')
  except UnicodeEncodeError:  # half a surrogate pair, e.g. from the JSON escape '\\ud83d'
    caption = ''.join('\ufffd' if '\ud800' <= c <= '\udfff' else c for c in caption)
  return caption.strip()


class Source:
  """Base class: random access to `{'image', 'caption', 'id'}` records.

  Subclasses fill `self.name`, `self._captions` (index order) and `self.skipped`
  (`(id, reason)` pairs dropped while listing), and implement `__getitem__`; one whose
  `max_examples` cuts the usable pairs after listing them sets `self._num_listed`.
  """

  name: str = 'source'
  _num_listed: int | None = None  # None: nothing was cut after the listing
  # How `num_skipped` weighs some skips (a lost shard stands for many pairs), for the message.
  skip_note: str = ''

  def __init__(self):
    self._captions: list[str] = []
    self.skipped: list[tuple[str, str]] = []

  def __len__(self) -> int:
    return len(self._captions)

  def num_listed(self) -> int:
    """Items listed: the usable ones and the skipped ones, before `max_examples` kept the first
    usable ones (the skipped list covers the whole listing, so the count must too)."""
    if self._num_listed is not None:
      return self._num_listed
    return len(self) + self.num_skipped()

  def num_skipped(self) -> int:
    """Skipped items as counted toward data.max_skip_fraction: one per entry of `skipped`,
    unless a subclass weighs some (a lost webdataset shard counts as the pairs it held)."""
    return len(self.skipped)

  def __getitem__(self, index: int) -> dict:
    raise NotImplementedError

  def captions(self) -> list[str]:
    """All captions in index order (input of the text-embedding precompute)."""
    return list(self._captions)

  def fingerprint(self) -> str:
    raise NotImplementedError

  def image_sizes(self) -> np.ndarray:
    """[N, 2] int32 (width, height) per index, known without decoding pixels; 0 = unknown.

    Unknown sizes are checked when the image is decoded. The base class knows none.
    """
    return np.zeros((len(self), 2), np.int32)

  def _skip(self, item_id: str, reason: str) -> None:
    if len(self.skipped) < _MAX_LOGGED_SKIPS:
      log.warning('%s: skipping %s: %s', self.name, item_id, reason)
    elif len(self.skipped) == _MAX_LOGGED_SKIPS:
      log.warning('%s: more skipped items; only counting from now on.', self.name)
    self.skipped.append((item_id, reason))

  def _check_index(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'{self.name}: index {index} out of range [0, {len(self)})')
    return index

  def __repr__(self) -> str:
    return f'{type(self).__name__}(name={self.name!r}, len={len(self)})'


class FolderSource(Source):
  """Images in a local folder with `metadata.jsonl`/`metadata.csv` or sidecar `.txt` captions.

  A folder whose top level holds split folders (`train/`, `test/`, `validation/`, ...: the
  imagefolder layout) is read from its folder named `split`; without one, a DataError names
  the split folders found.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    *,
    split: str = 'train',
    caption_column: str = 'text',
    max_examples=0,
  ):
    super().__init__()
    self.root = pathlib.Path(path).expanduser().resolve()
    self.caption_column = caption_column
    self.max_examples = int(max_examples)
    self._meta_sizes: dict[str, tuple[int, int]] = {}  # from metadata width/height fields
    self._bad_row_images: set[str] = set()  # images named by metadata.csv rows skipped as bad
    self._sizes: np.ndarray | None = None
    if not self.root.is_dir():
      raise DataError(
        f'Image folder {self.root} does not exist or is not a directory; set '
        '--config.data.path to a folder of images with metadata.jsonl or .txt captions.'
      )
    self.root = self._split_root(self.root, split)
    self.name = f'folder:{self.root}'
    files = walk_files(self.root)
    metadata_files = [p for p in files if p.name in _METADATA_FILES and p.is_file()]
    if metadata_files:
      pairs, named = self._list_from_metadata(metadata_files)
      self._warn_unlisted(files, metadata_files, named)
    else:
      pairs = self._list_from_sidecars(files)
    self._num_listed = len(pairs) + len(self.skipped)
    if self.max_examples > 0:
      pairs = pairs[: self.max_examples]
    if not pairs:
      raise DataError(
        f'No usable (image, caption) pair in {self.root} ({len(self.skipped)} skipped). '
        f"Provide metadata.jsonl lines like {{'file_name': 'a.png', "
        f"'{caption_column}': 'a caption'}} or a sidecar a.txt per image."
      )
    self._files = [p for p, _ in pairs]
    self._captions = [c for _, c in pairs]
    self._fingerprint = self._listing_fingerprint()

  @staticmethod
  def _split_root(root: pathlib.Path, split: str) -> pathlib.Path:
    """`root/split` when root's top level holds split folders (else root itself)."""
    splits = sorted(
      p.name for p in root.iterdir() if p.name.lower() in _SPLIT_FOLDERS and p.is_dir()
    )
    if not splits:
      return root
    if split in splits:
      return root / split
    raise DataError(
      f'Image folder {root} holds the split folders {splits}, none named {split!r} '
      '(data.split); set --config.data.split to one of them or point --config.data.path '
      'at the split folder to read.'
    )

  def _list_from_metadata(self, metadata_files: Sequence[pathlib.Path]) -> tuple[list, set]:
    """(pairs, every image a row names) of every metadata file; an image listed by metadata
    files in several folders takes its rows from the nearest one (as Hugging Face's
    imagefolder), not from all of them (each listing was another copy of the image in every
    epoch)."""
    folders = [m.parent for m in metadata_files]
    both = sorted({f for f in folders if folders.count(f) > 1})
    if both:
      raise DataError(
        f'{both[0]} holds both metadata.jsonl and metadata.csv: every image they both list would '
        'be seen twice per epoch. Keep one of them.'
      )
    rows, nearest = [], {}  # nearest: image -> depth of the deepest metadata folder listing it
    named = set()
    for meta in metadata_files:
      meta_rows = list(self._read_metadata(meta))
      self._check_columns(meta, [row for _, row in meta_rows])
      for line_no, row in meta_rows:
        rel_meta = f'{meta.relative_to(self.root)}:{line_no}'
        file_name = row.get('file_name')
        if file_name is not None and (not isinstance(file_name, str) or '\0' in file_name):
          self._skip(rel_meta, f"'file_name' {file_name!r:.80} is not a file name string")
          continue
        if not file_name:
          self._skip(rel_meta, "no 'file_name' field")
          continue
        image_path = (meta.parent / file_name).resolve()
        rel = os.path.relpath(image_path, self.root)
        named.add(rel)
        if not image_path.is_file():
          self._skip(rel, f'listed in {rel_meta} but the file does not exist')
          continue
        if self.caption_column not in row:
          self._skip(rel, f"no caption column '{self.caption_column}' in {rel_meta}")
          continue
        try:
          caption = _clean_caption(row[self.caption_column])
        except CaptionError as e:
          self._skip(rel, f'{e} ({rel_meta})')
          continue
        if not caption:
          self._skip(rel, f'empty caption in {rel_meta}')
          continue
        depth = len(meta.parent.parts)
        nearest[rel] = max(depth, nearest.get(rel, depth))
        rows.append((rel, caption, depth, rel_meta, sizes_lib.size_from_fields(row)))
    pairs, superseded = [], []
    for rel, caption, depth, rel_meta, size in rows:
      if depth < nearest[rel]:  # the layout README describes, not bad data: not a skip
        superseded.append(f'{rel} ({rel_meta})')
        continue
      if size is not None:
        self._meta_sizes[rel] = size
      pairs.append((rel, caption))
    if superseded:
      log.info(
        '%s: %d rows list an image that a nearer metadata file also lists; the nearer rows are '
        'used (first unused: %s).',
        self.name,
        len(superseded),
        superseded[0],
      )
    return sorted(pairs), named | self._bad_row_images

  def _check_columns(self, meta: pathlib.Path, rows: Sequence[dict]) -> None:
    """DataError when no row of a metadata file has the image name ('file_name') or the caption
    column: the data is fine but the setting is not (each row was a warning and a skip)."""
    columns = sorted({str(k) for row in rows for k in row if k is not None})
    shown = ', '.join(repr(c) for c in columns[:20]) + (', ...' if len(columns) > 20 else '')
    if rows and not any('file_name' in row for row in rows):
      raise DataError(
        f"{meta}: no row has a 'file_name' column (its columns: {shown}). Folder datasets name "
        "each image in 'file_name' (Hugging Face imagefolder); rename that column in the file "
        '(--config.data.image_column applies to hf, tfds and arrayrecord sources, not folders).'
      )
    if rows and not any(self.caption_column in row for row in rows):
      raise DataError(
        f'{meta}: no row has the caption column {self.caption_column!r} '
        f'(data.caption_column); its columns: {shown}. Set --config.data.caption_column to '
        'the column that holds the captions.'
      )

  def _warn_unlisted(
    self, files: Sequence[pathlib.Path], metadata_files: Sequence[pathlib.Path], named: set[str]
  ) -> None:
    """One warning for the images no metadata file names: with metadata files, sidecar
    captions are not read, so a folder mixing both layouts lost its sidecar pairs silently."""
    unlisted = []
    for path in files:
      if path.suffix.lower() not in IMAGE_EXTENSIONS or os.path.relpath(path, self.root) in named:
        continue
      rel = os.path.relpath(path.resolve(), self.root)  # rows name images by resolved path
      if rel not in named and path.is_file():
        unlisted.append(rel)
    if unlisted:
      metas = ', '.join(str(m.relative_to(self.root)) for m in metadata_files[:3])
      log.warning(
        '%s: %d images are listed in no metadata file (%s%s) and are left out, e.g. %s; with '
        'metadata files .txt captions are not read: list these images in a metadata file, '
        'or move them to a folder of their own.',
        self.name,
        len(unlisted),
        metas,
        ', ...' if len(metadata_files) > 3 else '',
        unlisted[0],
      )

  def _read_metadata(self, meta: pathlib.Path):
    """(line number, row) of a metadata.csv / metadata.jsonl, read as UTF-8 with or without a
    byte-order mark (Excel's 'CSV UTF-8' writes one); other encodings are a DataError, and so
    is malformed CSV (an unclosed quote, a field over csv's size limit): read leniently, one
    unclosed quote would swallow every later row without a word."""
    try:
      yield from self._metadata_rows(meta)
    except UnicodeDecodeError as e:
      raise DataError(
        f'{meta} is not UTF-8 text ({e}); save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).'
      ) from e

  def _metadata_rows(self, meta: pathlib.Path):
    if meta.suffix == '.csv':
      with open(meta, newline='', encoding='utf-8-sig') as f:
        # skipinitialspace: 'file_name, text' (a space after each comma) is the header
        # 'file_name', 'text' and a quoted field after ', ' is still quoted.
        reader = csv.DictReader(f, strict=True, skipinitialspace=True)
        try:
          if reader.fieldnames:
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
          for line_no, row in enumerate(reader, start=2):
            bad = _csv_field_count_error(reader.fieldnames, row)
            if bad:
              rel_meta = meta.relative_to(self.root)
              self._skip(f'{rel_meta}:{line_no}', f'{rel_meta} line {line_no} has {bad}')
              file_name = row.get('file_name')
              if isinstance(file_name, str) and file_name and '\0' not in file_name:
                # its image is listed, by a bad row: not one of the unlisted images
                self._bad_row_images.add(
                  os.path.relpath((meta.parent / file_name).resolve(), self.root)
                )
            else:
              yield line_no, row
        except csv.Error as e:
          raise DataError(
            f'{meta} is not valid CSV at line {reader.reader.line_num} ({e}). Fix that row or '
            'one above it (an unclosed quote runs on to the end of the file; a field holding a '
            'comma, a quote or a line break goes in double quotes, its quotes doubled; a field '
            f'has at most {csv.field_size_limit()} characters), or write metadata.jsonl instead.'
          ) from e
      return
    with open(meta, encoding='utf-8-sig') as f:
      for line_no, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          self._skip(f'{meta.relative_to(self.root)}:{line_no}', f'invalid JSON ({e})')
          continue
        if isinstance(row, dict):
          yield line_no, row
        else:
          self._skip(f'{meta.relative_to(self.root)}:{line_no}', 'line is not a JSON object')

  def _list_from_sidecars(self, files: Sequence[pathlib.Path]) -> list:
    """Images with a same-stem .txt caption; a caption file with no readable image beside it (a
    broken link, a format Pillow does not read) is a skip too (it was left out silently)."""
    pairs, captioned = [], set()
    for path in files:
      if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
        continue
      rel = str(path.relative_to(self.root))
      sidecar = path.with_suffix('.txt')
      captioned.add(sidecar)
      if not sidecar.is_file():
        self._skip(rel, f'no caption file {sidecar.name}')
        continue
      text = read_caption_file(sidecar.read_bytes())
      if text is None:
        self._skip(rel, f'caption file {sidecar.name} is not UTF-8 text; save it as UTF-8')
        continue
      caption = _clean_caption(text)
      if not caption:
        self._skip(rel, f'empty caption file {sidecar.name}')
        continue
      pairs.append((rel, caption))
    self._skip_orphan_captions(files, captioned)
    return pairs

  def _skip_orphan_captions(self, files: Sequence[pathlib.Path], captioned: set) -> None:
    orphans = [
      p
      for p in files
      if p.suffix == '.txt'
      and p not in captioned
      and p.stem.lower() not in _NOT_CAPTION_FILES
      and p.is_file()
    ]
    if not orphans:
      return
    by_stem: dict[pathlib.Path, list[str]] = {}
    for p in files:
      if p.suffix != '.txt':
        by_stem.setdefault(p.with_suffix(''), []).append(p.name)
    for txt in orphans:
      rel = str(txt.relative_to(self.root))
      others = by_stem.get(txt.with_suffix(''), [])
      if others:
        self._skip(
          rel,
          f'caption file with no readable image beside it: {", ".join(others[:3])} is a broken '
          'link, not a file, or not an image format Pillow reads',
        )
      else:
        self._skip(rel, f'caption file with no image beside it (no {txt.stem}.png/.jpg/...)')

  def __getitem__(self, index: int) -> dict:
    index = self._check_index(index)
    rel = self._files[index]
    return {'image': str(self.root / rel), 'caption': self._captions[index], 'id': rel}

  def fingerprint(self) -> str:
    return self._fingerprint

  def image_sizes(self) -> np.ndarray:
    """From the metadata's width/height fields, else from the file headers (cached)."""
    if self._sizes is None:

      def read(rel):
        return self._meta_sizes.get(rel) or sizes_lib.read_size(self.root / rel)

      self._sizes = sizes_lib.read_sizes(self._files, read, name=self.name)
    return self._sizes

  def _listing_fingerprint(self) -> str:
    """Taken when the folder is listed: names, sizes, mtimes and captions."""
    listing = []
    for rel, caption in zip(self._files, self._captions, strict=True):
      stat = (self.root / rel).stat()
      listing.append((rel, stat.st_size, stat.st_mtime_ns, caption))
    return _hash(['folder', str(self.root), self.caption_column, self.max_examples, listing])


def _csv_field_count_error(header: Sequence[str], row: dict) -> str:
  """What is wrong with a csv.DictReader row that does not fit its header ('' when it fits):
  DictReader puts the fields past the header under the key None (a caption 'a red car, parked'
  was 'a red car') and gives missing fields the value None. Empty fields past the header (a
  trailing comma) hold nothing that is lost."""
  extra = row.get(None) or []
  missing = sum(value is None for key, value in row.items() if key is not None)
  if not any(field.strip() for field in extra) and not missing:
    return ''
  found = len(header) + len(extra) if extra else len(header) - missing
  return (
    f'{found} fields but the header has {len(header)} ({", ".join(header)}): quote a caption '
    'that contains commas (or a line break) in double quotes, e.g. img.png,"a red car, parked"'
  )


def _is_saved_dataset_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and any(
    (path / f).is_file() for f in ('dataset_info.json', 'state.json', 'dataset_dict.json')
  )


class _RowSource(Source):
  """A source over an indexable dataset of rows (HF datasets, tfds): rows with a caption.

  Records are read from `self._rows`, whose image column is left encoded (bytes, HF image
  dicts): the image is decoded in preprocess, where a broken one is skipped and counted.
  """

  split: str
  image_column: str
  max_examples: int
  _rows: Any

  def _index_rows(self, captions: Iterable[Any]) -> None:
    """Keep the rows whose caption is usable, up to max_examples; captions in row order."""
    self._indices: list[int] = []
    for i, caption in enumerate(captions):
      try:
        caption = _clean_caption(caption)
      except CaptionError as e:
        self._skip(f'{self.split}[{i}]', str(e))
        continue
      if not caption:
        self._skip(f'{self.split}[{i}]', 'empty or missing caption')
        continue
      self._indices.append(i)
      self._captions.append(caption)
      if 0 < self.max_examples <= len(self._indices):
        break
    if not self._indices:
      raise DataError(
        f'No usable (image, caption) pair in {self.name} ({len(self.skipped)} skipped; first: '
        f'{self.skipped[:3]}).'
      )

  def __getitem__(self, index: int) -> dict:
    index = self._check_index(index)
    row = self._rows[self._indices[index]]
    return {
      'image': row[self.image_column],
      'caption': self._captions[index],
      'id': f'{self.split}[{self._indices[index]}]',
    }


class HFSource(_RowSource):
  """A Hugging Face `datasets` split (hub name, local data folder or `save_to_disk` folder)."""

  def __init__(
    self,
    path: str,
    *,
    split: str = 'train',
    image_column: str = 'image',
    caption_column: str = 'text',
    max_examples: int = 0,
  ):
    super().__init__()
    import datasets  # heavy import, only when used

    _require_path('hf', path)
    self.name = f'hf:{path}[{split}]'
    self.path, self.split = path, split
    self.image_column, self.caption_column = image_column, caption_column
    self.max_examples = int(max_examples)
    local = pathlib.Path(path).expanduser()
    try:
      if _is_saved_dataset_dir(local):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
          if split not in ds:
            raise DataError(
              f'{path} has splits {list(ds)}, not {split!r}; set --config.data.split.'
            )
          ds = ds[split]
      else:
        ds = datasets.load_dataset(path, split=split)
    except DataError:
      raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message.
      raise DataError(
        f'Could not load Hugging Face dataset {path!r} split {split!r}: '
        f'{type(e).__name__}: {e}. Check the name/path and split; offline, use a local '
        'folder or a save_to_disk folder.'
      ) from e
    missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
    if missing:
      raise DataError(
        f'{self.name} has no column(s) {missing}; its columns are {ds.column_names}. '
        'Set --config.data.image_column / --config.data.caption_column.'
      )
    if isinstance(ds.features[image_column], datasets.Image):
      # Keep encoded bytes: decoding happens (robustly) in preprocess, in grain workers.
      ds = ds.cast_column(image_column, datasets.Image(decode=False))
    self._ds = ds
    # Reads decode nothing else: another image column (a broken 'conditioning_image') is not
    # decoded (nor its failure raised) for every training example.
    self._rows = ds.select_columns([image_column])
    self._fp = getattr(ds, '_fingerprint', '')
    self._index_rows(ds[caption_column])
    self._size_columns = sizes_lib.size_columns(ds.column_names)

  def image_sizes(self) -> np.ndarray:
    """From `width` / `height` columns (any case) when the dataset has them."""
    if self._size_columns is None:
      return super().image_sizes()
    rows = np.asarray(self._indices)
    width, height = (_positive_ints(self._ds[c])[rows] for c in self._size_columns)
    return np.stack([width, height], axis=1)

  def fingerprint(self) -> str:
    return _hash(
      ['hf', self.path, self.split, self.image_column, self.caption_column, self._fp]
      + [self.max_examples, _hash(self._captions)]
    )


class TfdsSource(_RowSource):
  """A tfds dataset through `tfds.data_source` (array_record files; TensorFlow not needed)."""

  def __init__(
    self,
    name: str,
    *,
    split: str = 'train',
    data_dir: str | None = None,
    image_column: str = 'image',
    caption_column: str = 'text',
    max_examples: int = 0,
  ):
    super().__init__()
    _require_path('tfds', name)
    self.name = f'tfds:{name}[{split}]'
    self.tfds_name, self.split, self.data_dir = name, split, data_dir
    self.image_column, self.caption_column = image_column, caption_column
    self.max_examples = int(max_examples)
    try:
      import tensorflow_datasets as tfds

      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message.
      raise DataError(
        f'Could not open tfds dataset {name!r} split {split!r} '
        f'(data_dir={data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets"}): '
        f'{type(e).__name__}: {e}. tfds.data_source reads prepared array_record files: '
        f'prepare them once with `tfds build {name} --file_format=array_record` '
        '(on a machine with TensorFlow) and point TFDS_DATA_DIR at them.'
      ) from e

    row_sizes: list[tuple[int, int] | None] = []
    self._rows = listing = self._undecoded_images(tfds)

    def captions():
      for i in range(len(listing)):
        record = listing[i]
        if i == 0:
          missing = [c for c in (image_column, caption_column) if c not in record]
          if missing:
            raise DataError(
              f'{self.name} has no feature(s) {missing}; its features are {sorted(record)}. '
              'Set --config.data.image_column / --config.data.caption_column.'
            )
        row_sizes.append(_record_size(record, image_column))
        yield record[caption_column]

    self._index_rows(captions())
    self._sizes = sizes_lib.as_array([row_sizes[i] for i in self._indices])

  def _undecoded_images(self, tfds: Any) -> Any:
    """The split with its encoded images (every `Image` feature) left as bytes, for listing and
    reads; else the split itself.

    Listing reads every record; decoding each image there (tens of ms for a large JPEG) made
    every start of a big dataset take minutes. An `Image` feature's bytes give the size from
    their header; other image features (a plain Tensor) are read as they are. Reads get the
    bytes too: preprocess decodes them, skipping (and counting) a corrupt image instead of
    raising out of the pipeline.
    """
    features = getattr(getattr(self._ds, 'dataset_info', None), 'features', None)
    try:
      skip = {
        name: tfds.decode.SkipDecoding()
        for name, feature in features.items()
        if isinstance(feature, tfds.features.Image)
      }
      if not skip:
        return self._ds
      return tfds.data_source(
        self.tfds_name,
        split=self.split,
        data_dir=self.data_dir,
        download=False,
        decoders=skip,
      )
    except Exception:  # noqa: BLE001 - no feature info or no skip: list the decoded records.
      return self._ds

  def image_sizes(self) -> np.ndarray:
    """Width/height features, else the image's size (its header's or its shape), from listing."""
    return self._sizes

  def fingerprint(self) -> str:
    return _hash(
      ['tfds', self.tfds_name, self.split, str(self.data_dir), self.image_column]
      + [self.caption_column, self.max_examples, len(self._ds), _hash(self._captions)]
    )


def _positive_ints(values: Iterable[Any]) -> np.ndarray:
  """int32 values; 0 for missing, non-numeric or non-positive entries."""
  out = []
  for v in values:
    try:
      out.append(max(int(v), 0))
    except (TypeError, ValueError):
      out.append(0)
  return np.asarray(out, np.int32)


def _record_size(record: dict, image_column: str) -> tuple[int, int] | None:
  """(width, height) of a decoded tfds record: its width/height features, else the image."""
  size = sizes_lib.size_from_fields(record)
  if size is not None:
    return size
  image = record.get(image_column)
  if isinstance(image, np.ndarray) and image.ndim >= 2:
    return int(image.shape[1]), int(image.shape[0])
  if isinstance(image, bytes):
    return sizes_lib.read_size(image)
  return None


def check_skip_fraction(source: Source, max_skip_fraction: float) -> None:
  """Raises DataError when more than `max_skip_fraction` of the listed pairs were dropped.

  The listing is complete here, so the whole dataset is the denominator (no minimum count).
  """
  total, skipped = source.num_listed(), source.num_skipped()
  if total and skipped / total > max_skip_fraction:
    examples = '; '.join(f'{i}: {r}' for i, r in source.skipped[:5])
    note = f' ({source.skip_note})' if source.skip_note else ''
    raise DataError(
      f'{source.name}: {skipped} of {total} listed items have no usable caption or file{note} '
      f'({skipped / total:.1%} > data.max_skip_fraction={max_skip_fraction}). First ones: '
      f'{examples}. Fix the data or raise --config.data.max_skip_fraction.'
    )


_NEEDS_PATH = {
  'folder': '/path/to/images',
  'hf': "a hub name such as 'lambdalabs/naruto-blip-captions', a local data folder or a "
  'save_to_disk folder',
  'tfds': 'a tfds dataset name',
  'webdataset': "a folder of shards, or a pattern such as 'shards/{00000..00099}.tar'",
  'arrayrecord': 'a folder of .array_record shards, or a glob',
}


def check_source_kind(data_config) -> None:
  """DataError for an unknown `data.source`, or one that needs `data.path` without it: checked
  before a run writes anything (the sources raise the same when built)."""
  kind = data_config.source
  if kind not in SOURCE_KINDS:
    raise DataError(f'Unknown data.source {kind!r}; choose one of {SOURCE_KINDS}.')
  if kind in _NEEDS_PATH:
    _require_path(kind, data_config.get('path', ''))
  elif data_config.get('path'):  # the embedded sets read no path: it trained on them instead
    raise DataError(
      f"data.path={data_config.path!r} but data.source='{kind}' (an embedded set) reads no "
      f'path; to train on it, also pass --config.data.source=folder (or hf, tfds, webdataset, '
      'arrayrecord), or drop data.path.'
    )
  if kind == 'openmoji' and data_config.get('split', 'train') != 'train':
    raise DataError(
      f"data.split={data_config.split!r} but data.source='openmoji' has no splits (every emoji "
      "is in 'train'); drop data.split."
    )


def _require_path(kind: str, path: str | None) -> None:
  """DataError for a source that needs `data.path` (`_NEEDS_PATH`) given none."""
  if not path:
    raise DataError(f"data.source='{kind}' needs --config.data.path: {_NEEDS_PATH[kind]}.")


def build_source(data_config) -> Source:
  """The source named by `data_config.source`, limited to `max_examples` (> 0)."""
  check_source_kind(data_config)
  kind = data_config.source
  max_examples = int(data_config.get('max_examples', 0))
  if kind == 'openmoji':
    from imagen_jax.data import openmoji

    source = openmoji.load_source(data_config)
  elif kind == 'digits':
    from imagen_jax.data import digits

    source = digits.load_source(data_config)
  elif kind == 'folder':
    source = FolderSource(
      data_config.path,
      split=data_config.split,
      caption_column=data_config.caption_column,
      max_examples=max_examples,
    )
  elif kind == 'hf':
    source = HFSource(
      data_config.path,
      split=data_config.split,
      image_column=data_config.image_column,
      caption_column=data_config.caption_column,
      max_examples=max_examples,
    )
  elif kind == 'tfds':
    source = TfdsSource(
      data_config.path,
      split=data_config.split,
      data_dir=data_config.get('data_dir', None) or None,
      image_column=data_config.image_column,
      caption_column=data_config.caption_column,
      max_examples=max_examples,
    )
  elif kind == 'webdataset':
    from imagen_jax.data import webdataset

    source = webdataset.WebDatasetSource(
      data_config.path,
      caption_column=data_config.caption_column,
      max_examples=max_examples,
      index_dir=data_config.get('index_dir', '') or '',
    )
  else:  # 'arrayrecord', the last of SOURCE_KINDS (check_source_kind refused any other)
    from imagen_jax.data import webdataset

    source = webdataset.ArrayRecordSource(
      data_config.path,
      image_column=data_config.image_column,
      caption_column=data_config.caption_column,
      max_examples=max_examples,
    )
  check_skip_fraction(source, float(data_config.get('max_skip_fraction', 0.01)))
  return source
