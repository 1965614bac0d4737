"""Per-batch text lengths (data.text_length=batch: a compiled step per length bucket) and
batches put on the devices ahead by a thread (data.device_prefetch), with exact resume."""

import json
import logging
import re
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import base64
from imagen_jax import train_lib
from imagen_jax.data import pipeline, prefetch
from imagen_jax.data.sources import DataError
from tests import data_pipeline_test as dp
from tests import train_test


class _LongCache(dp.FakeEmbeddingCache):
  max_length = 32  # buckets 8, 16, 32


def _caption_folder(root, n=12):
  """n solid images (red = 10 * index); captions of 2 words (3 tokens), but 12 words (13
  tokens) for the first two: of an epoch's 3 batches of 4, one or two need bucket 16, the
  others fit bucket 8."""
  root.mkdir(exist_ok=True)
  for i in range(n):
    Image.new('RGB', (8, 8), (10 * i, 255 - 10 * i, 7)).save(root / f'{i:03d}.png')
    words = 12 if i < 2 else 2
    (root / f'{i:03d}.txt').write_text(' '.join(f'w{i}x{j}' for j in range(words)))
  return root


def _iterator(config):
  source = pipeline.build_source(config.data)
  cache = _LongCache(source.captions())
  return pipeline.make_iterator(config, text_cache=cache, source=source), cache


@pytest.mark.unit
def test_text_length_mode():
  mode = pipeline.text_length_mode
  auto = ml_collections.ConfigDict({'text_length': 'auto'})
  assert mode(auto, 1, backend='cpu') == 'run'  # another compile costs more than it saves
  assert mode(auto, 1, backend='gpu') == 'batch'
  assert mode(auto, 1, backend='tpu') == 'batch'
  assert mode(auto, 2, backend='gpu') == 'run'  # one global shape across processes
  batch = ml_collections.ConfigDict({'text_length': 'batch'})
  assert mode(batch, 1, backend='cpu') == 'batch'  # asked for explicitly
  assert mode(batch, 4, backend='gpu') == 'run'
  run = ml_collections.ConfigDict({'text_length': 'run'})
  assert mode(run, 1, backend='gpu') == 'run'
  assert mode(ml_collections.ConfigDict(), 1, backend='cpu') == 'run'  # configs without it
  with pytest.raises(DataError, match=r"text_length='longest'.*'auto', 'batch'.*'run'"):
    mode(ml_collections.ConfigDict({'text_length': 'longest'}), 1, backend='gpu')


@pytest.mark.unit
def test_several_processes_log_the_run_length_once(tmp_path, caplog):
  config = dp._config(_caption_folder(tmp_path / 'captions'), text_length='batch')
  source = pipeline.build_source(config.data)
  with caplog.at_level(logging.INFO, logger=pipeline.log.name):
    # train_and_evaluate validates the setting, then builds the dataset: one line.
    assert pipeline.text_length_mode(config.data, 2, backend='gpu') == 'run'
    ds = pipeline.make_dataset(
      config, text_cache=_LongCache(source.captions()), process_count=2, source=source
    )
  assert ds.text_length_mode == 'run'
  lines = [r for r in caplog.records if 'processes use one text length' in r.getMessage()]
  assert len(lines) == 1, [r.getMessage() for r in lines]


@pytest.mark.unit
def test_batch_mode_trims_each_batch_to_its_bucket(tmp_path):
  folder = _caption_folder(tmp_path / 'captions')
  by_mode = {}
  for text_length in ('batch', 'run'):
    config = dp._config(folder, text_length=text_length)
    it, cache = _iterator(config)
    by_mode[text_length] = dp._take(it, 6)  # two epochs of 3 batches
  assert pipeline.run_text_length(cache) == 16
  lengths = []
  for trimmed, full in zip(by_mode['batch'], by_mode['run'], strict=True):
    np.testing.assert_array_equal(trimmed['image'], full['image'])  # the same examples
    longest = int(full['text_mask'].sum(axis=1).max())
    length = trimmed['text_embs'].shape[1]
    assert length == pipeline.text_length_bucket(longest, cache.max_length)
    assert trimmed['text_mask'].shape == (4, length)
    assert trimmed['text_embs'].dtype == full['text_embs'].dtype == pipeline.TEXT_DTYPE
    # The same values and mask, the padded slots dropped.
    assert trimmed['text_embs'].tobytes() == full['text_embs'][:, :length].tobytes()
    np.testing.assert_array_equal(trimmed['text_mask'], full['text_mask'][:, :length])
    assert not full['text_mask'][:, length:].any()
    lengths.append(length)
  assert set(lengths) == {8, 16}


class _Counter:
  """A host iterator of {'i': [i]}, with grain's get_state / set_state; raises `error` when it
  would produce batch `fail_at`, StopIteration after `stop_at`."""

  def __init__(self, fail_at=None, error=None, stop_at=None):
    self.i, self.fail_at, self.error, self.stop_at = 0, fail_at, error, stop_at
    self.produced = 0
    self.closed = False

  def __next__(self):
    if self.i == self.fail_at:
      raise self.error
    if self.i == self.stop_at:
      raise StopIteration
    self.i += 1
    self.produced += 1
    return {'i': np.array([self.i - 1])}

  def get_state(self):
    return {'i': self.i}

  def set_state(self, state):
    self.i = state['i']

  def close(self):
    self.closed = True


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == 'device-prefetch']


@pytest.mark.unit
@pytest.mark.parametrize('size', [0, 1, 2])
def test_prefetch_order_state_and_close(size):
  host = _Counter()
  it = prefetch.DevicePrefetch(host, transfer=lambda b: {'on_device': b['i']}, size=size)
  try:
    assert it.get_state() == {'i': 0}
    for k in range(1, 6):
      assert int(next(it)['on_device'][0]) == k - 1  # order kept, transfer applied
      assert it.get_state() == {'i': k}  # the position of the last batch consumed
    deadline = time.time() + 10  # the thread fills its `size` slots (polled: a busy CI is slow)
    while size and host.produced < 5 + size and time.time() < deadline:
      time.sleep(0.01)
    time.sleep(0.1)  # and reads no further
    assert host.produced == 5 + size  # never more than `size` read ahead
    # set_state drops what was read ahead and goes on from the state given.
    it.set_state({'i': 2})
    assert [int(next(it)['on_device'][0]) for _ in range(3)] == [2, 3, 4]
    assert it.get_state() == {'i': 5}
  finally:
    it.close()
  assert host.closed and not _prefetch_threads()
  it.close()  # twice is fine
  with pytest.raises(RuntimeError, match='after close'):
    next(it)


class _Stuck(_Counter):
  """A host iterator whose second batch hangs (a stalled read) until `release` is set."""

  def __init__(self):
    super().__init__()
    self.release = threading.Event()
    self.stalled = threading.Event()  # set once the reader is inside the stalled read

  def __next__(self):
    if self.i == 1:
      self.stalled.set()
      self.release.wait()
    return super().__next__()


@pytest.mark.unit
def test_prefetch_close_does_not_hang_on_a_stalled_read(caplog):
  host = _Stuck()
  it = prefetch.DevicePrefetch(host, transfer=lambda b: b, size=2)
  try:
    assert int(next(it)['i'][0]) == 0
    assert host.stalled.wait(10)  # the thread is now inside the stalled read
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger=prefetch.log.name):
      it.close(timeout=0.3)
    assert time.perf_counter() - t0 < 5
    assert 'still reading a batch' in caplog.text
    assert not host.closed  # not closed under the thread that is using it
  finally:
    host.release.set()  # let the daemon thread finish
  deadline = time.time() + 5
  while _prefetch_threads() and time.time() < deadline:
    time.sleep(0.05)
  assert not _prefetch_threads()


@pytest.mark.unit
def test_prefetch_raises_the_hosts_error_at_its_batch():
  error = DataError('folder: 3 of 4 examples were unusable')
  it = prefetch.DevicePrefetch(_Counter(fail_at=3, error=error), transfer=lambda b: b, size=2)
  try:
    assert [int(next(it)['i'][0]) for _ in range(3)] == [0, 1, 2]
    for _ in range(2):  # at the batch it would have been, and again after
      with pytest.raises(DataError, match='3 of 4 examples') as raised:
        next(it)
      assert raised.value is error
    assert it.get_state() == {'i': 3}  # the batches before it were consumed
    assert not _prefetch_threads()
  finally:
    it.close()
  finite = prefetch.DevicePrefetch(_Counter(stop_at=4), transfer=lambda b: b, size=2)
  assert [int(b['i'][0]) for b in finite] == [0, 1, 2, 3]  # StopIteration ends a for loop
  finite.close()


@pytest.mark.unit
def test_prefetch_of_the_real_pipeline_resumes_exactly(tmp_path):
  """Global arrays sharded over 2 devices; the state saved after k consumed batches resumes a
  fresh iterator at batch k, whatever the thread had read ahead."""
  config = dp._config(_caption_folder(tmp_path / 'captions'), text_length='batch')
  config.data.device_prefetch = 2
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('data',))
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  reference, _ = _iterator(config)
  expected = dp._take(reference, 5)
  it = train_lib.device_prefetch(config, _iterator(config)[0], batch_sh)
  try:
    for k in range(3):
      batch = next(it)
      assert isinstance(batch['image'], jax.Array) and batch['image'].sharding == batch_sh
      dp._assert_batches_equal([jax.device_get(batch)], [expected[k]])
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  finally:
    it.close()
  resumed, _ = _iterator(config)
  resumed.set_state(state)
  dp._assert_batches_equal(dp._take(resumed, 2), expected[3:5])


@pytest.mark.unit
def test_mean_step_flops_weights_each_step():
  short = train_lib.StepFlops(model=1e15, hardware=2e15, num_devices=1, peak=1e15)
  long = train_lib.StepFlops(model=3e15, hardware=4e15, num_devices=1, peak=1e15)
  got = train_lib.mean_step_flops([short, long, long]).scalars(steps=3, seconds=7.0)
  assert got == pytest.approx({'model_tflops_per_device': 1000.0, 'mfu': 1.0, 'hfu': 10 / 7})


@pytest.mark.smoke
def test_training_with_per_batch_text_lengths(tmp_path):
  """tiny with 32-token text: its first batch fits bucket 16, the next ones need 32."""
  shared = train_test.run_folders(tmp_path)
  workdir = tmp_path / 'run'
  proc = train_test.run(
    shared,
    workdir,
    '--config.text.max_length=32',
    '--config.data.text_length=batch',
    '--config.train.num_steps=3',
  )
  made = '(compiled|loaded from the persistent compilation cache)'  # the suite shares a cache
  assert re.search(f'Train step {made} in .* s \\(text length 16\\)', proc.stderr)
  assert re.search(f'Train step for text length 32 {made} in', proc.stderr)
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  steps = [r for r in rows if 'img_per_s' in r]
  assert [r['step'] for r in steps] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) and r['model_tflops_per_device'] > 0 for r in steps)
  assert train_test.finished_steps(workdir) == [2, 3]


@pytest.mark.smoke
@pytest.mark.parametrize(
  'override, message',
  [
    ('--config.data.text_length=bucket', "data.text_length='bucket': choose 'auto', 'batch'"),
    ('--config.data.device_prefetch=-1', 'data.device_prefetch=-1: use 0 (off) or a positive'),
    # saved with every checkpoint for sample.py: refused before training, not at sampling
    ('--config.sample.dynamic_percentile=99.5', 'dynamic_percentile is a quantile in (0, 1]'),
    # before: a ZeroDivisionError at the first step; a traceback from the data loader
    ('--config.train.checkpoint_every=0', 'train.checkpoint_every=0: use a whole number >= 1'),
    ('--config.train.batch_size=0', 'train.batch_size=0: use a whole number >= 1'),
    # before: refused only after the text cache was built in the workdir
    ('--config.optim.grad_accum_steps=0', 'optim.grad_accum_steps must be >= 1'),
  ],
)
def test_bad_settings_are_refused_before_the_workdir_is_written(tmp_path, override, message):
  shared = train_test.run_folders(tmp_path)
  workdir = tmp_path / 'run'
  proc = train_test.run(shared, workdir, override, check=False)
  assert proc.returncode != 0
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not workdir.exists()


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('train.num_steps', -1, 'train.num_steps=-1: use a whole number >= 1'),
    ('train.log_every', 0, 'train.log_every=0: use a whole number >= 1'),
    ('train.keep_checkpoints', 0, 'train.keep_checkpoints=0: use a whole number >= 1'),
    ('train.sample_every', -5, r'train.sample_every=-5: use a whole number >= 0 \(0: off\)'),
    ('train.resume_step', -1, 'train.resume_step=-1: use a whole number >= 0'),
    ('optim.ema_decay', 1.5, r'optim.ema_decay=1.5: use a value in \[0, 1\]'),
    ('optim.ema_decay', float('nan'), 'optim.ema_decay=nan'),
    ('optim.lr', float('inf'), 'optim.lr=inf: use a finite learning rate'),
    ('optim.min_lr_ratio', -1.0, r'optim.min_lr_ratio=-1.0: use a value in \[0, 1\]'),
    ('optim.b2', 1.5, r'optim.b2=1.5: use a value in \[0, 1\)'),
    ('optim.weight_decay', -0.1, r'optim.weight_decay=-0.1: use a value in \[0, inf\)'),
    ('optim.grad_clip', -1.0, r'optim.grad_clip=-1.0: .*0: no clipping'),
    ('diffusion.loss_weighting', 'snr', "Unknown loss weighting 'snr'"),
    ('diffusion.objective', 'noise', "Unknown objective 'noise'"),
    ('diffusion.schedule', 'sigmoid', "Unknown schedule 'sigmoid'"),
    ('optim.warmup_steps', -5, 'optim.warmup_steps=-5: use a whole number >= 0'),
    ('data.max_examples', -1, r'data.max_examples=-1: use a whole number >= 0 \(0: all\)'),
    ('data.num_workers', -1, 'data.num_workers=-1: use a whole number >= 0'),
    ('data.max_skip_fraction', 2.0, r'data.max_skip_fraction=2.0: use a fraction in \[0, 1\]'),
    ('data.crop_size', 100, r'data.crop_size must be in \[0, resolution=16\]'),
    # These failed only after the text cache was built: a zero width trained zero-size layers
    # until the first checkpoint refused them, or divided by zero.
    ('model.dim', 0, r'Invalid UNetConfig: dim=0: sizes must be whole numbers >= 1'),
    ('model.num_heads', 0, 'Invalid UNetConfig: num_heads=0'),
    ('model.dim', 15, 'Invalid UNetConfig: dim=15 must be even'),  # failed at the first step
    ('model.num_groups', 0, 'Invalid UNetConfig: num_groups=0'),
    ('model.channel_mults', (1, 0), r'Invalid UNetConfig: channel_mults=\(1, 0\)'),
    ('text.max_length', 1, r'text.max_length=1: use a whole number >= 2 \(a token and EOS\)'),
    # Trained silently on nonsense (negative loss weights), or failed at the first step.
    ('diffusion.min_snr_gamma', -1.0, r'diffusion.min_snr_gamma=-1.0: min-SNR weighting'),
    ('diffusion.logsnr_min', 30.0, 'use logsnr_min < logsnr_max'),
    # alpha underflows float32 at the noisy end: every sample was NaN.
    ('diffusion.logsnr_min', -float('inf'), r'within \[-50, 50\]'),
    ('diffusion.logsnr_min', -120.0, r'within \[-50, 50\]'),
    ('diffusion.logsnr_max', float('nan'), r'within \[-50, 50\]'),
    ('model.lowres_cond', True, r'a super-resolution stage \(lowres_resolution > 0\) needs'),
    ('train.state_layout', 'nhwc', "train.state_layout='nhwc': use one of auto, default"),
    ('text.dtype', 'bf16', r"text.dtype='bf16': the T5 encoder runs in bfloat16 or float32"),
    ('optim.grad_accum_steps', 10**6, r'grad_accum_steps=1000000 > train.num_steps=.* no update'),
    # The last micro-batches were read and accumulated, then dropped without a word.
    ('optim.grad_accum_steps', 3, r'num_steps=4 is not a multiple of .*=3: .*num_steps=3 or 6\.'),
    # A traceback from the tokenizer once the workdir and the text cache were written.
    ('train.sample_prompts', (1, 2), r'train.sample_prompts=\(1, 2\): use a tuple of non-empty'),
    ('train.sample_prompts', ('a cat', ' '), r"sample_prompts=\('a cat', ' '\): use a tuple"),
    ('optim.adafactor_momentum', 1.0, r'optim.adafactor_momentum=1.0: use a value in \[0, 1\)'),
    ('optim.adafactor_min_dim', 0, r'optim.adafactor_min_dim=0: use a whole number >= 1'),
    # These failed after the text cache was built, or named no config field.
    ('text.precompute_batch_size', 0, r'text.precompute_batch_size=0: use a whole number >= 1'),
    ('text.cache_shard_size', 0, r'text.cache_shard_size=0: use a whole number >= 1'),
    ('model.image_channels', 1, r'model.image_channels=1: .* RGB images; use 3'),
    ('data.resolution', 17, r'data.resolution=17 must be a multiple of 2, .*2 levels'),
    ('data.crop_size', 8, r'data.crop_size=8 < data.resolution=16, but the U-Net has self-att'),
    # Guidance extrapolates from a null-caption prediction that was never trained.
    ('diffusion.cond_drop_prob', 0.0, r'cond_drop_prob=0, .* with sample.guidance=1 \(no guid'),
    # Read by SR stages only, but a typo on a base stage stayed hidden until the config was reused.
    ('diffusion.aug_schedule', 'lin', r"Unknown diffusion.aug_schedule 'lin'"),
    ('diffusion.aug_level_max', 7.0, r'aug_level_max=7.0: training draws'),
    # Both were refused only once the workdir was made and locked.
    ('data.source', 'flder', r"Unknown data.source 'flder'; choose one of"),
    ('data.source', 'folder', r"data.source='folder' needs --config.data.path"),
    # The embedded set was trained on instead, without a word.
    ('data.path', '/my/images', r"data.path='/my/images' but data.source='openmoji' .* reads no"),
    ('data.split', 'test', r"data.split='test' but data.source='openmoji' has no splits"),
  ],
)
def test_settings_that_cannot_train_are_named(field, value, message):
  config = base64.get_config('tiny')
  train_lib.check_settings(config)  # the preset itself passes
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    train_lib.check_settings(config)


def test_adamw_settings_are_refused_with_adafactor_and_its_own_are_read():
  # optim.b1 / b2 / eps with optimizer=adafactor (sr256 and sr1024) were accepted and read by
  # nothing; adafactor's own settings had no config field, so the command line refused them.
  from imagen_jax import optim

  config = base64.get_config('tiny')
  config.optim.optimizer = 'adafactor'
  train_lib.check_settings(config)
  config.optim.b1 = 0.5
  with pytest.raises(
    ValueError, match=r'^optim.b1=0.5: optim.optimizer=adafactor does not read it'
  ):
    train_lib.check_settings(config)
  config.optim.b2, config.optim.eps = 0.99, 1e-6
  with pytest.raises(ValueError, match=r'optim.b2=0.99, optim.eps=1e-06: .* does not read them'):
    config.optim.b1 = 0.9
    train_lib.check_settings(config)
  config.optim.b2, config.optim.eps = 0.999, 1e-8
  params = {'w': jnp.ones((4, 4))}
  plain = optim.make_optimizer(config.optim, num_steps=10).init(params)
  config.optim.adafactor_momentum = 0.9
  train_lib.check_settings(config)
  with_momentum = optim.make_optimizer(config.optim, num_steps=10).init(params)
  assert len(jax.tree.leaves(with_momentum)) > len(jax.tree.leaves(plain))  # a first moment


def test_a_resume_run_again_with_other_reading_settings_is_the_same_resume(monkeypatch):
  # A go-back command run again with another text.precompute_batch_size (an out-of-memory fix),
  # text.auto_precompute or data.index_dir went back to its step again, setting aside the
  # progress made since: none of them changes what the run trains.
  from imagen_jax import checkpoints

  saved = base64.get_config('tiny')
  saved.train.resume_step = 2
  monkeypatch.setattr(checkpoints, 'restore_config', lambda manager, step: saved)
  config = base64.get_config('tiny')
  config.train.resume_step = 2
  config.text.precompute_batch_size = 8
  config.text.auto_precompute = False
  config.data.index_dir = '/tmp/index'
  assert train_lib._same_resume(None, 4, config)
  config.optim.lr = 1e-5  # the NaN advice: a new attempt from step 2
  assert not train_lib._same_resume(None, 4, config)


def test_a_resume_saved_before_a_field_existed_is_the_same_resume(monkeypatch):
  # A go-back run saved before optim.adafactor_* were config fields, run again after: the fields
  # read '<absent>' -> their values, and the run went back to its step again as a new attempt.
  from imagen_jax import checkpoints

  saved = base64.get_config('tiny')
  saved.train.resume_step = 2
  with saved.unlocked():
    for name in ('adafactor_min_dim', 'adafactor_decay_rate', 'adafactor_momentum'):
      del saved.optim[name]
  monkeypatch.setattr(checkpoints, 'restore_config', lambda manager, step: saved)
  config = base64.get_config('tiny')
  config.train.resume_step = 2
  assert train_lib._same_resume(None, 4, config)
  assert train_lib._resume_check(saved, config) == []  # nor logged as changed settings
  config.optim.adafactor_decay_rate = 0.9  # not what the saved run did: a new attempt
  assert not train_lib._same_resume(None, 4, config)
  assert train_lib._resume_check(saved, config) == ["optim.adafactor_decay_rate: '<absent>' -> 0.9"]


def test_a_resume_may_not_change_the_gradient_accumulation():
  # The optimizer state has the same structure for any k, so it restored; the optimizer then
  # applied schedule(its own update count) while the log showed schedule(step // new k).
  saved = base64.get_config('tiny')
  saved.optim.grad_accum_steps = 2
  config = base64.get_config('tiny')
  config.optim.grad_accum_steps = 4
  params = {'w': jax.ShapeDtypeStruct((4, 4), jnp.float32)}
  with pytest.raises(
    train_lib.TrainingError,
    match=r'optim.grad_accum_steps=4, but the checkpoint was trained with 2: .* Resume with '
    r'--config.optim.grad_accum_steps=2, or train with 4 in a fresh --workdir.',
  ):
    train_lib._optimizer_check(saved, config, params)
  config.optim.grad_accum_steps = 2
  train_lib._optimizer_check(saved, config, params)


def test_a_resume_may_change_how_the_model_computes_but_not_its_parameters():
  # model.remat (the out-of-memory advice on accelerators), dtype and dropout leave the
  # parameters as they are: a resume with them changed was refused as 'a different model'.
  saved = base64.get_config('tiny')
  config = base64.get_config('tiny')
  config.model.remat, config.model.dtype, config.model.dropout = True, 'bfloat16', 0.1
  changed = train_lib._resume_check(saved, config)
  assert {c.split(':')[0] for c in changed} == {'model.remat', 'model.dtype', 'model.dropout'}
  config.model.dim = saved.model.dim * 2
  with pytest.raises(train_lib.TrainingError, match=r'different model(.|\n)*model.dim: '):
    train_lib._resume_check(saved, config)


def test_the_logged_model_names_what_differs_from_its_preset_label():
  # --config.model_preset=base64 left the tiny network in place and logged '(base64)'.
  config = base64.get_config('tiny')
  assert train_lib.model_description(config) == 'preset tiny'
  config.model.remat = True  # how it computes, not what it is
  assert train_lib.model_description(config) == 'preset tiny'
  config.model_preset = 'base64'
  assert train_lib.model_description(config).startswith('preset base64 with model.attn_levels, ')
  config.model_preset = 'nope'
  assert 'is no preset; config.model defines the network' in train_lib.model_description(config)


def test_a_seed_a_jax_key_cannot_hold_is_refused():
  # jax.random.key keeps 32 bits: seed 2**32 + k trained exactly as seed k.
  config = base64.get_config('tiny')
  for seed in (2**32, -1):
    config.seed = seed
    with pytest.raises(ValueError, match=r'seed=.*: use a whole number in \[0, 2\*\*32\)'):
      train_lib.check_settings(config)
  config.seed = 2**32 - 1
  train_lib.check_settings(config)


def test_wandb_without_the_package_is_refused_before_the_run_starts(monkeypatch):
  # It failed in MetricWriter, after the text cache was built and the state set up.
  import importlib.util
  import sys

  config = base64.get_config('tiny')
  config.train.wandb = True
  monkeypatch.delitem(sys.modules, 'wandb', raising=False)
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    'find_spec',
    lambda name, *a: None if name == 'wandb' else real_find_spec(name, *a),
  )
  with pytest.raises(ValueError, match=r'train.wandb=True needs Weights & Biases: `pip install'):
    train_lib.check_settings(config)
  config.train.wandb = False
  train_lib.check_settings(config)


def test_an_unknown_wandb_mode_is_refused_before_the_run_starts():
  # W&B refused it in MetricWriter (a multi-line pydantic error), after the text cache was built.
  config = base64.get_config('tiny')
  config.train.wandb = True
  config.train.wandb_mode = 'ofline'
  with pytest.raises(ValueError) as e:
    train_lib.check_settings(config)
  assert str(e.value) == "train.wandb_mode='ofline': use one of online, offline, disabled."
  config.train.wandb = False  # not used: not checked
  train_lib.check_settings(config)


def test_a_sample_grid_without_prompts_is_refused():
  config = base64.get_config('tiny')
  config.train.num_sample_prompts = 0
  train_lib.check_settings(config)  # no grids (sample_every=0): not used
  config.train.sample_every = 2
  with pytest.raises(ValueError, match='train.num_sample_prompts=0: the sample grids'):
    train_lib.check_settings(config)
  config.train.sample_prompts = ('a red square',)
  train_lib.check_settings(config)  # the given prompts are used


def test_every_shipped_config_passes_the_start_checks_and_a_shifted_cosine_needs_its_base():
  import importlib

  for name, variants in (
    ('base64', ('', 'small', 'demo', 'tiny')),
    ('sr256', ('', 'demo', 'tiny')),
    ('sr1024', ('', 'demo', 'tiny')),
    ('digits', ('', 'tiny')),
  ):
    module = importlib.import_module(f'configs.{name}')
    for variant in variants:
      train_lib.check_settings(module.get_config(variant))
  config = base64.get_config('tiny')
  config.diffusion.schedule = 'shifted_cosine'
  train_lib.check_settings(config)
  config.diffusion.shift_base = 0
  with pytest.raises(ValueError, match='diffusion.shift_base=0: the shifted cosine'):
    train_lib.check_settings(config)
