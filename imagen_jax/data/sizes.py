"""Image sizes without decoding, and the small-image filter applied when a dataset is listed.

Super-resolution stages need images at least `data.resolution` on their shorter side; most of
a web dataset is smaller than 1024 px. With `data.small_images='skip'` the pipeline drops them
before training starts, from what each source knows without decoding pixels
(`Source.image_sizes()`):

* folder:      `width` / `height` fields of metadata.jsonl / metadata.csv, else the image
               file headers (Pillow opens lazily: a few KB read per file, nothing decoded);
* hf:          `width` / `height` columns (any case);
* tfds:        `width` / `height` features, else the decoded image's shape (tfds decodes
               every record while the captions are listed anyway);
* webdataset:  `width` / `height` of the `key.json` sidecar (img2dataset writes them);
* arrayrecord: the header of the image bytes (read while listing anyway).

Images whose size is unknown are checked when they are decoded (header first, no pixels):
skipped and counted apart from broken files. Either way too-small images never count toward
`data.max_skip_fraction` (kept for unreadable files), and the run stops only when no example
is left. The filter never changes a source's captions or fingerprint, so every stage trained
on one dataset shares one text-embedding cache.
"""

import concurrent.futures
import dataclasses
import io
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_HEADER_THREADS = 16
_LOG_PROGRESS_ABOVE = 20_000


def read_size(data: Any) -> tuple[int, int] | None:
  """(width, height) from an image file's or bytes' header, or None when unreadable.

  Pillow opens lazily: only the header is parsed, no pixel is decoded. EXIF orientation is
  ignored (it swaps width and height, and the shorter side is what matters here).
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      if isinstance(data, str | os.PathLike):
        with Image.open(data) as image:
          return image.size
      if isinstance(data, bytes | bytearray | memoryview):
        with Image.open(io.BytesIO(bytes(data))) as image:
          return image.size
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
    return None
  return None


def size_from_fields(fields: Mapping[str, Any]) -> tuple[int, int] | None:
  """(width, height) from `width` / `height` fields (any case), or None when absent or bad."""
  lower = {str(k).lower(): v for k, v in fields.items()}
  try:
    width, height = int(lower['width']), int(lower['height'])
  except (KeyError, TypeError, ValueError):
    return None
  return (width, height) if width > 0 and height > 0 else None


def size_columns(names: Sequence[str]) -> tuple[str, str] | None:
  """The (width, height) column names among `names` (any case), or None."""
  by_lower = {n.lower(): n for n in names}
  if 'width' in by_lower and 'height' in by_lower:
    return by_lower['width'], by_lower['height']
  return None


def as_array(sizes: Sequence[tuple[int, int] | None]) -> np.ndarray:
  """[N, 2] int32 (width, height), 0 where unknown."""
  out = np.zeros((len(sizes), 2), np.int32)
  for i, size in enumerate(sizes):
    if size is not None:
      out[i] = size
  return out


def read_sizes(items: Sequence[Any], read: Callable[[Any], Any] = read_size, *, name: str = ''):
  """`read(item)` for every item, on threads (file headers are I/O bound); [N, 2] int32."""
  if len(items) > _LOG_PROGRESS_ABOVE:
    log.info('%s: reading the image sizes of %d files (headers only).', name, len(items))
  with concurrent.futures.ThreadPoolExecutor(_HEADER_THREADS) as pool:
    return as_array(list(pool.map(read, items, chunksize=256)))


@dataclasses.dataclass(frozen=True)
class SizeFilter:
  """What the small-image filter did to one listed dataset (`data.small_images='skip'`)."""

  total: int  # examples listed
  kept: np.ndarray  # indices kept, ascending
  small: int  # known to be smaller than min_side: dropped
  unknown: int  # size not known without decoding: checked when decoded
  min_side: int

  def message(self, source_name: str) -> str:
    """One line for the log at start."""
    line = (
      f'{source_name}: kept {len(self.kept)} of {self.total} images; {self.small} smaller '
      f'than {self.min_side} px skipped (data.small_images=upsample keeps them)'
    )
    if self.unknown:
      line += (
        f'; {self.unknown} without a size in the metadata are checked when decoded (too '
        'small ones are skipped then, and counted apart from broken files)'
      )
    return line + '.'


def filter_small(sizes: np.ndarray, *, min_side: int) -> SizeFilter:
  """Indices of the examples to keep: all but those known to be smaller than `min_side`.

  `sizes` is `Source.image_sizes()`: [N, 2] (width, height), 0 where unknown.
  """
  sizes = np.asarray(sizes).reshape(-1, 2)
  shorter = sizes.min(axis=1)
  unknown = shorter <= 0
  small = ~unknown & (shorter < min_side)
  return SizeFilter(
    total=len(sizes),
    kept=np.flatnonzero(~small),
    small=int(small.sum()),
    unknown=int(unknown.sum()),
    min_side=int(min_side),
  )
