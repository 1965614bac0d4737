"""T5 encoder: parity with Hugging Face's T5, HF-folder loading (single / sharded), errors,
padding invariance, truncation logging, mesh sharding."""

import io
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.numpy import save_file

from imagen_jax.text import encoder as encoder_lib
from imagen_jax.text import t5
from imagen_jax.text import tokenizer as tokenizer_lib

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 't5_golden'

TINY_HF = dict(
  vocab_size=384,
  d_model=16,
  d_kv=8,
  d_ff=24,
  num_layers=2,
  num_decoder_layers=1,
  num_heads=2,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=16,
  feed_forward_proj='gated-gelu',
)


def _tiny_weights(config: t5.T5Config, seed: int = 3) -> dict[str, np.ndarray]:
  """HF-named weights of a random encoder, plus decoder tensors that the loader must skip."""
  weights = t5.encoder_state_to_hf(t5.random_encoder(config, seed=seed, dtype='float32'))
  rng = np.random.default_rng(seed)
  for name, shape in [
    ('decoder.block.0.layer.0.SelfAttention.q.weight', (16, 16)),
    ('decoder.final_layer_norm.weight', (16,)),
    ('lm_head.weight', (config.vocab_size, config.d_model)),
  ]:
    weights[name] = rng.standard_normal(shape).astype(np.float32)
  # Norm scales away from 1 so that every tensor matters.
  for name in weights:
    if 'layer_norm' in name and name.startswith('encoder.'):
      weights[name] = (1 + 0.1 * rng.standard_normal(weights[name].shape)).astype(np.float32)
  return weights


def write_hf_folder(path: pathlib.Path, *, sharded: bool, weights: dict | None = None) -> dict:
  """A tiny Hugging Face-format T5 checkpoint folder (config, safetensors, ByT5 tokenizer)."""
  path.mkdir(parents=True, exist_ok=True)
  hf_config = transformers.T5Config(**TINY_HF, architectures=['T5ForConditionalGeneration'])
  hf_config.save_pretrained(path)
  if weights is None:
    weights = _tiny_weights(t5.read_config(path))
  if sharded:
    names = sorted(weights)
    parts = {'model-00001-of-00002.safetensors': names[::2]}
    parts['model-00002-of-00002.safetensors'] = names[1::2]
    weight_map = {}
    for file, keys in parts.items():
      save_file({k: weights[k] for k in keys}, str(path / file))
      weight_map.update(dict.fromkeys(keys, file))
    index = {'metadata': {'total_size': 0}, 'weight_map': weight_map}
    (path / 'model.safetensors.index.json').write_text(json.dumps(index))
  else:
    save_file(weights, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  transformers.ByT5Tokenizer().save_pretrained(path)
  return weights


@pytest.fixture(scope='module')
def tiny_folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('t5_hf')
  weights = write_hf_folder(root / 'single', sharded=False)
  write_hf_folder(root / 'sharded', sharded=True, weights=weights)
  return root, weights


@pytest.mark.unit
@pytest.mark.parametrize('variant', ['v1_0', 'v1_1'])
def test_parity_with_hf_reference(variant):
  folder = FIXTURES / variant
  model, _ = t5.load_t5_encoder(str(folder), dtype='float32')
  input_ids = np.load(folder / 'input_ids.npy')
  mask = np.load(folder / 'mask.npy')
  golden = np.load(folder / 'golden.npy')
  expected_proj = {'v1_0': 'relu', 'v1_1': 'gated-gelu'}[variant]
  assert model.config.feed_forward_proj == expected_proj
  out = np.asarray(model(jnp.asarray(input_ids), jnp.asarray(mask)))
  assert out.shape == golden.shape
  # f32, 3 layers of attention + FFN + RMS norm, outputs O(1) (max 3.5), golden made by another
  # library (HF Flax on jax 0.4.38): max error 3.1e-6 on AVX-512; 2e-5 leaves ~7x for other
  # CPU ISAs and still fails on a layer-norm eps of 1e-5 instead of 1e-6 (6.8e-5) or the exact
  # GELU instead of the tanh form (1.1e-3). On GPU needs f32 matmuls (TF32 errors are ~1e-3).
  np.testing.assert_allclose(out[mask], golden[mask], atol=2e-5, rtol=2e-5)


@pytest.mark.unit
def test_relative_position_buckets_known_values():
  buckets = t5.relative_position_buckets(40, num_buckets=32, max_distance=128)
  # Bidirectional: 16 buckets per direction, exact below 8, key after query -> +16.
  assert buckets[0, 0] == 0
  assert buckets[5, 3] == 2  # key 2 before query
  assert buckets[3, 5] == 16 + 2  # key 2 after query
  assert buckets[0, 39] == 16 + 12  # log-spaced: 8 + int(log(39 / 8) / log(128 / 8) * 8)
  assert buckets[39, 0] == 12
  assert buckets[0, 39] == buckets[0, 38] and buckets[39, 0] == buckets[38, 0]
  assert buckets.max() < 32 and buckets.min() >= 0


@pytest.mark.unit
def test_num_params_matches_state():
  model = t5.random_encoder(encoder_lib.TINY_RANDOM_CONFIG, dtype='float32')
  sizes = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert sizes == encoder_lib.TINY_RANDOM_CONFIG.num_params()
  # google/t5-v1_1-xxl's encoder is ~4.76B parameters.
  assert 4.7e9 < t5.T5_V1_1_CONFIGS['xxl'].num_params() < 4.8e9


@pytest.mark.unit
def test_hf_folder_single_and_sharded_load(tiny_folders):
  tiny_folders, weights = tiny_folders
  captions = ['a red cube', 'two small dogs playing in the snow']
  single = encoder_lib.load_text_encoder(
    str(tiny_folders / 'single'), max_length=24, dtype='float32'
  )
  sharded = encoder_lib.load_text_encoder(
    str(tiny_folders / 'sharded'), max_length=24, dtype='float32'
  )
  assert single.dim == 16 and single.max_length == 24
  # Weights landed where they belong ([out, in] -> [in, out], stacked per layer).
  state = single._state
  np.testing.assert_array_equal(
    np.asarray(state['layers']['q'][...][1]),
    weights['encoder.block.1.layer.0.SelfAttention.q.weight'].T,
  )
  np.testing.assert_array_equal(np.asarray(state['token_embedding'][...]), weights['shared.weight'])
  embs, mask = single.encode(captions)
  embs2, mask2 = sharded.encode(captions)
  assert embs.shape == (2, 24, 16) and embs.dtype == np.float32
  np.testing.assert_array_equal(mask, mask2)
  np.testing.assert_array_equal(embs, embs2)  # exact: same weights (1 file or 2 shards), same jit
  # The tokenizer came from the folder: ByT5 bytes + EOS.
  assert mask.sum(1).tolist() == [len('a red cube') + 1, 24]
  assert np.all(embs[~mask] == 0)
  assert np.abs(embs[mask]).mean() > 0.1


@pytest.mark.unit
def test_bfloat16_load_is_close_to_float32(tiny_folders):
  tiny_folders, _ = tiny_folders
  f32 = encoder_lib.load_text_encoder(str(tiny_folders / 'single'), max_length=16, dtype='float32')
  bf16 = encoder_lib.load_text_encoder(str(tiny_folders / 'single'), max_length=16)
  assert bf16.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(bf16._state)} == {jnp.dtype(jnp.bfloat16)}
  a, mask = f32.encode(['a bird'])
  b, _ = bf16.encode(['a bird'])
  assert np.abs(a - b)[mask].max() < 0.1


@pytest.mark.unit
def test_sentencepiece_only_folder_tokenizer(tmp_path):
  import sentencepiece as spm

  text = ['a photo of a cat', 'a dog on a skateboard', 'red apple on a table'] * 10
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(text),
    model_writer=model,
    vocab_size=20,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    minloglevel=2,
  )
  (tmp_path / 'spiece.model').write_bytes(model.getvalue())
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 't5'}))
  tok = tokenizer_lib.load_tokenizer(tmp_path, max_length=8)
  ids, mask = tok(['a cat on a table', 'dog'])
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (2, 8)
  assert ids[1, mask[1].sum() - 1] == 1  # EOS closes the caption
  assert np.all(ids[~mask] == 0)


@pytest.mark.unit
def test_missing_folder_error(tmp_path):
  with pytest.raises(t5.T5CheckpointError, match='does not exist'):
    encoder_lib.load_text_encoder(str(tmp_path / 'no_such_checkpoint'))


@pytest.mark.unit
def test_pytorch_bin_only_error(tmp_path):
  transformers.T5Config(**TINY_HF).save_pretrained(tmp_path)
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not really torch')
  with pytest.raises(t5.T5CheckpointError, match='no safetensors') as info:
    encoder_lib.load_text_encoder(str(tmp_path))
  assert 'pytorch_model.bin' in str(info.value) and 'save_pretrained' in str(info.value)


@pytest.mark.unit
def test_hub_repo_without_safetensors_names_pull_requests_that_have_them(
  tmp_path, tiny_folders, monkeypatch
):
  import fnmatch
  import shutil
  import types

  import huggingface_hub

  # main holds PyTorch weights only; PR 2 is a safetensors conversion, PR 3 a README edit.
  main = tmp_path / 'main'
  main.mkdir()
  shutil.copy(tiny_folders[0] / 'single' / 'config.json', main)
  (main / 'pytorch_model.bin').write_bytes(b'torch pickle')
  branches = {None: main, 'refs/pr/2': tiny_folders[0] / 'single', 'refs/pr/3': main}

  def snapshot_download(repo_id, *, revision=None, allow_patterns=()):
    local = tmp_path / 'cache' / str(revision).replace('/', '_')
    local.mkdir(parents=True, exist_ok=True)
    for f in branches[revision].iterdir():
      if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
        shutil.copy(f, local / f.name)
    return str(local)

  def list_repo_files(repo_id, *, revision=None):
    return sorted(f.name for f in branches[revision].iterdir())

  def list_repo_refs(repo_id, *, include_pull_requests=False):
    assert include_pull_requests
    prs = [types.SimpleNamespace(ref=f'refs/pr/{n}') for n in (2, 3)]
    return types.SimpleNamespace(branches=[], pull_requests=prs)

  def get_discussion_details(repo_id, number):
    assert number == 2
    return types.SimpleNamespace(title='Adding safetensors', author='SFconvertbot', status='open')

  for name, fake in [
    ('snapshot_download', snapshot_download),
    ('list_repo_files', list_repo_files),
    ('list_repo_refs', list_repo_refs),
    ('get_discussion_details', get_discussion_details),
  ]:
    monkeypatch.setattr(huggingface_hub, name, fake)
  with pytest.raises(t5.T5CheckpointError, match='no safetensors') as info:
    encoder_lib.load_text_encoder('someorg/t5-pt-only', max_length=8)
  message = str(info.value)
  assert "refs/pr/2 ('Adding safetensors' by SFconvertbot, open) has safetensors" in message
  assert 'someorg/t5-pt-only/discussions/2' in message and 'refs/pr/3' not in message
  # The ref it names loads (it is not used unasked).
  encoder = encoder_lib.load_text_encoder('someorg/t5-pt-only', max_length=8, revision='refs/pr/2')
  assert encoder.dim == 16

  # A Hub that cannot list its refs still gives the plain message.
  def offline(*args, **kwargs):
    raise OSError('network is unreachable')

  monkeypatch.setattr(huggingface_hub, 'list_repo_refs', offline)
  with pytest.raises(t5.T5CheckpointError, match='no safetensors') as info:
    encoder_lib.load_text_encoder('someorg/t5-pt-only', max_length=8)
  assert 'has safetensors' not in str(info.value)


@pytest.mark.unit
def test_non_t5_config_error(tmp_path):
  transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
  save_file({'wte.weight': np.zeros((4, 8), np.float32)}, str(tmp_path / 'model.safetensors'))
  with pytest.raises(t5.T5CheckpointError, match="model_type='gpt2'"):
    encoder_lib.load_text_encoder(str(tmp_path))


@pytest.mark.unit
def test_weights_not_matching_config_error(tmp_path, tiny_folders):
  write_hf_folder(tmp_path, sharded=False, weights=tiny_folders[1])
  config = json.loads((tmp_path / 'config.json').read_text())
  config['feed_forward_proj'] = 'relu'  # weights are gated (wi_0 / wi_1)
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(t5.T5CheckpointError, match='does not match its weights'):
    encoder_lib.load_text_encoder(str(tmp_path))


@pytest.mark.unit
def test_config_with_fewer_layers_than_the_weights_error(tmp_path, tiny_folders):
  # A config.json from a smaller sibling (t5-v1_1-base's 12 layers beside xl's 24) loaded the
  # first layers and dropped the rest without a word: a different encoder, silently.
  write_hf_folder(tmp_path, sharded=False, weights=tiny_folders[1])
  config = json.loads((tmp_path / 'config.json').read_text())
  config['num_layers'] = 1  # the weights have 2
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(t5.T5CheckpointError, match=r'blocks up to 1 .*num_layers=1.*config.json'):
    encoder_lib.load_text_encoder(str(tmp_path))


@pytest.mark.unit
def test_lfs_pointer_or_truncated_shard_is_one_clear_error(tmp_path, tiny_folders):
  write_hf_folder(tmp_path, sharded=True, weights=tiny_folders[1])
  shard = sorted(tmp_path.glob('*.safetensors'))[0]
  good = shard.read_bytes()
  # What `git clone` leaves without git-lfs: a small text file in place of the weights.
  shard.write_text(f'version https://git-lfs.github.com/spec/v1\noid sha256:{"0" * 64}\n')
  with pytest.raises(t5.T5CheckpointError, match=r'is a Git LFS pointer .*git lfs pull'):
    encoder_lib.load_text_encoder(str(tmp_path))
  shard.write_bytes(good[: len(good) // 2])  # a download cut short
  with pytest.raises(t5.T5CheckpointError, match=r'not a readable safetensors file .*again'):
    encoder_lib.load_text_encoder(str(tmp_path))


@pytest.mark.unit
def test_a_cut_or_malformed_config_or_index_is_one_clear_error(tmp_path, tiny_folders):
  # A partly copied folder: a bare JSONDecodeError naming no file, or an AttributeError or
  # KeyError traceback where sample.py and evaluate.py catch only T5CheckpointError.
  write_hf_folder(tmp_path, sharded=True, weights=tiny_folders[1])
  config, index = tmp_path / 'config.json', tmp_path / 'model.safetensors.index.json'
  good_config, good_index = config.read_text(), index.read_text()
  for path, text, message in [
    (config, good_config[: len(good_config) // 2], r'config.json. does not read as JSON'),
    (config, '[1, 2]', r'config.json. holds a JSON list, not an object'),
    (index, good_index[:40], r'index.json. does not read as JSON .*download or copy it again'),
    (index, '{"metadata": {}}', r"index.json. has no 'weight_map' object"),
  ]:
    path.write_text(text)
    with pytest.raises(t5.T5CheckpointError, match=message):
      encoder_lib.load_text_encoder(str(tmp_path))
    config.write_text(good_config)
    index.write_text(good_index)
  encoder_lib.load_text_encoder(str(tmp_path))  # restored: loads


@pytest.mark.unit
def test_folder_fingerprint_names_the_checkpoint_a_folder_holds(tmp_path):
  assert t5.folder_fingerprint('google/t5-v1_1-xxl') is None  # a Hub name (no such folder here)
  folder = tmp_path / 'ckpt'
  folder.mkdir()
  (folder / 'config.json').write_text('{"d_model": 16}')
  weights = np.random.default_rng(0).integers(0, 255, 3 << 20, np.uint8)  # 3 MiB: by pieces
  (folder / 'model.safetensors').write_bytes(weights.tobytes())
  (folder / 'README.md').write_text('not read by the loader, not hashed')
  first = t5.folder_fingerprint(str(folder))
  assert first and first == t5.folder_fingerprint(str(folder))
  (folder / 'README.md').write_text('edited')
  assert t5.folder_fingerprint(str(folder)) == first
  moved = tmp_path / 'moved'
  folder.rename(moved)
  assert t5.folder_fingerprint(str(moved)) == first  # the content, not the place
  other = weights.copy()
  other[0] ^= 1  # the first piece: another checkpoint differs everywhere, this in one byte
  (moved / 'model.safetensors').write_bytes(other.tobytes())
  assert t5.folder_fingerprint(str(moved)) != first
  (moved / 'model.safetensors').write_bytes(weights.tobytes())
  (moved / 'config.json').write_text('{"d_model": 32}')
  assert t5.folder_fingerprint(str(moved)) != first


@pytest.fixture(scope='module')
def tiny_random_f32():
  return {
    length: encoder_lib.load_text_encoder('t5-tiny-random', max_length=length, dtype='float32')
    for length in (16, 32)
  }


@pytest.mark.unit
def test_padding_never_leaks(tiny_random_f32):
  captions = ['a red bird', 'x']
  short, mask16 = tiny_random_f32[16].encode(captions)
  long, mask32 = tiny_random_f32[32].encode(captions)
  assert short.shape == (2, 16, 32) and long.shape == (2, 32, 32)
  for i in range(2):
    n = mask16[i].sum()
    assert n == mask32[i].sum() and mask16[i, :n].all()
    # f32, same weights compiled for L=16 vs L=32: only reduction order differs, values up to
    # 3.4: 1.34e-6 measured on AVX-512 (failed the old atol=1e-6). 1e-5 leaves >7x; one leaked
    # pad token changes the real positions by >= 0.55.
    np.testing.assert_allclose(short[i, :n], long[i, :n], atol=1e-5, rtol=1e-5)
  assert np.all(short[~mask16] == 0) and np.all(long[~mask32] == 0)


@pytest.mark.unit
def test_tiny_random_is_deterministic_and_warns(caplog, tiny_random_f32):
  with caplog.at_level(logging.WARNING):
    again = encoder_lib.load_text_encoder('t5-tiny-random', max_length=16, dtype='float32')
  assert any('UNTRAINED' in r.getMessage() for r in caplog.records)
  assert again.dim == 32 and again.name == 't5-tiny-random'
  a, _ = again.encode(['same caption'])
  b, _ = tiny_random_f32[16].encode(['same caption'])
  np.testing.assert_array_equal(a, b)  # exact: one jitted _embed shared by both, same inputs
  c, _ = again.encode(['other caption'])
  assert np.abs(a - c).max() > 1e-3  # other captions differ by O(1), not by rounding


@pytest.mark.unit
def test_truncation_logs_dropped_tokens(caplog):
  tok = tokenizer_lib.load_tokenizer('byt5', max_length=8)
  with caplog.at_level(logging.WARNING, logger='imagen_jax.text.tokenizer'):
    ids, mask = tok(['short', 'this caption is far too long'])
  assert ids.shape == (2, 8) and mask[1].all() and ids[1, -1] == 1  # EOS kept
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 1
  dropped = len('this caption is far too long') + 1 - 8
  assert f'{dropped} of' in messages[0] and 'this caption is far too long' in messages[0]


@pytest.mark.unit
def test_mesh_sharded_encoder_matches_single_device(tiny_random_f32):
  mesh = jax.make_mesh(
    (4, 2),
    ('data', 'fsdp'),
    axis_types=(jax.sharding.AxisType.Explicit,) * 2,
    devices=jax.devices()[:8],
  )
  sharded = encoder_lib.load_text_encoder(
    't5-tiny-random', max_length=16, dtype='float32', mesh=mesh
  )
  q = sharded._state['layers']['q'][...]
  assert q.sharding.spec[0] is None and ('data', 'fsdp') in tuple(q.sharding.spec)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[1:] != q.shape[1:]
  captions = ['one', 'two words', 'three little words']  # B=3 is padded to 8 rows inside
  a, mask = sharded.encode(captions)
  b, mask_b = tiny_random_f32[16].encode(captions)
  np.testing.assert_array_equal(mask, mask_b)
  # f32, 8-way sharded vs one device: per-row math is the same, reduction order and shapes
  # differ; values up to 3.2, measured 8.3e-7 on AVX-512: 1e-5 leaves 12x.
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.unit
def test_hub_download_fetches_only_encoder_shards(tmp_path, tiny_folders, monkeypatch):
  import fnmatch
  import shutil

  import huggingface_hub

  remote = tmp_path / 'remote'
  shutil.copytree(tiny_folders[0] / 'sharded', remote)
  save_file(
    {'decoder.extra.weight': np.zeros((2, 2), np.float32)}, str(remote / 'decoder.safetensors')
  )
  index = json.loads((remote / 'model.safetensors.index.json').read_text())
  index['weight_map']['decoder.extra.weight'] = 'decoder.safetensors'
  (remote / 'model.safetensors.index.json').write_text(json.dumps(index))
  local, fetched, revisions = tmp_path / 'hub_cache', [], []

  def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=()):
    assert repo_id == 'someorg/tiny-t5'
    revisions.append(revision)
    local.mkdir(exist_ok=True)
    for f in remote.iterdir():
      if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
        shutil.copy(f, local / f.name)
        fetched.append(f.name)
    return str(local)

  monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake_snapshot_download)
  hub = encoder_lib.load_text_encoder('someorg/tiny-t5', max_length=8, dtype='float32')
  assert 'decoder.safetensors' not in fetched
  assert {'config.json', 'model-00001-of-00002.safetensors'} <= set(fetched)
  assert hub.name == 'someorg/tiny-t5' and hub.dim == 16
  assert set(revisions) == {None}
  # config.text.revision reaches the Hub (e.g. a repo whose safetensors sit on a PR branch), and
  # the embedding cache of another revision is another cache.
  revisions.clear()
  encoder_lib.load_text_encoder('someorg/tiny-t5', max_length=8, revision='refs/pr/7')
  assert revisions and set(revisions) == {'refs/pr/7'}
  from configs import base64
  from imagen_jax import precompute

  config = base64.get_config('tiny')
  config.text.encoder = 'someorg/tiny-t5'
  assert precompute.encoder_id(config) == 'someorg/tiny-t5'
  config.text.revision = 'refs/pr/7'
  assert precompute.encoder_id(config) == 'someorg/tiny-t5#refs/pr/7'

  def offline(repo_id, **kwargs):
    raise OSError('network is unreachable')

  monkeypatch.setattr(huggingface_hub, 'snapshot_download', offline)
  with pytest.raises(t5.T5CheckpointError, match='Could not download.*network is unreachable'):
    encoder_lib.load_text_encoder('someorg/other-t5')
