"""Decoding (every Pillow mode, EXIF, bad files) and the resize / crop policy."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import preprocess
from imagen_jax.data.preprocess import PreprocessOptions, SkipExample

pytestmark = pytest.mark.unit


def _encode(image: Image.Image, fmt: str = 'PNG', **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
  crc = zlib.crc32(tag + data) & 0xFFFFFFFF
  return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', crc)


def bomb_png_bytes(side: int = 100_000) -> bytes:
  """A tiny PNG whose header claims side x side RGB pixels (a decompression bomb)."""
  ihdr = struct.pack('>IIBBBBB', side, side, 8, 2, 0, 0, 0)
  return (
    b'\x89PNG\r\n\x1a\n'
    + _png_chunk(b'IHDR', ihdr)
    + _png_chunk(b'IDAT', zlib.compress(b'\x00' * 64))
    + _png_chunk(b'IEND', b'')
  )


def test_rgba_composited_on_white():
  array = np.zeros((4, 4, 4), np.uint8)
  array[..., 0] = 255  # red
  array[0, 0, 3] = 0  # fully transparent -> white
  array[0, 1, 3] = 128  # half transparent red -> pink
  array[1:, :, 3] = 255
  rgb = np.asarray(preprocess.decode_image(_encode(Image.fromarray(array, 'RGBA'))))
  assert rgb.shape == (4, 4, 3)
  np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])
  # uint8 alpha compositing: 127.5 rounds either way (Pillow version), so +-1 level.
  np.testing.assert_allclose(rgb[0, 1], [255, 127, 127], atol=1)
  np.testing.assert_array_equal(rgb[2, 2], [255, 0, 0])


def test_la_and_greyscale_modes():
  la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), 'LA')
  np.testing.assert_array_equal(
    np.asarray(preprocess.decode_image(_encode(la))), [[[255, 255, 255], [0, 0, 0]]]
  )
  grey = Image.fromarray(np.full((3, 5), 77, np.uint8), 'L')
  out = np.asarray(preprocess.decode_image(_encode(grey)))
  assert out.shape == (3, 5, 3) and (out == 77).all()
  bilevel = Image.new('1', (4, 4), 1)
  assert (np.asarray(preprocess.decode_image(_encode(bilevel))) == 255).all()


def test_palette_with_transparency():
  image = Image.new('P', (4, 4), 0)
  image.putpalette([0, 0, 255] + [0, 255, 0] * 255)  # index 0 blue, others green
  image.putpixel((0, 0), 1)
  data = _encode(image, transparency=0)  # index 0 transparent
  rgb = np.asarray(preprocess.decode_image(data))
  np.testing.assert_array_equal(rgb[0, 0], [0, 255, 0])
  np.testing.assert_array_equal(rgb[3, 3], [255, 255, 255])


def test_sixteen_bit_int_and_float_greyscale():
  i16 = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))  # 'I;16'
  assert i16.mode.startswith('I;16')
  np.testing.assert_array_equal(
    np.asarray(preprocess.decode_image(_encode(i16)))[0, :, 0], [0, 128, 255]
  )
  # tRNS in a 16-bit greyscale PNG: the one 16-bit value it names is transparent (white), and
  # the 8-bit grey it rescales to (1000 / 257 -> 4) is not.
  i16 = Image.fromarray(np.array([[0, 1000, 1028, 65535]], np.uint16))
  np.testing.assert_array_equal(
    np.asarray(preprocess.decode_image(_encode(i16, transparency=1000)))[0, :, 0],
    [0, 255, 4, 255],
  )
  i32 = Image.fromarray(np.array([[0, 1000, 65535]], np.int32), 'I')
  np.testing.assert_array_equal(np.asarray(preprocess.decode_image(i32))[0, :, 0], [0, 4, 255])
  f32 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), 'F')
  np.testing.assert_array_equal(np.asarray(preprocess.decode_image(f32))[0, :, 0], [0, 128, 255])


def test_cmyk_jpeg():
  image = Image.new('CMYK', (8, 8), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
  rgb = np.asarray(preprocess.decode_image(_encode(image, 'JPEG', quality=95)))
  assert rgb.shape == (8, 8, 3)
  assert rgb[4, 4, 0] > 200 and rgb[4, 4, 1] < 60 and rgb[4, 4, 2] < 60


def test_exif_orientation_applied():
  array = np.zeros((8, 16, 3), np.uint8)  # landscape: left half red, right half blue
  array[:, :8, 0] = 255
  array[:, 8:, 2] = 255
  exif = Image.Exif()
  exif[0x0112] = 6  # display needs a 90 degree clockwise rotation
  data = _encode(Image.fromarray(array), 'JPEG', quality=95, exif=exif.tobytes())
  rgb = np.asarray(preprocess.decode_image(data))
  assert rgb.shape == (16, 8, 3)  # portrait after transposition
  assert rgb[2, 4, 0] > 200 and rgb[2, 4, 2] < 60  # red on top
  assert rgb[13, 4, 2] > 200 and rgb[13, 4, 0] < 60  # blue at the bottom


def test_array_and_hf_dict_inputs():
  image = np.full((6, 6, 3), 9, np.uint8)
  assert (np.asarray(preprocess.decode_image(image)) == 9).all()
  assert (np.asarray(preprocess.decode_image(image.astype(np.float32) / 255.0)) == 9).all()
  data = _encode(Image.fromarray(image))
  assert (np.asarray(preprocess.decode_image({'bytes': data, 'path': None})) == 9).all()


@pytest.mark.parametrize(
  'name, payload',
  [
    ('corrupt png', b'\x89PNG\r\n\x1a\n' + b'garbage' * 20),
    ('zero bytes', b''),
    ('not an image', b'just some text, not pixels\n' * 10),
  ],
)
def test_bad_bytes_are_skip_examples(name, payload):
  with pytest.raises(SkipExample):
    preprocess.decode_image(payload)


def _tiff_with_a_strip_offset_past_2_63() -> bytes:
  """A TIFF whose StripOffsets tag is an 8-byte LONG8 holding 2**64 - 1: Pillow's seek to it
  raises OverflowError (an error type the decoder's skip list lacked; a fuzzer found it)."""
  data = bytearray(_encode(Image.new('RGB', (16, 12)), 'TIFF'))
  assert data[:4] == b'II*\x00'
  ifd = struct.unpack_from('<I', data, 4)[0]
  far = len(data)
  data += b'\xff' * 8
  for i in range(struct.unpack_from('<H', data, ifd)[0]):
    entry = ifd + 2 + 12 * i
    if struct.unpack_from('<H', data, entry)[0] == 273:  # StripOffsets
      struct.pack_into('<HHII', data, entry, 273, 16, 1, far)  # type 16: LONG8, one, at `far`
  return bytes(data)


def test_any_error_a_damaged_file_raises_in_its_decoder_is_a_skip(tmp_path):
  # It escaped as OverflowError from bytes (webdataset, HF, ArrayRecord rows): the pipeline
  # re-raised it, naming no file, and every resume met the same example again.
  data = _tiff_with_a_strip_offset_past_2_63()
  with pytest.raises(SkipExample, match=r'cannot decode image \(OverflowError: '):
    preprocess.load_and_preprocess(data, PreprocessOptions(resolution=8))
  path = tmp_path / 'bad.tif'
  path.write_bytes(data)
  with pytest.raises(SkipExample, match='cannot decode image'):
    preprocess.load_and_preprocess(str(path), PreprocessOptions(resolution=8))


def test_truncated_jpeg_and_zero_byte_file(tmp_path):
  rng = np.random.default_rng(0)
  data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)), 'JPEG')
  with pytest.raises(SkipExample, match='decode'):
    preprocess.decode_image(data[: len(data) // 2])
  empty = tmp_path / 'empty.png'
  empty.write_bytes(b'')
  with pytest.raises(SkipExample, match='zero-byte'):
    preprocess.decode_image(str(empty))
  with pytest.raises(SkipExample, match='decode'):
    preprocess.decode_image(str(tmp_path / 'missing.png'))


def test_decompression_bombs_rejected(monkeypatch):
  with pytest.raises(SkipExample, match='decompression bomb'):
    preprocess.decode_image(bomb_png_bytes())
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
  # Between Pillow's warning limit and its error limit (twice that) an image is decoded, as Pillow
  # does: photos of 89.5-179 MP were skipped and counted as broken files.
  with pytest.warns(Image.DecompressionBombWarning):
    assert preprocess.decode_image(_encode(Image.new('RGB', (40, 40)))).size == (40, 40)
  with pytest.raises(SkipExample, match='decompression bomb guard'):  # 2500 > 2 x 1000
    preprocess.decode_image(_encode(Image.new('RGB', (50, 50))))
  with pytest.raises(SkipExample, match=r'2 x PIL.Image.MAX_IMAGE_PIXELS = 2000'):  # decoded
    preprocess.decode_image(Image.new('RGB', (50, 50)))


def test_centre_crop_keeps_the_middle():
  array = np.zeros((10, 30, 3), np.uint8)
  array[:, 10:20, 1] = 255  # green centre, black sides
  image, lowres = preprocess.preprocess_image(Image.fromarray(array), PreprocessOptions(10))
  assert lowres is None
  np.testing.assert_array_equal(image, array[:, 10:20])


def test_shorter_side_resize_then_crop_shape():
  image = Image.new('RGB', (64, 40), (10, 20, 30))
  out, _ = preprocess.preprocess_image(image, PreprocessOptions(16))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  # uint8 resampling of a flat colour: filter weights sum to 1 up to rounding, +-1 level.
  np.testing.assert_allclose(out, np.broadcast_to([10, 20, 30], out.shape), atol=1)


def test_random_crop_native_scale_is_deterministic():
  array = np.random.default_rng(1).integers(0, 255, (15, 15, 3), np.uint8)
  options = PreprocessOptions(10, lowres_resolution=5, random_crop=True)
  crops = []
  for seed in (7, 7, 8, 9, 10):
    crop, lowres = preprocess.preprocess_image(
      Image.fromarray(array), options, np.random.default_rng(seed)
    )
    assert crop.shape == (10, 10, 3) and lowres.shape == (5, 5, 3)
    # Between 1x and 2x the resolution: a crop at native scale, an exact window.
    windows = [
      (t, l) for t in range(6) for l in range(6) if (array[t : t + 10, l : l + 10] == crop).all()
    ]
    assert windows
    crops.append(crop)
  np.testing.assert_array_equal(crops[0], crops[1])
  assert any((c != crops[0]).any() for c in crops[2:])


def test_large_images_are_scaled_to_twice_the_resolution_before_random_crop():
  # Horizontal ramp 0..255 over 100 px. Scaled to 20 px wide, a 10 px crop spans about
  # half of the ramp (~120 levels); a native-scale crop would span ~23, a full-image ~230.
  ramp = np.broadcast_to(np.linspace(0, 255, 100)[None, :, None], (100, 100, 3))
  image = Image.fromarray(ramp.round().astype(np.uint8))
  options = PreprocessOptions(10, random_crop=True)
  for seed in range(3):
    crop, _ = preprocess.preprocess_image(image, options, np.random.default_rng(seed))
    assert crop.shape == (10, 10, 3)
    span = float(crop[..., 0].mean(axis=0).max() - crop[..., 0].mean(axis=0).min())
    assert 90 < span < 150, span


def test_small_images_skip_or_upsample():
  tiny = Image.new('RGB', (6, 9), (200, 0, 0))
  with pytest.raises(SkipExample, match='smaller than resolution'):
    preprocess.preprocess_image(tiny, PreprocessOptions(8))
  out, low = preprocess.preprocess_image(
    tiny, PreprocessOptions(8, lowres_resolution=4, small_images='upsample')
  )
  assert out.shape == (8, 8, 3) and low.shape == (4, 4, 3)


def test_upsampling_a_thin_strip_resamples_only_the_window_it_keeps(monkeypatch):
  # A 2x900 strip at res 1024 used to be scaled whole to 1024x460800 (1.4 GB of RGB) to keep a
  # 1024x1024 window of it; several loader workers doing that ran out of memory.
  sizes = []
  resize = Image.Image.resize

  def recording_resize(self, size, *args, **kwargs):
    sizes.append(tuple(size))
    return resize(self, size, *args, **kwargs)

  monkeypatch.setattr(Image.Image, 'resize', recording_resize)
  strip = Image.new('RGB', (2, 900), (10, 200, 30))
  for random_crop in (False, True):
    options = PreprocessOptions(1024, small_images='upsample', random_crop=random_crop)
    out, _ = preprocess.preprocess_image(strip, options, np.random.default_rng(0))
    assert out.shape == (1024, 1024, 3) and (out == (10, 200, 30)).all()
  assert sizes and max(w * h for w, h in sizes) <= 4 * 1024 * 1024, sizes
  monkeypatch.undo()

  # The window equals the same window of the whole scaled image (Pillow's box filter stops at
  # the box, so a margin is resampled and cropped off), up to one level of float box rounding.
  rng = np.random.default_rng(0)
  for width, height in ((5, 7), (12, 9), (3, 20), (30, 4)):
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    whole = preprocess._resize_shorter_side(image, 16)
    for random_crop in (False, True):
      options = PreprocessOptions(16, small_images='upsample', random_crop=random_crop)
      got, _ = preprocess.preprocess_image(image, options, np.random.default_rng(1))
      draws = np.random.default_rng(1)
      if random_crop:
        left = int(draws.integers(0, whole.width - 15))
        top = int(draws.integers(0, whole.height - 15))
      else:
        left, top = (whole.width - 16) // 2, (whole.height - 16) // 2
      want = np.asarray(whole.crop((left, top, left + 16, top + 16)), np.int16)
      assert np.abs(got.astype(np.int16) - want).max() <= 1, (width, height, random_crop)


def test_empty_and_boolean_arrays():
  # A [0, W, 3] array (an HF / tfds row) divided by zero inside the worker and stopped the run.
  empty = np.zeros((0, 5, 3), np.uint8)
  with pytest.raises(SkipExample, match='smaller than resolution'):
    preprocess.load_and_preprocess(empty, PreprocessOptions(8))
  with pytest.raises(SkipExample, match='no pixels'):
    preprocess.load_and_preprocess(empty, PreprocessOptions(8, small_images='upsample'))
  mask = np.zeros((8, 8), bool)
  mask[:4] = True
  out, _ = preprocess.load_and_preprocess(mask, PreprocessOptions(8))
  assert out[:4].min() == 255 and out[4:].max() == 0  # True is white, not 1 of 255


def test_to_float_range_and_bad_options():
  x = preprocess.to_float(np.array([0, 128, 255], np.uint8))
  assert x.dtype == np.float32
  # f32 x / 127.5 - 1: two roundings of values <= 1 (<= 1.2e-7); 1e-6 is ~8 ulp. One uint8
  # level is 7.8e-3, so an off-by-one scale still fails.
  np.testing.assert_allclose(x, [-1.0, 128 / 127.5 - 1.0, 1.0], atol=1e-6)
  with pytest.raises(ValueError, match='small_images'):
    PreprocessOptions(8, small_images='grow')
  with pytest.raises(ValueError, match='lowres_resolution'):
    PreprocessOptions(8, lowres_resolution=16)
