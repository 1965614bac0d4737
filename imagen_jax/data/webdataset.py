"""Sharded web-scale sources: webdataset tar shards (img2dataset) and ArrayRecord files.

'webdataset': `--config.data.path` is a folder of `*.tar`, a brace pattern
(`shards/{00000..00999}.tar`, `{a,b}` lists too) or a glob (`shards/*.tar`). Each tar holds
`key.jpg` (or .png / .webp / ...) + `key.txt` [+ `key.json`], as img2dataset writes them;
the caption is the `.txt` member, else the `.json` member's `data.caption_column` (or
'caption') field; the `.json` member's `width` / `height` (img2dataset writes them) give the
image size used to drop too-small images before training (see `sizes.py`). Every tar's
members are indexed once (name, data offset and size; the header walk seeks over image
data), so a record is one `pread` at a known offset: random access, hence grain's seeded
global shuffle, per-process slicing and exact resume from the iterator state, as for the
other sources. With `data.index_dir`, the per-tar index is saved
there (keyed by the tar's path, size and mtime) and reused by later runs and other hosts.

'arrayrecord': `--config.data.path` is a folder of `*.array_record*` files, a brace pattern
or a glob; each record is a serialized `tf.train.Example` (the format tfds and most TF
pipelines write) with the image bytes under `data.image_column` and the caption under
`data.caption_column`. Read through grain's `ArrayRecordDataSource`, parsed without
TensorFlow; image sizes come from the image bytes' headers, read while listing.
`example_bytes` writes such a record.

Problems are skipped and counted like in the other sources (`Source.skipped`, then
`check_skip_fraction`): a missing shard file or a tar that does not open (each counted as the
average number of pairs of the readable shards), a truncated tar (its members up to the damage
are kept), a key whose members hold no image or no caption (e.g. 'photo.2023.jpg': the key ends
at the first dot, so this is key 'photo'), an empty caption or one that is not UTF-8 text, an
unparsable record. Undecodable image bytes are skipped (and counted) by the pipeline.
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import itertools
import json
import logging
import os
import pathlib
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from imagen_jax.data import sizes as sizes_lib
from imagen_jax.data.sources import (
  CaptionError,
  DataError,
  Source,
  _clean_caption,
  _hash,
  read_caption_file,
  walk_files,
)

log = logging.getLogger(__name__)

TAR_IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff', 'ppm', 'jfif')
# 2: image widths / heights from the json sidecars; 3: lost tars flagged, key groups without an
# image and caption counted as skips, captions that are not text skipped.
INDEX_VERSION = 3
_BRACE = re.compile(r'\{([^{}]*)\}')
_RANGE = re.compile(r'^(-?\d+)\.\.(-?\d+)$')
_INDEX_THREADS = 16


def expand_braces(pattern: str) -> list[str]:
  """'a/{00..02}.tar' -> ['a/00.tar', 'a/01.tar', 'a/02.tar']; '{x,y}' lists; several braces
  give their product. A range keeps the zero padding of its first bound."""
  parts, choices, last = [], [], 0
  for match in _BRACE.finditer(pattern):
    parts.append(pattern[last : match.start()])
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
      first, stop = numeric.group(1), int(numeric.group(2))
      width = len(first.lstrip('-')) if first.lstrip('-').startswith('0') else 0
      step = 1 if stop >= int(first) else -1
      choices.append([f'{i:0{width}d}' for i in range(int(first), stop + step, step)])
    else:
      choices.append(body.split(','))
    last = match.end()
  parts.append(pattern[last:])
  out = []
  for combo in itertools.product(*choices):
    out.append(''.join(p + c for p, c in zip(parts, [*combo, ''], strict=True)))
  return out


def list_shards(spec: str, match: Callable[[str], bool]) -> tuple[list[pathlib.Path], list[str]]:
  """(shard files in order, names of explicitly listed files that do not exist).

  `spec` is a folder (its files whose name satisfies `match`, sorted, recursively), a brace
  pattern, a glob, or both (`shards/{000..009}*.tar`); a glob keeps the files it matches.
  """
  spec = str(spec).strip()
  if not spec:
    return [], []
  root = pathlib.Path(spec).expanduser()
  if root.is_dir():
    files = [p for p in walk_files(root) if p.is_file() and match(p.name)]
    return files, []
  files, missing = [], []
  for name in expand_braces(os.path.expanduser(spec)):
    if glob.has_magic(name):
      matches = sorted(glob.glob(name, recursive=True))
      files.extend(pathlib.Path(p) for p in matches if os.path.isfile(p))  # no folders
    elif pathlib.Path(name).is_file():
      files.append(pathlib.Path(name))
    else:
      missing.append(name)
  seen: dict[pathlib.Path, None] = {}
  for f in files:
    seen.setdefault(f.resolve(), None)
  return list(seen), missing


def _no_shards_error(kind: str, spec: str, what: str) -> DataError:
  return DataError(
    f"data.source='{kind}': --config.data.path={spec!r} matches no {what} file. Pass a folder "
    f"of them, a brace pattern such as 'shards/{{00000..00099}}.{what.split()[0]}' or a glob."
  )


# -- webdataset tar shards


def _split_member(name: str) -> tuple[str, str] | None:
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'); the key ends at the basename's first dot."""
  folder, _, base = name.rpartition('/')
  key, dot, ext = base.partition('.')
  if not dot or not key:
    return None
  return (f'{folder}/{key}' if folder else key), ext.lower()


def index_tar(path: pathlib.Path, caption_column: str = 'text') -> dict[str, Any]:
  """The image/caption pairs of one uncompressed tar: keys, image data offsets and sizes,
  captions, image widths and heights (from `key.json`, 0 when unknown), and the `(id,
  reason)` of what was skipped. Reads member headers, captions and json sidecars only (image
  data is seeked over)."""
  name = path.name
  skipped: list[tuple[str, str]] = []
  groups: dict[str, dict[str, tarfile.TarInfo]] = {}
  file_size = path.stat().st_size
  truncated = ''
  transient = False  # could not open it (permissions, I/O): not to be cached
  lost = False  # not a tar that opens: none of its pairs is listed
  try:
    with tarfile.open(path, mode='r:') as tar:
      try:
        for info in tar:
          if not info.isfile():
            continue
          split = _split_member(info.name)
          if split is not None:
            groups.setdefault(split[0], {})[split[1]] = info
        end = tar.offset  # where the end-of-archive marker (two zero blocks) must be
      except (tarfile.TarError, OSError, EOFError) as e:
        truncated, end = f'damaged tar ({e})', None
    if end is not None:
      with open(path, 'rb') as f:
        f.seek(end)
        marker = f.read(2 * tarfile.BLOCKSIZE)
      if len(marker) < 2 * tarfile.BLOCKSIZE or any(marker):
        truncated = 'truncated tar (no end-of-archive marker)'
  except tarfile.ReadError as e:
    skipped.append((name, f'not a readable uncompressed tar ({e}); img2dataset writes plain .tar'))
    groups, lost = {}, True
  except (tarfile.TarError, OSError, EOFError) as e:
    skipped.append((name, f'unreadable tar ({type(e).__name__}: {e})'))
    groups, lost = {}, True
    transient = isinstance(e, OSError)
  if truncated:
    skipped.append(
      (name, f'{truncated}: kept the {max(len(groups) - 1, 0)} keys before the damage')
    )
    if groups:  # the last key's members may be cut: drop it
      last = list(groups)[-1]
      del groups[last]
      skipped.append((f'{name}/{last}', f'cut off by the {truncated}'))

  keys, offsets, sizes, captions, widths, heights = [], [], [], [], [], []
  index = {
    'version': INDEX_VERSION,
    'keys': keys,
    'offsets': offsets,
    'sizes': sizes,
    'captions': captions,
    'widths': widths,
    'heights': heights,
    'skipped': skipped,
  }  # the lists are filled below
  if lost:
    index['lost'] = True
  if not groups:  # nothing to read (the tar may not even open: a folder, no permission)
    if transient:
      index['transient'] = True
    return index
  with open(path, 'rb') as f:

    def read(info: tarfile.TarInfo) -> bytes | None:
      if info.offset_data + info.size > file_size:
        return None
      f.seek(info.offset_data)
      return f.read(info.size)

    for key, members in groups.items():
      item_id = f'{name}/{key}'
      image = next((members[e] for e in TAR_IMAGE_EXTENSIONS if e in members), None)
      has_caption = 'txt' in members or 'json' in members
      if (image is None or not has_caption) and (
        any('.' in ext for ext in members) or (image is None and not has_caption)
      ):
        skipped.append((item_id, _unpaired_group_reason(key, members, image, has_caption)))
        continue
      if image is None:
        skipped.append((item_id, 'no image member (.jpg/.png/.webp/...)'))
        continue
      if image.offset_data + image.size > file_size:
        skipped.append((item_id, 'image data cut off (truncated tar)'))
        continue
      meta = None
      if 'json' in members:
        data = read(members['json'])
        try:
          meta = json.loads(data) if data is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
          meta = None
        meta = meta if isinstance(meta, dict) else None
      caption = ''
      if 'txt' in members:
        data = read(members['txt'])
        if data is None:
          skipped.append((item_id, 'caption cut off (truncated tar)'))
          continue
        text = read_caption_file(data)
        if text is None:
          skipped.append((item_id, 'caption (.txt) is not UTF-8 text; write it as UTF-8'))
          continue
        caption = _clean_caption(text)
      elif 'json' in members:
        if meta is not None:
          try:
            caption = _clean_caption(meta.get(caption_column, meta.get('caption')))
          except CaptionError as e:
            skipped.append((item_id, f'{e} (.json)'))
            continue
      else:
        skipped.append((item_id, 'no caption member (.txt)'))
        continue
      if not caption:
        skipped.append((item_id, 'empty caption'))
        continue
      width, height = (meta and sizes_lib.size_from_fields(meta)) or (0, 0)
      keys.append(key)
      offsets.append(image.offset_data)
      sizes.append(image.size)
      captions.append(caption)
      widths.append(width)
      heights.append(height)
  return index


def _unpaired_group_reason(
  key: str, members: dict[str, tarfile.TarInfo], image: Any, has_caption: bool
) -> str:
  """Why a key's members are no pair, naming them: a dot in the name ('photo.2023.jpg') makes
  the key 'photo' with the extension '2023.jpg', so neither image nor caption is recognised."""
  names = sorted(info.name.rpartition('/')[2] for info in members.values())
  shown = ', '.join(names[:4]) + (', ...' if len(names) > 4 else '')
  missing = ' and no '.join(
    what
    for what, absent in (
      ('image (.jpg/.png/.webp/...)', image is None),
      ('caption (.txt/.json)', not has_caption),
    )
    if absent
  )
  return (
    f'key {key.rpartition("/")[2]!r} has no {missing} member (its members: {shown}): '
    'WebDataset keys end at the first dot of the file name, so photo.2023.jpg is the key photo '
    'with the extension 2023.jpg; name members key.ext with no other dot (photo_2023.jpg + '
    'photo_2023.txt)'
  )


def _index_file(index_dir: pathlib.Path, path: pathlib.Path, caption_column: str) -> pathlib.Path:
  stat = path.stat()
  ident = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, caption_column])
  digest = hashlib.sha256(ident.encode()).hexdigest()[:24]
  return index_dir / f'{path.stem}-{digest}.json'


def _cached_index(path: pathlib.Path, caption_column: str, index_dir: str) -> dict[str, Any]:
  """`index_tar(path)`, read from / saved to `index_dir` when it is set."""
  if not index_dir:
    return index_tar(path, caption_column)
  folder = pathlib.Path(index_dir).expanduser()
  file = _index_file(folder, path, caption_column)
  try:
    index = json.loads(file.read_text(encoding='utf-8'))
    if index.get('version') == INDEX_VERSION:
      return index
  except (OSError, json.JSONDecodeError):
    pass
  index = index_tar(path, caption_column)
  if index.pop('transient', False):  # a permission fix (no new mtime) must be seen next time
    return index
  folder.mkdir(parents=True, exist_ok=True)
  tmp = file.with_name(f'{file.name}.tmp-{os.getpid()}')
  tmp.write_text(json.dumps(index), encoding='utf-8')  # ASCII: names may hold lone surrogates
  os.replace(tmp, file)
  return index


class WebDatasetSource(Source):
  """Image/caption pairs of webdataset tar shards (img2dataset output), random access."""

  _lost_extra = 0  # skips the lost shards count as beyond their one entry each in `skipped`

  def __init__(
    self,
    spec: str,
    *,
    caption_column: str = 'text',
    max_examples: int = 0,
    index_dir: str = '',
  ):
    super().__init__()
    self.spec = str(spec)
    self.name = f'webdataset:{self.spec}'
    self.caption_column = caption_column
    self.max_examples = int(max_examples)
    shards, missing = list_shards(self.spec, lambda name: name.endswith('.tar'))
    for name in missing:
      self._skip(name, 'shard file does not exist (a failed img2dataset shard?)')
    if not shards:
      raise _no_shards_error('webdataset', self.spec, 'tar')
    self.shards = [str(p) for p in shards]
    with concurrent.futures.ThreadPoolExecutor(min(_INDEX_THREADS, len(shards))) as pool:
      indexes = list(
        pool.map(lambda p: _cached_index(p, caption_column, index_dir), shards)
      )  # shard order kept
    shard_ids, offsets, sizes, dims, self._keys, listing = [], [], [], [], [], []
    usable_listed = 0  # in the shards read, before max_examples cut the last one's keys
    lost, readable_read = len(missing), 0  # shards read: lost ones, readable ones
    for i, (path, index) in enumerate(zip(shards, indexes, strict=True)):
      for item_id, reason in index['skipped']:
        self._skip(item_id, reason)
      lost += bool(index.get('lost'))
      readable_read += not index.get('lost')
      n = len(index['keys'])
      usable_listed += n
      if self.max_examples > 0:
        n = min(n, self.max_examples - len(self._captions))
      shard_ids.append(np.full(n, i, np.int32))
      offsets.append(np.asarray(index['offsets'][:n], np.int64))
      sizes.append(np.asarray(index['sizes'][:n], np.int64))
      dims.append(np.stack([index['widths'][:n], index['heights'][:n]], axis=1).astype(np.int32))
      self._keys.extend(f'{path.name}/{k}' for k in index['keys'][:n])
      self._captions.extend(index['captions'][:n])
      listing.append([path.name, path.stat().st_size, n])
      if 0 < self.max_examples <= len(self._captions):
        break
    self._weigh_lost_shards(lost, readable_read, indexes)
    self._num_listed = usable_listed + self.num_skipped()
    if not self._captions:
      raise DataError(
        f'No usable (image, caption) pair in {len(shards)} tar shard(s) of {self.spec!r} '
        f'({len(self.skipped)} skipped; first: {self.skipped[:3]}). Each pair is key.jpg '
        '(or .png/.webp) + key.txt in the same tar, as img2dataset writes them.'
      )
    self._shard_ids = np.concatenate(shard_ids)
    self._offsets = np.concatenate(offsets)
    self._sizes = np.concatenate(sizes)
    self._dims = np.concatenate(dims).reshape(-1, 2)  # [N, 2] (width, height), 0: unknown
    self._fingerprint = _hash(
      ['webdataset', listing, caption_column, self.max_examples]
      + [_hash(self._keys), _hash(self._captions)]
    )
    log.info(
      '%s: %d pairs in %d tar shards (%d skipped).',
      self.name,
      len(self._captions),
      len(shards),
      len(self.skipped),
    )

  def _weigh_lost_shards(self, lost: int, readable_read: int, indexes: list[dict]) -> None:
    """A lost shard (missing, or not a tar that opens) held many pairs: it counts toward
    data.max_skip_fraction as the average number of pairs of the readable shards (at least 1),
    not as one item (half the shards lost passed a 1 % limit). When max_examples stopped the
    listing early, that is scaled by the share of the readable shards read, so the lost shards
    weigh what they would in the whole dataset."""
    pairs = [len(index['keys']) for index in indexes if not index.get('lost')]
    if not lost or not pairs:
      return
    per_shard = max(1, round(sum(pairs) / len(pairs)))
    self._lost_extra = max(lost, round(lost * per_shard * readable_read / len(pairs))) - lost
    scaled = ''
    if readable_read < len(pairs):
      scaled = f', scaled to the {readable_read} of them that max_examples read'
    self.skip_note = (
      f'each of the {lost} lost shards counts as {per_shard} items, the average number of pairs '
      f'of the {len(pairs)} readable shards{scaled}'
    )

  def num_skipped(self) -> int:
    """Skipped items, a lost shard counting as the average pairs of a readable one."""
    return len(self.skipped) + self._lost_extra

  def __getitem__(self, index: int) -> dict:
    index = self._check_index(index)
    path = self.shards[self._shard_ids[index]]
    offset, size = int(self._offsets[index]), int(self._sizes[index])
    try:
      with open(path, 'rb') as f:
        f.seek(offset)
        data = f.read(size)  # shorter when the tar was cut since indexing: decode skips it
    except OSError as e:
      log.warning('%s: cannot read %s: %s', self.name, self._keys[index], e)
      data = b''
    return {'image': data, 'caption': self._captions[index], 'id': self._keys[index]}

  def fingerprint(self) -> str:
    return self._fingerprint

  def image_sizes(self) -> np.ndarray:
    """From the `key.json` sidecars' width / height (0 where a key has none)."""
    return self._dims


# -- ArrayRecord files of serialized tf.train.Example


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError('truncated varint')
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ValueError('varint too long')


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) of a protobuf message; values of wire type 2 are
  memoryviews."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 1 or wire == 5:
      width = 8 if wire == 1 else 4
      value, pos = buf[pos : pos + width], pos + width
    elif wire == 2:
      length, pos = _varint(buf, pos)
      value, pos = buf[pos : pos + length], pos + length
    else:
      raise ValueError(f'unsupported protobuf wire type {wire}')
    if pos > len(buf):
      raise ValueError('truncated protobuf field')
    yield number, wire, value


def parse_example(record: bytes) -> dict[str, list[bytes]]:
  """The bytes features of a serialized `tf.train.Example` (name -> values); other feature
  kinds are left out. Raises ValueError for data that is not an Example."""
  out: dict[str, list[bytes]] = {}
  for number, wire, features in _fields(memoryview(record)):
    if number != 1 or wire != 2:  # Example.features
      continue
    for number, wire, entry in _fields(features):
      if number != 1 or wire != 2:  # Features.feature (map entry)
        continue
      name = feature = None
      for n, w, value in _fields(entry):
        if n == 1 and w == 2:
          name = bytes(value).decode('utf-8')
        elif n == 2 and w == 2:
          feature = value
      if name is None or feature is None:
        continue
      for n, w, value in _fields(feature):
        if n == 1 and w == 2:  # Feature.bytes_list
          out[name] = [bytes(v) for k, t, v in _fields(value) if k == 1 and t == 2]
  return out


def _length_delimited(number: int, payload: bytes) -> bytes:
  def varint(n: int) -> bytes:
    out = bytearray()
    while True:
      out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
      n >>= 7
      if not n:
        return bytes(out)

  return varint(number << 3 | 2) + varint(len(payload)) + payload


def example_bytes(features: dict[str, bytes | str | Sequence[bytes | str]]) -> bytes:
  """A serialized `tf.train.Example` of bytes features (str values are UTF-8 encoded)."""
  entries = b''
  for name, values in features.items():
    if isinstance(values, bytes | str):
      values = [values]
    values = [v.encode('utf-8') if isinstance(v, str) else bytes(v) for v in values]
    bytes_list = b''.join(_length_delimited(1, v) for v in values)
    feature = _length_delimited(1, bytes_list)
    entry = _length_delimited(1, name.encode('utf-8')) + _length_delimited(2, feature)
    entries += _length_delimited(1, entry)
  return _length_delimited(1, entries)


def _is_array_record(name: str) -> bool:
  """'x.array_record', 'x.arrayrecord' or tfds' 'x.array_record-00000-of-00004'."""
  return name.endswith(('.array_record', '.arrayrecord')) or '.array_record-' in name


class ArrayRecordSource(Source):
  """Records of ArrayRecord files (serialized tf.train.Example: image bytes + caption)."""

  def __init__(
    self,
    spec: str,
    *,
    image_column: str = 'image',
    caption_column: str = 'text',
    max_examples: int = 0,
  ):
    super().__init__()
    self.spec = str(spec)
    self.name = f'arrayrecord:{self.spec}'
    self.image_column, self.caption_column = image_column, caption_column
    self.max_examples = int(max_examples)
    files, missing = list_shards(self.spec, _is_array_record)
    for name in missing:
      self._skip(name, 'file does not exist')
    if not files:
      raise _no_shards_error('arrayrecord', self.spec, 'array_record')
    self.files = [str(p) for p in files]
    try:
      import grain

      self._ds = grain.sources.ArrayRecordDataSource(self.files)
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear message.
      raise DataError(
        f'{self.name}: cannot open the ArrayRecord files ({type(e).__name__}: {e}).'
      ) from e
    self._indices: list[int] = []
    dims: list[tuple[int, int] | None] = []
    for i in range(len(self._ds)):
      try:
        features = parse_example(self._ds[i])
      except (ValueError, UnicodeDecodeError) as e:
        self._skip(f'record {i}', f'not a serialized tf.train.Example ({e})')
        continue
      if not features.get(image_column):
        self._skip(f'record {i}', f'no bytes feature {image_column!r} (features: '
                   f'{sorted(features)}); set --config.data.image_column')  # fmt: skip
        continue
      try:
        caption = _clean_caption((features.get(caption_column) or [b''])[0])  # [] if no value
      except CaptionError as e:
        self._skip(f'record {i}', f'{e} (feature {caption_column!r})')
        continue
      if not caption:
        self._skip(f'record {i}', f'no or empty caption feature {caption_column!r}')
        continue
      self._indices.append(i)
      self._captions.append(caption)
      dims.append(sizes_lib.read_size(features[image_column][0]))  # header only
      if 0 < self.max_examples <= len(self._indices):
        break
    self._dims = sizes_lib.as_array(dims)
    if not self._indices:
      raise DataError(
        f'No usable (image, caption) record in {self.name} ({len(self.skipped)} skipped; first: '
        f'{self.skipped[:3]}). Records are serialized tf.train.Example with bytes features '
        f'{image_column!r} and {caption_column!r} (see webdataset.example_bytes).'
      )
    self._fingerprint = _hash(
      ['arrayrecord', [(pathlib.Path(f).name, os.path.getsize(f)) for f in self.files]]
      + [image_column, caption_column, self.max_examples, self._indices[-1]]
      + [_hash(self._captions)]
    )

  def __getitem__(self, index: int) -> dict:
    index = self._check_index(index)
    row = self._indices[index]
    try:
      image = parse_example(self._ds[row])[self.image_column][0]
    except (ValueError, KeyError, IndexError) as e:
      log.warning('%s: record %d unreadable now: %s', self.name, row, e)
      image = b''
    return {'image': image, 'caption': self._captions[index], 'id': f'record {row}'}

  def fingerprint(self) -> str:
    return self._fingerprint

  def image_sizes(self) -> np.ndarray:
    """From the image bytes' headers, read while listing (0 where unreadable)."""
    return self._dims
