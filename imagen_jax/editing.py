"""Editing with a trained cascade: the user's images and masks in, per-stage sampler inputs out.

Three modes, all through `sample.py --init_image ...` / `sample_lib.SampleRequest(init_images=...)`:

  upscale        the checkpoints start with a super-resolution stage: the image, fitted to that
                 stage's low-res size, is its input; only the SR stages run.
  image-to-image `--strength S` in (0, 1]: the first stage starts from the image (fitted to its
                 resolution) noised to the grid point at fraction S from the clean end and runs
                 the remaining steps (samplers: `start`, `x_init`); later stages run as usual.
  inpainting     `--mask M` (white = repaint): every stage keeps the image's known region,
                 noised to the current log-SNR, after every step, and exactly in its result
                 (samplers.known_region_projection), with `--resample N` RePaint takes per step.

Fitting an image to a size (every stage that needs it, from the original file, so a large
photo keeps its detail at 1024 px): the centre square of the image (the shorter side; the
models are square) resized with antialiased bicubic filtering, as training preprocesses
images; a log line says what was done. The mask is fitted the same way (same square), and a
pixel of a smaller size is repainted when any part of it is, so known pixels are fully known.

Bad inputs are refused with one line (EditError) before anything is loaded: a file that is not
an image, a greyscale or transparent image (the stages make opaque RGB; convert it first), a
mask of another size than its image, a mask with nothing to repaint or nothing to keep.
"""

import dataclasses
import hashlib
import logging
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')
_RESAMPLE = Image.Resampling.BICUBIC  # as training (data/preprocess.py)
_GREY_MODES = ('1', 'L', 'I', 'F', 'I;16', 'I;16L', 'I;16B', 'I;16N')
_ALPHA_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')


class EditError(ValueError):
  """A bad editing input; the message names the file, the problem and the fix."""


def find_images(specs: Sequence[str]) -> list[pathlib.Path]:
  """Image files from files and folders (a folder: its image files by name, not recursive; in a
  folder of sample.py's output, whose images have JSON sidecars, its grid.png is left out)."""
  paths = []
  for spec in specs:
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
      found = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
      )
      grid = path / 'grid.png'
      if grid in found and any(p.with_suffix('.json').is_file() for p in found if p != grid):
        log.info('--init_image %s: leaving out grid.png (the grid of sample.py output).', path)
        found.remove(grid)
      if not found:
        raise EditError(
          f'--init_image {path}: the folder holds no image files ({", ".join(IMAGE_SUFFIXES)}).'
        )
      paths += found
    elif path.is_file():
      paths.append(path)
    else:
      raise EditError(f'--init_image {path} does not exist.')
  if not paths:
    raise EditError('--init_image: no image given.')
  return paths


def _decode(path: pathlib.Path, flag: str) -> Image.Image:
  try:
    image = Image.open(path)
    image.load()
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
    raise EditError(f'{flag} {path} cannot be decoded as an image ({type(e).__name__}).') from e
  try:
    return ImageOps.exif_transpose(image)
  except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
    return image


def load_image(path: str | pathlib.Path) -> Image.Image:
  """An init image as RGB; EditError for undecodable, greyscale or transparent images (an alpha
  channel that is opaque everywhere, as screenshots often carry, is dropped)."""
  path = pathlib.Path(path)
  image = _decode(path, '--init_image')
  mode = image.mode
  # A palette's transparent index, or a colour key (a PNG tRNS chunk of an RGB or grey image).
  has_alpha = mode in _ALPHA_MODES or 'transparency' in image.info
  if has_alpha and image.convert('RGBA').getchannel('A').getextrema()[0] < 255:
    raise EditError(
      f'--init_image {path} has transparent pixels (alpha channel, mode {mode}): they have no '
      'colour to keep; flatten it onto a background first (e.g. `convert in.png -background white '
      '-flatten out.png`), or, to repaint the transparent part, flatten it and pass its inverted '
      'alpha as --mask (white = repaint: `convert in.png -alpha extract -negate mask.png`).'
    )
  if mode in _GREY_MODES or mode in ('LA', 'La') or (mode == 'P' and _palette_is_grey(image)):
    raise EditError(
      f'--init_image {path} is a greyscale image (mode {mode}); the stages make RGB images: '
      'convert it to RGB first (e.g. `convert in.png -type TrueColor out.png`).'
    )
  return image.convert('RGB') if mode != 'RGB' else image


def _palette_is_grey(image: Image.Image) -> bool:
  rgb = np.asarray(image.convert('RGB')).reshape(-1, 3)
  return bool(np.all(rgb == rgb[:, :1]))


def file_digest(path: str | pathlib.Path) -> str:
  """sha256 of a file's bytes (recorded in sidecars, so --skip_existing notices a new image)."""
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def square_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of the centre square of a (width, height) image."""
  width, height = size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def fit_image(image: Image.Image, size: int) -> np.ndarray:
  """The centre square of an RGB image resized to size x size (bicubic, antialiased): uint8
  [size, size, 3]."""
  square = image.crop(square_box(image.size))
  if square.size != (size, size):
    square = square.resize((size, size), _RESAMPLE, reducing_gap=3.0)
  return np.asarray(square, np.uint8)


def describe_fit(path: pathlib.Path, size: tuple[int, int], target: int, purpose: str) -> str:
  """One line saying how an image of `size` becomes `target` px for `purpose`."""
  width, height = size
  left, top, right, _ = square_box(size)
  side = right - left
  if width == height:
    what = f'{width}x{height}'
  else:
    cut = (
      f'{width - side} px of its width' if width > height else f'{height - side} px of its height'
    )
    what = f'{width}x{height}: centre {side}x{side} square kept ({cut} cut off)'
  if side == target:
    how = 'used at its size'
  else:
    how = f'resized {"down" if side > target else "up"} to {target}x{target} (bicubic)'
  return f'{path.name} ({what}) {how} for {purpose}.'


def load_mask(path: str | pathlib.Path, image_size: tuple[int, int], image_path) -> np.ndarray:
  """The repaint mask of an image: bool [H, W], True where the mask is white (at least half
  bright: >= 128 of 255, >= 32768 of a 16-bit mask's 65535).

  EditError when it cannot be decoded, has another size than the image, or leaves nothing to
  repaint or nothing to keep inside the image's centre square (the part that is used).
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise EditError(
      f'--mask {path} {"is a folder" if path.is_dir() else "does not exist"}; pass the mask '
      'image of the --init_image (white = repaint).'
    )
  mask = _decode(path, '--mask')
  if mask.size != tuple(image_size):
    raise EditError(
      f'--mask {path} is {mask.size[0]}x{mask.size[1]} but --init_image {image_path} is '
      f"{image_size[0]}x{image_size[1]}; a mask must have its image's size (white = repaint); "
      'it is not resized, since a mask of another size usually belongs to another image.'
    )
  if mask.mode.startswith('I'):  # 16-bit grey ('I;16', or 'I'): convert('L') clips, not scales
    values = np.asarray(mask, np.int64)
    repaint = values >= 32768  # [H, W]
    if 'transparency' in mask.info:  # a colour key: those pixels are transparent, so kept
      repaint &= values != mask.info['transparency']
  elif mask.mode in ('RGBA', 'LA', 'PA') or 'transparency' in mask.info:
    mask = mask.convert('RGBA')
    background = Image.new('RGBA', mask.size, (0, 0, 0, 255))  # transparent: keep
    background.alpha_composite(mask)
    repaint = np.asarray(background.convert('L')) >= 128
  elif mask.mode == 'F':
    raise EditError(
      f'--mask {path} is a floating-point image (mode F), whose white level is not known; save '
      'it as an 8- or 16-bit greyscale PNG (white = repaint, black = keep).'
    )
  else:
    repaint = np.asarray(mask.convert('L')) >= 128  # [H, W]
  left, top, right, bottom = square_box(mask.size)
  used = repaint[top:bottom, left:right]
  where = '' if mask.size[0] == mask.size[1] else ' inside the centre square that is used'
  if not used.any():
    raise EditError(
      f'--mask {path} has no white pixel{where}: nothing to repaint (white, >= 128 of 255, = '
      'repaint); for a variation of the whole image use --strength without --mask.'
    )
  if used.all():
    raise EditError(
      f'--mask {path} is all white{where}: nothing of the image is kept (black = keep); to '
      'generate a new image drop --mask, or use --strength to start from this one.'
    )
  return repaint


def fit_mask(repaint: np.ndarray, size: int) -> np.ndarray:
  """A repaint mask [H, W] bool fitted like its image: float32 [size, size, 1], 1 where any
  part of the pixel is to be repainted, else 0."""
  mask = Image.fromarray(repaint.astype(np.float32), mode='F')
  square = mask.crop(square_box(mask.size))
  if square.size != (size, size):
    square = square.resize((size, size), Image.Resampling.BOX)
  return (np.asarray(square, np.float32) > 1e-6).astype(np.float32)[..., None]


def to_model(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1], as training (data/preprocess.to_float)."""
  return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """What one stage of an edit needs: the sizes the image is fitted to, and the mode."""

  lowres: int = 0  # first stage is SR: its low-res input size (upscaling), else 0
  x_init: int = 0  # the image at this size starts image-to-image / keeps the known region
  mask: int = 0  # inpainting: the mask at this size


def plan(stages: Sequence, *, strength: float | None, inpaint: bool) -> list[StagePlan]:
  """Per-stage sizes of an edit of stages [cascade.Stage] (their configs say the sizes).

  The first stage, when super-resolution, takes the image as its low-res input; image-to-image
  (strength < 1) starts the first stage from the image; inpainting keeps the known region on
  every stage.
  """
  from imagen_jax import stage as stage_lib

  plans = []
  for i, st in enumerate(stages):
    data = st.config.data
    resolution = int(data.resolution)
    lowres = (
      int(data.lowres_resolution) if i == 0 and stage_lib.is_super_resolution(st.config) else 0
    )
    img2img = i == 0 and strength is not None and strength < 1.0
    plans.append(
      StagePlan(
        lowres=lowres,
        x_init=resolution if img2img or inpaint else 0,
        mask=resolution if inpaint else 0,
      )
    )
  return plans


def describe_plan(
  path: pathlib.Path, size: tuple[int, int], stages: Sequence, plans: Sequence[StagePlan]
) -> list[str]:
  """The log lines saying how an image is fitted for each stage."""
  lines = []
  for st, p in zip(stages, plans, strict=True):
    name = st.config.stage
    if p.lowres:
      lines.append(describe_fit(path, size, p.lowres, f"{name}'s low-res input (upscaling)"))
    if p.x_init:
      what = 'the known region' if p.mask else 'the start of image-to-image'
      lines.append(describe_fit(path, size, p.x_init, f'{name} ({what})'))
  return lines


def stage_arrays(
  images: Sequence[Image.Image], masks: Sequence[np.ndarray | None], plans: Sequence[StagePlan]
) -> tuple[np.ndarray | None, list[tuple[np.ndarray | None, np.ndarray | None]]]:
  """(lowres [B, r, r, 3] or None, per stage (x_init [B, R, R, 3] or None, mask [B, R, R, 1] or
  None)) for a batch of images (float32, [-1, 1]) and their repaint masks."""
  lowres = None
  if plans[0].lowres:
    lowres = to_model(np.stack([fit_image(im, plans[0].lowres) for im in images]))
  per_stage = []
  for p in plans:
    x_init = to_model(np.stack([fit_image(im, p.x_init) for im in images])) if p.x_init else None
    mask = np.stack([fit_mask(m, p.mask) for m in masks]) if p.mask else None
    per_stage.append((x_init, mask))
  return lowres, per_stage
