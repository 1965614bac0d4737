"""Precompute: captions of an image folder -> embedding cache, in-process (8 fake devices,
sharded encoder) and through the CLI with a config override."""

import errno
import functools
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imagen_jax import precompute
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import encoder as encoder_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CAPTIONS = ['a red square', 'a blue square', 'a green circle', 'a red square', 'a cat']


def write_image_folder(path: pathlib.Path) -> None:
  path.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  with open(path / 'metadata.jsonl', 'w', encoding='utf-8') as f:
    for i, caption in enumerate(CAPTIONS):
      name = f'img{i}.png'
      Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path / name)
      f.write(json.dumps({'file_name': name, 'text': caption}) + '\n')


def make_config(images: pathlib.Path, cache_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """The `text`, `data` and `mesh` sections of configs/common.py that precompute reads."""
  c = ml_collections.ConfigDict()
  c.text = ml_collections.ConfigDict()
  c.text.encoder = 't5-tiny-random'
  c.text.max_length = 16
  c.text.cache_dir = str(cache_dir)
  c.text.precompute_batch_size = 4
  c.text.auto_precompute = True
  c.data = ml_collections.ConfigDict()
  c.data.source = 'folder'
  c.data.path = str(images)
  c.data.split = 'train'
  c.data.image_column = 'image'
  c.data.caption_column = 'text'
  c.data.max_skip_fraction = 0.01
  c.data.max_examples = 0
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 2
  return c


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  path = tmp_path_factory.mktemp('images')
  write_image_folder(path)
  return path


@pytest.mark.unit
def test_precompute_and_open_or_build(images, tmp_path):
  config = make_config(images, tmp_path / 'cache')
  with pytest.raises(cache_lib.CacheError, match='No embedding cache'):
    precompute.open_or_build_cache(config, build_if_missing=False)

  mesh = precompute.make_encoder_mesh(config)
  assert mesh is not None and dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  cache = precompute.open_or_build_cache(config, build_if_missing=True)
  assert cache.num_captions == 4  # deduplicated
  again = precompute.open_or_build_cache(config, build_if_missing=False)
  assert again.path == cache.path

  # The 8-device sharded build stores what a single-device encoder computes.
  reference = encoder_lib.load_text_encoder('t5-tiny-random', max_length=16)
  embs, mask = cache.lookup(CAPTIONS)
  want, want_mask = reference.encode(CAPTIONS)
  np.testing.assert_array_equal(mask, want_mask)
  # bfloat16 encoder (2 layers) sharded 8 ways vs one device: reduction order flips bf16
  # roundings (ulp 3.9e-3 at |x| ~ 1); measured 0.023 (6 ulp) at |x| = 0.95 on AVX-512, half
  # of the old atol=0.03, rtol=0.02. 0.05 leaves 4x; a wrong or shifted row is off by >= 0.5.
  np.testing.assert_allclose(embs, want, atol=0.05, rtol=0.05)

  config.text.max_length = 8
  with pytest.raises(cache_lib.CacheError, match='max_length is 16 there but 8 now'):
    precompute.open_or_build_cache(config, build_if_missing=False)


@pytest.mark.unit
def test_a_home_relative_cache_dir_is_the_home_folder(images, tmp_path, monkeypatch):
  # `--config.text.cache_dir=~/emb` reaches the program unexpanded (bash expands '~' only at a
  # word's start or in NAME=~ assignments). It built the cache in a folder named '~' under the
  # current directory, and the saved config named a path that another directory cannot find.
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  home.mkdir()
  cwd.mkdir()
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.chdir(cwd)
  config = make_config(images, '~/emb')
  config.mesh.fsdp = 1
  cache = precompute.open_or_build_cache(config, build_if_missing=True)  # precompute, no workdir
  assert cache.path.parent == home / 'emb'
  assert not (cwd / '~').exists()
  precompute.resolve_cache_dir(config, tmp_path / 'run')  # train.py: what its checkpoints save
  assert config.text.cache_dir == str(home / 'emb')
  config.text.cache_dir = 'emb'
  precompute.resolve_cache_dir(config, '~/run')
  assert config.text.cache_dir == str(home / 'run' / 'emb')


@pytest.mark.unit
def test_other_weights_in_the_same_folder_get_their_own_cache(images, tmp_path, caplog):
  from imagen_jax.text import t5
  from tests import t5_test

  folder = tmp_path / 't5'
  t5_test.write_hf_folder(folder, sharded=False)
  config = make_config(images, tmp_path / 'cache')
  config.text.encoder = str(folder)
  config.mesh.fsdp = 1
  first = precompute.open_or_build_cache(config, build_if_missing=True)
  assert precompute.encoder_id(config) == f'{folder}#{t5.folder_fingerprint(str(folder))}'
  precompute.record_encoder_fingerprint(config)  # what train.py saves with its checkpoints
  assert config.text.encoder_fingerprint == t5.folder_fingerprint(str(folder))
  with caplog.at_level(logging.WARNING):
    precompute.check_encoder_unchanged(config)
  assert 'another checkpoint' not in caplog.text
  # The folder now holds another checkpoint of the same architecture: a new cache is built
  # from it instead of the old embeddings being reused.
  other = t5_test._tiny_weights(t5.read_config(folder), seed=7)
  t5_test.write_hf_folder(folder, sharded=True, weights=other)
  (folder / 'model.safetensors').unlink()
  second = precompute.open_or_build_cache(config, build_if_missing=True)
  assert second.path != first.path
  # Sampling with the saved config (old fingerprint) warns: its prompts would be encoded by
  # another model than the one the U-Net learned from.
  with caplog.at_level(logging.WARNING):
    precompute.check_encoder_unchanged(config)
  assert f'The T5 folder {folder} holds another checkpoint' in caplog.text
  fresh = encoder_lib.load_text_encoder(str(folder), max_length=16)
  embs, mask = fresh.encode(['a cat'])
  want = np.asarray(embs[0][mask[0]], np.float32)
  # Tolerance: the cache holds bfloat16, encoded at the precompute batch shape.
  np.testing.assert_allclose(
    np.asarray(second.get('a cat'), np.float32), want, atol=0.05, rtol=0.05
  )
  assert np.abs(np.asarray(first.get('a cat'), np.float32) - want).max() > 0.5  # the old model's


@pytest.mark.unit
def test_sampling_checks_every_stages_t5_fingerprint(images, tmp_path, caplog):
  # Two stages that name the same T5 folder but trained while it held other checkpoints share
  # one encoding; the folder's checkpoint was checked only against the first stage's, so a
  # stale second stage was conditioned on another model's embeddings without a word.
  import types

  from imagen_jax import sample_lib
  from imagen_jax.text import t5
  from tests import t5_test

  folder = tmp_path / 't5'
  t5_test.write_hf_folder(folder, sharded=False)

  def stage(fingerprint):
    config = make_config(images, tmp_path / 'cache')
    config.text.encoder = str(folder)
    config.text.encoder_fingerprint = fingerprint
    config.mesh.fsdp = 1
    return types.SimpleNamespace(config=config)

  current, stale = stage(t5.folder_fingerprint(str(folder))), stage('0123456789ab')
  for order in ([current, stale], [stale, current]):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      sample_lib._encode_per_stage(['a cat'], order)
    assert caplog.text.count('holds another checkpoint') == 1, (order, caplog.text)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    sample_lib._encode_per_stage(['a cat'], [current, current])
  assert 'another checkpoint' not in caplog.text


@pytest.mark.unit
def test_a_run_whose_t5_folder_is_gone_is_one_message_in_sample_and_evaluate(images, tmp_path):
  # sample.py and evaluate.py ended with a T5CheckpointError traceback (exit 1) after the
  # U-Nets were restored; SampleError and EvalError are their one-line, exit-2 errors.
  import types

  from imagen_jax import sample_lib
  from imagen_jax.evaluate import runner

  config = make_config(images, tmp_path / 'cache')
  config.text.encoder = str(tmp_path / 'moved_t5')
  config.mesh.fsdp = 1
  stage = types.SimpleNamespace(config=config, workdir='runs/base')
  with pytest.raises(sample_lib.SampleError, match=r'^runs/base was trained with the text enc'):
    sample_lib.encode_prompts(['a cat'], [stage])
  with pytest.raises(runner.EvalError, match=r"moved_t5' does not exist. Pass an existing"):
    runner.encode_prompts(config, ['a cat'])


@pytest.mark.unit
def test_touched_or_moved_images_reuse_the_cache_of_the_same_captions(
  tmp_path, monkeypatch, caplog
):
  # A folder's fingerprint covers its path and mtimes: touching or moving the images used to
  # re-encode every caption (hours of T5-XXL) into a new cache of the same bytes.
  images = tmp_path / 'images'
  write_image_folder(images)
  config = make_config(images, tmp_path / 'cache')
  config.mesh.fsdp = 1
  first = precompute.open_or_build_cache(config, build_if_missing=True)
  for png in images.glob('*.png'):
    os.utime(png, ns=(1, 1))
  with pytest.raises(cache_lib.CacheError, match='No embedding cache'):
    precompute.open_or_build_cache(config, build_if_missing=False)
  # A partial build under the new key (killed earlier) is replaced, its stray files removed.
  new_path = first.path.parent / cache_lib.cache_key(
    precompute.encoder_id(config), 16, precompute._source(config).fingerprint()
  )
  new_path.mkdir()
  (new_path / 'shard-00007.embs.npy').write_bytes(b'junk')

  def no_encoder(*args, **kwargs):
    raise AssertionError('the encoder was loaded although the captions are cached')

  monkeypatch.setattr(encoder_lib, 'load_text_encoder', no_encoder)
  with caplog.at_level(logging.WARNING):
    second = precompute.open_or_build_cache(config, build_if_missing=True)
  assert second.path == new_path and 'instead of encoding them again' in caplog.text
  assert not (new_path / 'shard-00007.embs.npy').exists()
  again = precompute.open_or_build_cache(config, build_if_missing=False)
  assert again.path == new_path and again.manifest['complete']
  for name in ('embs', 'offsets', 'hashes'):
    old_file = first.path / f'shard-00000.{name}.npy'
    assert (new_path / old_file.name).stat().st_ino == old_file.stat().st_ino  # hard links
  np.testing.assert_array_equal(again.lookup(CAPTIONS)[0], first.lookup(CAPTIONS)[0])
  assert precompute.open_or_build_cache(config, build_if_missing=False).path == new_path
  # Run again (the precompute CLI), the complete cache under the new key is not linked again.
  fingerprint = precompute._source(config).fingerprint()
  assert not cache_lib.adopt_matching_cache(
    str(tmp_path / 'cache'),
    CAPTIONS,
    encoder_id=precompute.encoder_id(config),
    max_length=16,
    dataset_fingerprint=fingerprint,
  )

  # Other captions are encoded, not matched to the old cache.
  with open(images / 'metadata.jsonl', 'a', encoding='utf-8') as f:
    f.write(json.dumps({'file_name': 'img0.png', 'text': 'a new caption'}) + '\n')
  with pytest.raises(AssertionError, match='the encoder was loaded'):
    precompute.open_or_build_cache(config, build_if_missing=True)


@pytest.mark.unit
def test_storage_errors_are_one_cache_error_and_the_build_resumes(images, tmp_path, monkeypatch):
  # An unwritable cache folder is found before the encoder loads (minutes for T5-XXL); a disk
  # that fills up mid-build is a CacheError saying the finished shards are kept, not a traceback,
  # and the rerun resumes from them.
  (tmp_path / 'a_file').write_text('x')
  config = make_config(images, tmp_path / 'a_file' / 'cache')

  def no_encoder(*args, **kwargs):
    raise AssertionError('the encoder was loaded before the cache folder was checked')

  with monkeypatch.context() as m:
    m.setattr(encoder_lib, 'load_text_encoder', no_encoder)
    with pytest.raises(cache_lib.CacheError, match='Cannot write the embedding cache folder'):
      precompute.precompute(config)

  config = make_config(images, tmp_path / 'cache')
  config.text.cache_shard_size = 2  # 4 captions: 2 shards
  save = cache_lib._atomic_save
  calls = []

  def fills_up(path, array):
    calls.append(path.name)
    if len(calls) > 4:  # the first shard's four files fit
      raise OSError(errno.ENOSPC, 'No space left on device')
    save(path, array)

  with monkeypatch.context() as m:
    m.setattr(cache_lib, '_atomic_save', fills_up)
    with pytest.raises(cache_lib.CacheError, match=r'failed \(No space left on device\); the sh'):
      precompute.precompute(config)
  cache = precompute.precompute(config)
  assert cache.num_captions == 4 and cache.build_report['captions'] == 2  # the second shard only


_CONFIG_FILE = textwrap.dedent(
  """
  import ml_collections

  def get_config():
    c = ml_collections.ConfigDict()
    c.text = ml_collections.ConfigDict(dict(
        encoder='t5-tiny-random', max_length=16, cache_dir={cache_dir!r},
        precompute_batch_size=8, cache_shard_size=4096, auto_precompute=True))
    c.data = ml_collections.ConfigDict(dict(
        source='folder', path={images!r}, split='train', image_column='image',
        caption_column='text', max_skip_fraction=0.01, max_examples=0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    return c
  """
)


@pytest.mark.smoke
def test_precompute_cli(images, tmp_path):
  cache_dir = tmp_path / 'cache'
  config_file = tmp_path / 'tiny_config.py'
  config_file.write_text(_CONFIG_FILE.format(cache_dir=str(cache_dir), images=str(images)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  command = [
    sys.executable,
    '-m',
    'imagen_jax.precompute',
    f'--config={config_file}',
    '--config.text.max_length=12',
    # A relative cache_dir is under --workdir, as train.py takes it (the errors' hint).
    '--config.text.cache_dir=cache',
    f'--workdir={tmp_path}',
  ]
  run = functools.partial(
    subprocess.run, command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  result = run()
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'UNTRAINED' in result.stderr  # t5-tiny-random's warning: the encoder was loaded
  # Run again, it finds the cache complete without loading the encoder (minutes for T5-XXL).
  again = run()
  assert again.returncode == 0 and again.stdout == result.stdout, again.stderr[-3000:]
  assert 'UNTRAINED' not in again.stderr
  config = make_config(images, cache_dir)
  config.text.max_length = 12
  cache = precompute.open_or_build_cache(config, build_if_missing=False)
  assert str(cache.path) in result.stdout
  assert cache.num_captions == 4 and cache.max_length == 12
  embs, mask = cache.lookup(['a cat'])
  assert embs.shape == (1, 12, 32) and mask.sum() == len('a cat') + 1
  # A user error (here a data folder that does not exist) is one line, not a traceback.
  missing = tmp_path / 'no_such_folder'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'imagen_jax.precompute',
      f'--config={config_file}',
      f'--config.data.path={missing}',
    ],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and str(missing) in errors[0], result.stderr[-3000:]
  # A setting train.py refuses is refused here too, before the dataset is encoded (the whole
  # dataset went into a cache that train.py then would not use).
  other = tmp_path / 'other_cache'
  result = subprocess.run(
    [*command[:4], f'--config.text.cache_dir={other}', '--config.data.max_examples=-5'],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1 and not other.exists(), result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
    'error: data.max_examples=-5: use a whole number >= 0 (0: all).'
  )


@pytest.mark.smoke
def test_verify_reencodes_only_the_damaged_shard(images, tmp_path):
  # A flipped bit in the embeddings stops training with one line naming `--verify`, which reads
  # every file against its CRC-32 and encodes again only the damaged shard (hours of T5-XXL
  # saved against deleting the cache), to the same bytes.
  config_file = tmp_path / 'tiny_config.py'
  config_file.write_text(_CONFIG_FILE.format(cache_dir=str(tmp_path / 'cache'), images=str(images)))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  command = [
    sys.executable,
    '-m',
    'imagen_jax.precompute',
    f'--config={config_file}',
    '--config.text.cache_shard_size=2',  # 4 captions: 2 shards
  ]
  run = functools.partial(
    subprocess.run, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  built = run(command)
  assert built.returncode == 0, built.stderr[-3000:]
  path = pathlib.Path(built.stdout.strip())
  good = {f.name: f.read_bytes() for f in path.glob('shard-*')}
  assert len(good) == 8
  kept = (path / 'shard-00000.embs.npy').stat()
  damaged = path / 'shard-00001.embs.npy'
  raw = bytearray(damaged.read_bytes())
  raw[-3] ^= 0x10  # the last caption's embeddings, past the header
  damaged.write_bytes(bytes(raw))

  config = make_config(images, tmp_path / 'cache')
  config.text.cache_shard_size = 2
  cache = precompute.open_or_build_cache(config, build_if_missing=False)
  with pytest.raises(cache_lib.CacheError, match='shard-00001.embs.npy: the embeddings .*--verify'):
    cache.lookup(sorted(set(CAPTIONS)))

  repaired = run([*command, '--verify'])
  assert repaired.returncode == 0, repaired.stderr[-3000:]
  assert '1 of 2 shards are damaged' in repaired.stderr, repaired.stderr[-3000:]
  assert 'UNTRAINED' in repaired.stderr  # the encoder was loaded to encode it again
  assert {f.name: f.read_bytes() for f in path.glob('shard-*')} == good
  assert (path / 'shard-00000.embs.npy').stat().st_ino == kept.st_ino  # the intact one kept
  cache = precompute.open_or_build_cache(config, build_if_missing=False)
  assert cache.lookup(sorted(set(CAPTIONS)))[1].sum() > 0

  again = run([*command, '--verify'])
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'all 2 shards are intact (every file against its CRC-32)' in again.stderr
  assert 'UNTRAINED' not in again.stderr  # nothing to encode: no encoder loaded


@pytest.mark.unit
def test_an_unknown_text_dtype_is_named_before_the_dataset_is_listed(tmp_path):
  # 'bf16' failed as a TypeError inside the encoder, after a (possibly long) dataset listing.
  config = make_config(tmp_path / 'no_such_folder', tmp_path / 'cache')
  config.text.dtype = 'bf16'
  for build in (False, True):
    with pytest.raises(ValueError, match=r"text.dtype='bf16': .* pass --config.text.dtype="):
      precompute.open_or_build_cache(config, build_if_missing=build)
  config.text.dtype = 'float32'  # a valid dtype gets as far as the missing data folder
  with pytest.raises(ValueError, match='no_such_folder does not exist'):
    precompute.open_or_build_cache(config, build_if_missing=False)


@pytest.mark.unit
def test_encoder_dtype_keeps_caches_apart(images, tmp_path):
  # Embeddings computed in float32 differ from bfloat16-computed ones: a run must never read
  # the other's cache from a shared cache_dir.
  bf16 = make_config(images, tmp_path / 'cache')
  f32 = make_config(images, tmp_path / 'cache')
  f32.text.dtype = 'float32'
  a = precompute.open_or_build_cache(bf16, build_if_missing=True)
  with pytest.raises(cache_lib.CacheError):  # the bfloat16 cache is not the float32 run's
    precompute.open_or_build_cache(f32, build_if_missing=False)
  b = precompute.open_or_build_cache(f32, build_if_missing=True)
  assert a.path != b.path and b.encoder_name == 't5-tiny-random@float32'
