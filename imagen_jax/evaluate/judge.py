"""The judge: a small digit classifier that scores generated images, and gives the feature
space of the Fréchet distance and the precision/recall manifolds.

Trained on the real digits *train* split only (imagen_jax.data.digits), at the stage's
resolution, on images in [-1, 1] RGB exactly as the training pipeline feeds the U-Net. The
network works at `JUDGE_RESOLUTION` internally (inputs are resized with antialiasing; the
digits hold 8x8 pixels of information), so one architecture serves every stage resolution:

  x [N, R, R, 3] -> resize 16x16 -> conv3x3(32) relu -> avgpool2 -> conv3x3(64) relu -> avgpool2
    -> flatten [N, 1024] -> dense(64) relu = features [N, 64] -> dense(10) = logits [N, 10]

Training: Adam, cross-entropy, random shifts of +-1 pixel (at 16 px) as augmentation, a fixed
number of steps; batches and init come from `seed`, so the result is
deterministic on one machine. 7-35 s on 2 CPU cores (idle to heavily shared).

Cached at `cache_dir/judge-r<R>-<fingerprint>.npz` (params + metadata, written to a temporary
name then renamed), reused by later runs; the fingerprint covers the dataset version, split,
resolution, seed and every training setting.
"""

import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
import uuid
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from imagen_jax.data import digits
from imagen_jax.data.sources import _hash

log = logging.getLogger(__name__)

JUDGE_VERSION = 1  # bump when the architecture or training changes: caches retrain
JUDGE_RESOLUTION = 16
FEATURE_DIM = 64
TRAIN_SETTINGS = {'steps': 600, 'batch_size': 64, 'lr': 2e-3, 'max_shift': 1}
_CHUNK = 256  # images per forward pass (one compiled shape)


class JudgeError(ValueError):
  """A missing, unreadable or mismatched judge file; the message says the fix."""


Params = dict[str, dict[str, jax.Array]]


def init_params(rng: jax.Array) -> Params:
  """He-normal weights, zero biases."""
  shapes = {
    'conv1': (3, 3, 3, 32),
    'conv2': (3, 3, 32, 64),
    'dense': ((JUDGE_RESOLUTION // 4) ** 2 * 64, FEATURE_DIM),
    'logits': (FEATURE_DIM, digits.NUM_CLASSES),
  }
  params = {}
  for (name, shape), key in zip(shapes.items(), jax.random.split(rng, len(shapes)), strict=True):
    fan_in = int(np.prod(shape[:-1]))
    w = jax.random.normal(key, shape, jnp.float32) * np.sqrt(2.0 / fan_in)
    params[name] = {'w': w, 'b': jnp.zeros((shape[-1],), jnp.float32)}
  return params


def _conv(x: jax.Array, layer: dict) -> jax.Array:
  y = jax.lax.conv_general_dilated(
    x, layer['w'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  return y + layer['b']


def _avgpool2(x: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def to_judge_resolution(images: jax.Array) -> jax.Array:
  """[N, R, R, 3] -> [N, 16, 16, 3], antialiased linear resize (identity at R = 16)."""
  n, h, w, c = images.shape
  if (h, w) == (JUDGE_RESOLUTION, JUDGE_RESOLUTION):
    return images
  return jax.image.resize(images, (n, JUDGE_RESOLUTION, JUDGE_RESOLUTION, c), 'linear')


def forward(params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """images [N, 16, 16, 3] in [-1, 1] -> (features [N, 64], logits [N, 10])."""
  x = jax.nn.relu(_conv(images, params['conv1']))  # [N, 16, 16, 32]
  x = jax.nn.relu(_conv(_avgpool2(x), params['conv2']))  # [N, 8, 8, 64]
  x = _avgpool2(x).reshape(images.shape[0], -1)  # [N, 1024]
  features = jax.nn.relu(x @ params['dense']['w'] + params['dense']['b'])  # [N, 64]
  logits = features @ params['logits']['w'] + params['logits']['b']  # [N, 10]
  return features, logits


@jax.jit
def _predict(params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  return forward(params, to_judge_resolution(images))


def _shift(images: jax.Array, shifts: jax.Array) -> jax.Array:
  """Per-image translation by integer (dy, dx), [N, 2]; the black border makes a roll exact
  enough (what wraps around is background)."""
  return jax.vmap(lambda im, s: jnp.roll(im, (s[0], s[1]), axis=(0, 1)))(images, shifts)


@functools.partial(jax.jit, static_argnames=('tx', 'max_shift'), donate_argnums=(0, 1))
def _train_step(params, opt_state, x, y, key, *, tx, max_shift: int):
  """One Adam step on softmax cross-entropy of a shifted batch x [B, 16, 16, 3], y [B]."""

  def loss_fn(p):
    shifts = jax.random.randint(key, (x.shape[0], 2), -max_shift, max_shift + 1)
    _, logits = forward(p, _shift(x, shifts))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@dataclasses.dataclass
class Judge:
  """A trained judge for images of `resolution` px."""

  params: Params
  resolution: int
  test_accuracy: float  # on the real digits test split
  meta: dict[str, Any]
  path: str | None = None

  def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """images [N, R, R, 3] float in [-1, 1] -> (classes [N] int, features [N, 64] float32)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (self.resolution, self.resolution, 3):
      raise JudgeError(
        f'The judge scores [N, {self.resolution}, {self.resolution}, 3] images; got {images.shape}.'
      )
    classes, features = [], []
    for start in range(0, len(images), _CHUNK):
      chunk = images[start : start + _CHUNK]
      padded = np.zeros((_CHUNK, *chunk.shape[1:]), np.float32)  # one compiled shape
      padded[: len(chunk)] = chunk
      feats, logits = _predict(self.params, padded)
      classes.append(np.asarray(jnp.argmax(logits, -1))[: len(chunk)])
      features.append(np.asarray(feats)[: len(chunk)])
    if not classes:
      return np.zeros((0,), np.int64), np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(classes).astype(np.int64), np.concatenate(features)


def fingerprint(resolution: int, seed: int) -> str:
  """What decides the judge's weights: code version, data, resolution, seed, settings."""
  split = digits.split_indices('train')
  return _hash(
    [
      'judge',
      JUDGE_VERSION,
      digits.DATASET_VERSION,
      _hash(split.tolist()),
      int(resolution),
      int(seed),
      TRAIN_SETTINGS,
    ]
  )


def train_judge(*, resolution: int, seed: int = 0) -> Judge:
  """Trains a judge on the real train split; measures its accuracy on the real test split."""
  start = time.perf_counter()
  train_images, train_labels = digits.load_split('train', resolution)
  x = to_judge_resolution(jnp.asarray(digits.to_float(train_images)))  # [N, 16, 16, 3]
  s = TRAIN_SETTINGS
  rng = np.random.default_rng(seed)
  per_epoch = len(train_labels) // s['batch_size']
  epochs = -(-s['steps'] // per_epoch)
  order = np.concatenate([rng.permutation(len(train_labels)) for _ in range(epochs)])
  batch_idx = order[: s['steps'] * s['batch_size']].reshape(s['steps'], s['batch_size'])
  init_rng, shift_rng = jax.random.split(jax.random.key(seed))
  # A Python loop over one jitted step: XLA:CPU runs convolutions inside a lax.scan ~40x slower.
  tx = optax.adam(s['lr'])
  params = init_params(init_rng)
  opt_state = tx.init(params)
  labels = jnp.asarray(train_labels)
  losses = []
  for i, key in enumerate(jax.random.split(shift_rng, s['steps'])):
    idx = batch_idx[i]
    params, opt_state, loss = _train_step(
      params, opt_state, x[idx], labels[idx], key, tx=tx, max_shift=s['max_shift']
    )
    losses.append(loss)
  params = jax.tree.map(np.asarray, params)
  judge = Judge(params=params, resolution=int(resolution), test_accuracy=0.0, meta={})
  test_images, test_labels = digits.load_split('test', resolution)
  predicted, _ = judge.predict(digits.to_float(test_images))
  judge.test_accuracy = float(np.mean(predicted == test_labels))
  judge.meta = {
    'judge_version': JUDGE_VERSION,
    'fingerprint': fingerprint(resolution, seed),
    'resolution': int(resolution),
    'seed': int(seed),
    'test_accuracy': judge.test_accuracy,
    'final_loss': float(np.asarray(losses)[-20:].mean()),
    'train_seconds': round(time.perf_counter() - start, 2),
    **TRAIN_SETTINGS,
  }
  log.info(
    'Judge trained in %.1f s at %d px: real test accuracy %.4f.',
    judge.meta['train_seconds'],
    resolution,
    judge.test_accuracy,
  )
  return judge


def save_judge(judge: Judge, path: str | os.PathLike) -> None:
  """Atomic write (temporary file in the same folder, then rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {
    f'{layer}/{k}': np.asarray(v) for layer, d in judge.params.items() for k, v in d.items()
  }
  arrays['meta'] = np.array(json.dumps(judge.meta, sort_keys=True))
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')
  try:
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  judge.path = str(path)


def load_judge(path: str | os.PathLike) -> Judge:
  """A judge saved by `save_judge`; JudgeError naming the problem if it cannot be used."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise JudgeError(f'Judge file {path} does not exist; omit --judge to train and cache one.')
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy file: one array, no fields
      raise ValueError('not an .npz archive of a judge')
    with data:
      meta = json.loads(str(data['meta']))
      if not isinstance(meta, dict):
        raise ValueError('its meta field is not a JSON object')
      params: Params = {}
      for key in data.files:
        if key != 'meta':
          layer, name = key.split('/')
          params.setdefault(layer, {})[name] = np.asarray(data[key], np.float32)
      resolution, test_accuracy = int(meta['resolution']), float(meta['test_accuracy'])
  # zipfile.BadZipFile: a truncated file (a copy cut short); EOFError: an empty one.
  except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
    raise JudgeError(
      f'Judge file {path} is unreadable ({type(e).__name__}: {e}); pass a judge file that '
      'evaluate.py saved, or omit --judge to train and cache one.'
    ) from e
  if meta.get('judge_version') != JUDGE_VERSION:
    raise JudgeError(
      f'Judge file {path} was made by another judge version ({meta.get("judge_version")}, '
      f'this code: {JUDGE_VERSION}); omit --judge to train a new one.'
    )
  expected = jax.tree.map(np.shape, init_params(jax.random.key(0)))
  if jax.tree.map(np.shape, params) != expected:
    raise JudgeError(
      f"Judge file {path} holds layers of other shapes than this judge version's; it is not a "
      'judge evaluate.py saved. Omit --judge to train a new one.'
    )
  return Judge(
    params=params,
    resolution=resolution,
    test_accuracy=test_accuracy,
    meta=meta,
    path=str(path),
  )


def default_path(cache_dir: str | os.PathLike, resolution: int, seed: int = 0) -> pathlib.Path:
  return pathlib.Path(cache_dir) / f'judge-r{int(resolution)}-{fingerprint(resolution, seed)}.npz'


def load_or_train(
  *, resolution: int, cache_dir: str | os.PathLike = 'cache/judge', seed: int = 0
) -> Judge:
  """The cached judge for (resolution, seed), trained and cached on first use.

  An unreadable cache file is retrained and replaced (it is only a cache); use `load_judge`
  for a file the user named.
  """
  path = default_path(cache_dir, resolution, seed)
  if path.is_file():
    try:
      judge = load_judge(path)
      if judge.meta.get('fingerprint') == fingerprint(resolution, seed):
        return judge
      log.warning('Judge cache %s does not match this data/settings; retraining.', path)
    except JudgeError as e:
      log.warning('%s Retraining it.', e)
  judge = train_judge(resolution=resolution, seed=seed)
  try:
    save_judge(judge, path)
  except OSError as e:
    log.warning('Could not cache the judge at %s (%s); continuing without the cache.', path, e)
  return judge
