"""Image arrays to PNG files and grids."""

import math
import os
import pathlib
from collections.abc import Callable

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[..., H, W, 3] floats in [-1, 1] -> uint8 in [0, 255]."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, *, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """[N, H, W, 3] uint8 -> one [rows * (H + pad) + pad, ..., 3] uint8 grid on white."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top : top + h, left : left + w] = image
  return grid


def save_png(array: np.ndarray, path: str | os.PathLike, *, overwrite: bool = False) -> None:
  """Write a uint8 [H, W, 3] array atomically; refuse to replace an existing file unless told."""
  path = pathlib.Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path} exists; pass --overwrite to replace it.')
  write_atomically(path, lambda tmp: Image.fromarray(array).save(tmp, format='PNG'))


def write_atomically(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
  """write(tmp) to '.NAME.tmp' beside `path`, then rename it over `path`: a reader sees the
  whole file or none. A failed write (a full disk, a stop) removes its cut temporary file."""
  tmp = path.with_name(f'.{path.name}.tmp')
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
