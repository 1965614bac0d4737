"""Image decoding and resizing for training examples.

Every decoded image ends as 8-bit RGB: alpha (and palette/greyscale transparency) is
composited onto white, 16-bit and float greyscale are rescaled to 8 bit, CMYK and the other
Pillow modes are converted, and EXIF orientation is applied.

Resize policy (all resampling is antialiased BICUBIC):

* centre crop (`random_crop=False`, base stage): the shorter side is resized to
  `resolution`, then the centre `resolution x resolution` square is kept.
* random crop (`random_crop=True`, super-resolution stages): images whose shorter side is
  more than `2 * resolution` are first resized so that it is exactly `2 * resolution`;
  images between `resolution` and `2 * resolution` keep their native scale. A random
  `resolution x resolution` crop is then taken (offsets drawn from the per-example grain
  RNG, so it is deterministic). Every crop therefore covers at least half of the shorter
  side (the caption still describes it), and moderate-size images keep native detail.
* images whose shorter side is below `resolution`: skipped (`small_images='skip'`) or
  resized up so that the shorter side is `resolution` (`small_images='upsample'`).
* `lowres_resolution > 0`: the final crop is also downsampled (antialiased) to
  `lowres_resolution` and returned as the conditioning image of SR stages.

Arrays leave this module as uint8 `[H, W, 3]` (4x less data between grain worker
processes); `to_float` maps them to float32 in [-1, 1].
"""

import dataclasses
import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from imagen_jax.data.sources import DataError

_RESAMPLE = Image.Resampling.BICUBIC
_WHITE = (255, 255, 255)


class SkipExample(DataError):
  """An example that cannot be used (unreadable, too small, ...); it is skipped and counted."""


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  """What `preprocess_image` produces; built from `config.data` by `from_config`."""

  resolution: int
  lowres_resolution: int = 0
  random_crop: bool = False
  small_images: str = 'skip'  # 'skip' | 'upsample'

  def __post_init__(self):
    if self.resolution <= 0:
      raise DataError(f'data.resolution must be positive, got {self.resolution}.')
    if self.lowres_resolution < 0 or self.lowres_resolution > self.resolution:
      raise DataError(
        f'data.lowres_resolution must be in [0, resolution={self.resolution}], '
        f'got {self.lowres_resolution}.'
      )
    if self.small_images not in ('skip', 'upsample'):
      raise DataError(f"data.small_images must be 'skip' or 'upsample', got {self.small_images!r}.")

  @classmethod
  def from_config(cls, data_config) -> 'PreprocessOptions':
    return cls(
      resolution=int(data_config.resolution),
      lowres_resolution=int(data_config.lowres_resolution),
      random_crop=bool(data_config.random_crop),
      small_images=str(data_config.small_images),
    )


def _open(data: Any) -> Image.Image:
  """Opens (lazily) whatever a source returned as an image."""
  if isinstance(data, Image.Image):
    return data
  if isinstance(data, dict):  # HF datasets Image(decode=False): {'bytes': ..., 'path': ...}
    if data.get('bytes'):
      return Image.open(io.BytesIO(data['bytes']))
    if data.get('path'):
      return Image.open(data['path'])
    raise SkipExample('image entry has neither bytes nor a path')
  if isinstance(data, bytes | bytearray | memoryview):
    if len(data) == 0:
      raise SkipExample('zero-byte image data')
    return Image.open(io.BytesIO(bytes(data)))
  if isinstance(data, str | os.PathLike):
    if os.path.getsize(data) == 0:
      raise SkipExample('zero-byte file')
    return Image.open(data)
  if isinstance(data, np.ndarray):
    return _image_from_array(data)
  raise SkipExample(f'unsupported image type {type(data).__name__}')


def _image_from_array(array: np.ndarray) -> Image.Image:
  """[H, W], [H, W, 1|3|4] arrays (uint8, uint16 or float in [0, 1]) to a Pillow image."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise SkipExample(f'image array has unsupported shape {array.shape}')
  if array.dtype == np.uint8:
    pass
  elif array.dtype == np.uint16:
    array = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
  elif np.issubdtype(array.dtype, np.floating):
    scale = 255.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 1.0
    array = np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
  else:
    array = np.clip(array, 0, 255).astype(np.uint8)
  return Image.fromarray(array)


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
  """'I;16*', 'I' and 'F' greyscale to 8-bit 'L'.

  16-bit modes are divided by 257; 'I' is treated as 16-bit when its maximum fits, else
  scaled by its maximum; 'F' is read as [0, 1] when its maximum is <= 1, else [0, 255].
  """
  array = np.asarray(image)
  if image.mode.startswith('I;16'):
    array = array.astype(np.float32) / 257.0
  elif image.mode == 'I':
    peak = float(array.max(initial=0))
    array = array.astype(np.float32)
    if peak > 65535:
      array = array * (255.0 / peak)
    elif peak > 255:
      array = array / 257.0
  else:  # 'F'
    array = np.nan_to_num(array.astype(np.float32))
    if float(array.max(initial=0.0)) <= 1.0:
      array = array * 255.0
  return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), mode='L')


def to_rgb(image: Image.Image) -> Image.Image:
  """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
  if image.mode.startswith('I;16') or image.mode in ('I', 'F'):
    image = _high_bit_depth_to_l(image)
  has_alpha = image.mode in ('RGBA', 'RGBa', 'LA', 'La', 'PA') or 'transparency' in image.info
  if has_alpha:
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, _WHITE + (255,))
    background.alpha_composite(rgba)
    return background.convert('RGB')
  if image.mode != 'RGB':
    return image.convert('RGB')
  return image


def decode_image(data: Any, *, draft_size: int = 0) -> Image.Image:
  """Decodes `data` (bytes, path, HF image dict, array or PIL image) to an RGB image.

  Applies EXIF orientation. `draft_size` > 0 lets JPEG decode at a reduced scale whose
  sides are still >= draft_size (faster for large photos). Raises `SkipExample` for
  unreadable, truncated, empty or non-image data and for decompression bombs (more than
  `PIL.Image.MAX_IMAGE_PIXELS` pixels, read at call time).
  """
  try:
    image = _open(data)
    max_pixels = Image.MAX_IMAGE_PIXELS
    if max_pixels and image.width * image.height > max_pixels:
      raise SkipExample(
        f'decompression bomb guard: {image.width}x{image.height} pixels exceeds '
        f'PIL.Image.MAX_IMAGE_PIXELS={max_pixels}'
      )
    if draft_size > 0 and image.format == 'JPEG':
      image.draft('RGB', (draft_size, draft_size))
    image.load()
  except SkipExample:
    raise
  except Image.DecompressionBombError as e:
    raise SkipExample(f'decompression bomb guard: {e}') from e
  except (OSError, ValueError, SyntaxError, EOFError, TypeError) as e:
    raise SkipExample(f'cannot decode image ({type(e).__name__}: {e})') from e
  try:
    image = ImageOps.exif_transpose(image)
  except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image.
    pass
  try:
    return to_rgb(image)
  except (OSError, ValueError) as e:
    raise SkipExample(f'cannot convert image mode {image.mode} to RGB ({e})') from e


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  width, height = image.size
  scale = size / min(width, height)
  new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
  if new_size == image.size:
    return image
  return image.resize(new_size, _RESAMPLE, reducing_gap=3.0)


def _crop(image: Image.Image, size: int, left: int, top: int) -> Image.Image:
  return image.crop((left, top, left + size, top + size))


def preprocess_image(
  image: Image.Image, options: PreprocessOptions, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
  """Resizes/crops an RGB image following the module's policy.

  Returns (image [R, R, 3] uint8, lowres [r, r, 3] uint8 or None). `rng` is required when
  `options.random_crop`. Raises `SkipExample` for too-small images under 'skip'.
  """
  res = options.resolution
  short = min(image.size)
  if short < res:
    if options.small_images == 'skip':
      raise SkipExample(
        f'image {image.width}x{image.height} is smaller than resolution {res} '
        "(set data.small_images='upsample' to keep such images)"
      )
    image = _resize_shorter_side(image, res)
  if options.random_crop:
    if rng is None:
      raise ValueError('random_crop needs the per-example rng.')
    if min(image.size) > 2 * res:
      image = _resize_shorter_side(image, 2 * res)
    left = int(rng.integers(0, image.width - res + 1))
    top = int(rng.integers(0, image.height - res + 1))
  else:
    image = _resize_shorter_side(image, res)
    left = (image.width - res) // 2
    top = (image.height - res) // 2
  crop = _crop(image, res, left, top)
  lowres = None
  if options.lowres_resolution > 0:
    low = options.lowres_resolution
    lowres = np.asarray(crop.resize((low, low), _RESAMPLE), dtype=np.uint8)  # [r, r, 3]
  return np.asarray(crop, dtype=np.uint8), lowres  # [R, R, 3]


def load_and_preprocess(
  data: Any, options: PreprocessOptions, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
  """`decode_image` then `preprocess_image`."""
  draft = 0 if options.random_crop else options.resolution
  return preprocess_image(decode_image(data, draft_size=draft), options, rng)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images to float32 in [-1, 1]."""
  return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
