"""Image decoding and resizing for training examples.

Every decoded image ends as 8-bit RGB: alpha (and palette/greyscale transparency) is
composited onto white, 16-bit and float greyscale are rescaled to 8 bit, CMYK and the other
Pillow modes are converted, and EXIF orientation is applied.

Resize policy (all resampling is antialiased BICUBIC). First the `resolution x resolution`
frame, the image the stage generates:

* centre crop (`random_crop=False`, base stage): the shorter side is resized to
  `resolution`, then the centre `resolution x resolution` square is kept.
* random crop (`random_crop=True`, super-resolution stages): images whose shorter side is
  more than `2 * resolution` are first resized so that it is exactly `2 * resolution`;
  images between `resolution` and `2 * resolution` keep their native scale. A random
  `resolution x resolution` crop is then taken (offsets drawn from the per-example grain
  RNG, so it is deterministic). Every crop therefore covers at least half of the shorter
  side (the caption still describes it), and moderate-size images keep native detail.
* images whose shorter side is below `resolution`: skipped (`small_images='skip'`, raised
  as `ImageTooSmall` before any pixel is decoded, counted apart from broken files) or
  resized up so that the shorter side is `resolution` (`small_images='upsample'`).
* `lowres_resolution > 0`: the frame is also downsampled (antialiased) to
  `lowres_resolution`: the conditioning image of SR stages.

Then, with `0 < crop_size < resolution` (training crops, e.g. sr1024: 256 px crops of the
1024 px frame): a `crop_size` square of the frame (random with `random_crop`, else the
centre) at an offset that is a multiple of `resolution / lowres_resolution`, and the
matching `crop_size * lowres_resolution / resolution` window of the low-res frame (64 px for
sr1024). The low-res crop is cut from the downsampled whole frame, not downsampled from the
crop, so it holds exactly the pixels the model sees there when it samples the whole image.

Arrays leave this module as uint8 `[H, W, 3]` (4x less data between grain worker
processes); `to_float` maps them to float32 in [-1, 1].
"""

import dataclasses
import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from imagen_jax.data.sources import DataError

_RESAMPLE = Image.Resampling.BICUBIC
_WHITE = (255, 255, 255)


class SkipExample(DataError):
  """An example that cannot be used (unreadable, too small, ...); it is skipped and counted."""


class ImageTooSmall(SkipExample):
  """A readable image whose shorter side is below the resolution (`small_images='skip'`).

  Counted apart from broken files: it never counts toward `data.max_skip_fraction`.
  """


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  """What `preprocess_image` produces; built from `config.data` by `from_config`."""

  resolution: int
  lowres_resolution: int = 0
  random_crop: bool = False
  small_images: str = 'skip'  # 'skip' | 'upsample'
  crop_size: int = 0  # 0 (or resolution): the whole frame; else a crop_size crop of it

  def __post_init__(self):
    res, low, crop = self.resolution, self.lowres_resolution, self.crop_size
    if res <= 0:
      raise DataError(f'data.resolution must be positive, got {res}.')
    if low < 0 or low > res:
      raise DataError(f'data.lowres_resolution must be in [0, resolution={res}], got {low}.')
    if self.small_images not in ('skip', 'upsample'):
      raise DataError(f"data.small_images must be 'skip' or 'upsample', got {self.small_images!r}.")
    if not 0 <= crop <= res:
      raise DataError(f'data.crop_size must be in [0, resolution={res}] (0: no crop), got {crop}.')
    if self.crops and low:
      if res % low:
        raise DataError(
          f'data.crop_size={crop} needs data.resolution={res} to be a multiple of '
          f'data.lowres_resolution={low} (the low-res crop must be a whole-pixel window).'
        )
      if crop % (res // low):
        raise DataError(
          f'data.crop_size={crop} must be a multiple of resolution / lowres_resolution = '
          f'{res // low} (the low-res crop must be a whole-pixel window).'
        )

  @property
  def crops(self) -> bool:
    """Whether examples are crops smaller than the frame."""
    return 0 < self.crop_size < self.resolution

  @property
  def image_size(self) -> int:
    """Side of the training images: crop_size with crops, else resolution."""
    return self.crop_size if self.crops else self.resolution

  @property
  def lowres_size(self) -> int:
    """Side of the low-res training images (0 without low-res)."""
    if not self.lowres_resolution:
      return 0
    return self.image_size * self.lowres_resolution // self.resolution

  @classmethod
  def from_config(cls, data_config) -> 'PreprocessOptions':
    return cls(
      resolution=int(data_config.resolution),
      lowres_resolution=int(data_config.lowres_resolution),
      random_crop=bool(data_config.random_crop),
      small_images=str(data_config.small_images),
      crop_size=int(data_config.get('crop_size', 0)),
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
  """[H, W], [H, W, 1|3|4] arrays (uint8, uint16, bool or float in [0, 1]) to a Pillow image."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise SkipExample(f'image array has unsupported shape {array.shape}')
  if array.dtype == np.uint8:
    pass
  elif array.dtype == np.bool_:  # a mask image: True is white
    array = array.astype(np.uint8) * np.uint8(255)
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
    # A 16-bit greyscale PNG's tRNS names one 16-bit value as transparent: find it before the
    # rescale to 8 bit, which drops the info (its pixels came out grey instead of white).
    key = image.info.get('transparency')
    transparent = np.asarray(image) == key if isinstance(key, int) else None
    image = _high_bit_depth_to_l(image)
    if transparent is not None and transparent.any():
      grey = np.asarray(image).copy()
      grey[transparent] = _WHITE[0]
      image = Image.fromarray(grey, mode='L')
  has_alpha = image.mode in ('RGBA', 'RGBa', 'LA', 'La', 'PA') or 'transparency' in image.info
  if has_alpha:
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, _WHITE + (255,))
    background.alpha_composite(rgba)
    return background.convert('RGB')
  if image.mode != 'RGB':
    return image.convert('RGB')
  return image


def too_small_message(width: int, height: int, resolution: int) -> str:
  return (
    f'image {width}x{height} is smaller than resolution {resolution} '
    "(set data.small_images='upsample' to keep such images)"
  )


def decode_image(data: Any, *, draft_size: int = 0, min_size: int = 0) -> Image.Image:
  """Decodes `data` (bytes, path, HF image dict, array or PIL image) to an RGB image.

  Applies EXIF orientation. `draft_size` > 0 lets JPEG decode at a reduced scale whose
  sides are still >= draft_size (faster for large photos). Raises `SkipExample` for
  unreadable, truncated, empty or non-image data and for decompression bombs (more than twice
  `PIL.Image.MAX_IMAGE_PIXELS` pixels, read at call time: where Pillow itself refuses; above it
  Pillow only warns), and `ImageTooSmall` when the
  shorter side is below `min_size` > 0 (read from the header: no pixel is decoded).
  """
  try:
    image = _open(data)
    # Pillow's own error limit, for images that did not come through Image.open (a decoded HF
    # image). Its warning limit (89.5 MP by default) skipped real photos, counted as broken.
    max_pixels = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 0
    if max_pixels and image.width * image.height > max_pixels:
      raise SkipExample(
        f'decompression bomb guard: {image.width}x{image.height} pixels exceeds '
        f'2 x PIL.Image.MAX_IMAGE_PIXELS = {max_pixels}'
      )
    if min(image.size) < min_size:  # EXIF rotations keep the shorter side
      raise ImageTooSmall(too_small_message(image.width, image.height, min_size))
    if draft_size > 0 and image.format == 'JPEG':
      image.draft('RGB', (draft_size, draft_size))
    image.load()
  except SkipExample:
    raise
  except Image.DecompressionBombError as e:
    raise SkipExample(f'decompression bomb guard: {e}') from e
  except MemoryError:
    raise
  except Exception as e:  # noqa: BLE001 - a damaged file raises what its plugin meets: OSError,
    # ValueError, SyntaxError, EOFError, TypeError, and OverflowError (a TIFF strip offset past
    # 2**63) or NotImplementedError (DDS) among others; each is one file's skip, not the run's end.
    raise SkipExample(f'cannot decode image ({type(e).__name__}: {e})') from e
  try:
    image = ImageOps.exif_transpose(image)
  except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image.
    pass
  try:
    return to_rgb(image)
  except MemoryError:
    raise
  except Exception as e:  # noqa: BLE001 - as above: the file's skip
    raise SkipExample(f'cannot convert image mode {image.mode} to RGB ({e})') from e


def _scaled_size(image: Image.Image, size: int) -> tuple[int, int]:
  """(width, height) of `image` scaled so that its shorter side is `size`."""
  width, height = image.size
  scale = size / min(width, height)
  return max(size, round(width * scale)), max(size, round(height * scale))


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  new_size = _scaled_size(image, size)
  if new_size == image.size:
    return image
  return image.resize(new_size, _RESAMPLE, reducing_gap=3.0)


def _upsampled_window(image: Image.Image, res: int, rng: np.random.Generator | None) -> Image.Image:
  """The [res, res] window of `image` scaled up so its shorter side is `res`: a random window
  with `rng`, else the centre one.

  Only the window is resampled (Pillow's `box`), not the whole scaled image: a 2x900 strip at
  res 1024 would otherwise become 1024x460800 (1.4 GB of RGB) to keep 1024x1024 of it. The
  offsets are drawn on the scaled image's grid, as for a full resize then a crop.
  """
  width, height = image.size
  scaled_w, scaled_h = _scaled_size(image, res)
  if rng is not None:
    left = int(rng.integers(0, scaled_w - res + 1))
    top = int(rng.integers(0, scaled_h - res + 1))
  else:
    left, top = (scaled_w - res) // 2, (scaled_h - res) // 2
  sx, sy = width / scaled_w, height / scaled_h  # scaled pixels -> source pixels
  # Pillow's filter does not reach past the box, so resample a margin of the filter's support
  # (2 source pixels for bicubic) around the window and crop it off: the window's pixels then
  # match the full resize's.
  mx, my = math.ceil(2 / sx) + 1, math.ceil(2 / sy) + 1
  x0, y0 = max(left - mx, 0), max(top - my, 0)
  x1, y1 = min(left + res + mx, scaled_w), min(top + res + my, scaled_h)
  window = image.resize((x1 - x0, y1 - y0), _RESAMPLE, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
  return _crop(window, res, left - x0, top - y0)


def _crop(image: Image.Image, size: int, left: int, top: int) -> Image.Image:
  return image.crop((left, top, left + size, top + size))


def preprocess_image(
  image: Image.Image, options: PreprocessOptions, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
  """Resizes/crops an RGB image following the module's policy.

  Returns (image [S, S, 3] uint8, lowres [s, s, 3] uint8 or None), S = options.image_size
  (crop_size with crops, else resolution), s = options.lowres_size. `rng` is required when
  `options.random_crop`. Raises `ImageTooSmall` for too-small images under 'skip'.
  """
  res = options.resolution
  short = min(image.size)
  if short == 0:
    raise SkipExample(f'image {image.width}x{image.height} has no pixels')
  if options.random_crop and rng is None:
    raise ValueError('random_crop needs the per-example rng.')
  if short < res:
    if options.small_images == 'skip':
      raise ImageTooSmall(too_small_message(image.width, image.height, res))
    frame = _upsampled_window(image, res, rng if options.random_crop else None)
  else:
    if options.random_crop:
      if short > 2 * res:
        image = _resize_shorter_side(image, 2 * res)
      left = int(rng.integers(0, image.width - res + 1))
      top = int(rng.integers(0, image.height - res + 1))
    else:
      image = _resize_shorter_side(image, res)
      left = (image.width - res) // 2
      top = (image.height - res) // 2
    frame = _crop(image, res, left, top)  # [R, R]
  low = options.lowres_resolution
  lowres = frame.resize((low, low), _RESAMPLE) if low > 0 else None  # [r, r]
  if options.crops:
    frame, lowres = _training_crop(frame, lowres, options, rng)
  if lowres is not None:
    lowres = np.asarray(lowres, dtype=np.uint8)  # [s, s, 3]
  return np.asarray(frame, dtype=np.uint8), lowres  # [S, S, 3]


def _training_crop(
  frame: Image.Image,
  lowres: Image.Image | None,
  options: PreprocessOptions,
  rng: np.random.Generator | None,
) -> tuple[Image.Image, Image.Image | None]:
  """The crop_size window of the frame and the matching window of the low-res frame.

  Offsets are multiples of `step = resolution / lowres_resolution`, so the low-res window
  starts at offset / step and has side crop_size / step.
  """
  res, size = options.resolution, options.crop_size
  step = res // options.lowres_resolution if options.lowres_resolution else 1
  positions = (res - size) // step + 1  # aligned offsets per axis
  if options.random_crop:
    col, row = int(rng.integers(0, positions)), int(rng.integers(0, positions))
  else:
    col = row = (positions - 1) // 2
  crop = _crop(frame, size, col * step, row * step)
  if lowres is not None:
    lowres = _crop(lowres, size // step, col, row)
  return crop, lowres


def load_and_preprocess(
  data: Any, options: PreprocessOptions, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
  """`decode_image` then `preprocess_image`; too-small images are refused from the header."""
  draft = 0 if options.random_crop else options.resolution
  min_size = options.resolution if options.small_images == 'skip' else 0
  image = decode_image(data, draft_size=draft, min_size=min_size)
  return preprocess_image(image, options, rng)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images to float32 in [-1, 1]."""
  return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
