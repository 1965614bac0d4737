"""sample.py through the real CLI on tiny checkpoints trained here: outputs, reproducibility,
a two-stage cascade, and every bad input (clear message, non-zero exit, nothing overwritten)."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, cli_env, with_address_space_limit, with_cpu_devices

pytestmark = [pytest.mark.smoke, pytest.mark.xdist_group('sample')]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('sample')
  env = cli_env(devices=1)
  common = [
    f'--config.text.cache_dir={root / "embeddings"}',
    f'--config.data.render_cache_dir={root / "openmoji"}',
    '--config.text.dtype=float32',  # not the bfloat16 default: sampling must follow the config
  ]
  for config, workdir, extra in [
    ('configs/base64.py:tiny', 'base', ['--config.train.num_steps=4']),  # keeps steps 2 and 4
    (
      'configs/sr256.py:tiny',
      'sr',
      [
        '--config.train.num_steps=2',
        '--config.data.lowres_resolution=16',
        '--config.data.resolution=32',
      ],
    ),
  ]:
    proc = subprocess.run(
      [
        sys.executable,
        'train.py',
        f'--config={config}',
        f'--workdir={root / workdir}',
        *common,
        *extra,
      ],
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
  return {'root': root, 'env': env, 'base': root / 'base', 'sr': root / 'sr'}


def sample(runs, *args, env=None):
  return subprocess.run(
    [sys.executable, 'sample.py', *args],
    cwd=REPO_ROOT,
    env=env or runs['env'],
    capture_output=True,
    text=True,
    timeout=900,
  )


def pngs(folder):
  return sorted(p for p in pathlib.Path(folder).glob('*.png') if p.name != 'grid.png')


def test_base_stage_outputs_and_sidecars(runs):
  from imagen_jax import sample_lib

  out = runs['root'] / 'out_base'
  proc = sample(
    runs,
    '--prompt=a red apple',
    '--prompt=blue sky',
    f'--checkpoints={runs["base"]}',
    '--num_images=2',
    '--steps=3',
    f'--out={out}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  files = pngs(out)
  assert len(files) == 4
  for f in files:
    arr = np.asarray(Image.open(f))
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
  assert (out / 'grid.png').exists()
  side = json.loads(files[0].with_suffix('.json').read_text())
  assert side['prompt'] == 'a red apple' and side['seed'] == 0
  assert side['stages'][0]['steps'] == 3 and side['stages'][0]['step'] == 4  # the latest
  assert side['stages'][0]['sampler'] == 'dpmpp_2m'
  assert side['sampled_on'] == {'backend': 'cpu', 'devices': 1, 'batch_size': 8}
  assert side['noise'] == sample_lib.NOISE and side['noise_index'] == 0
  assert side['grid_end'] == sample_lib.GRID_END
  for noise in ('Sharding info not provided', 'read only', 'read_only', 'Traceback'):
    assert noise not in proc.stderr, proc.stderr[-3000:]
  # The sampler was compiled ahead of its run: its memory is logged before the batch runs.
  memory = re.search(r'base64 sampler memory \(batch 4\): per device \d+ MB', proc.stderr)
  assert memory and memory.start() < proc.stderr.index('batch 1/1: sampled 4 images')


def test_same_seed_same_images_other_seed_differs(runs):
  outs = {}
  for name, seed in [('a', 3), ('b', 3), ('c', 4)]:
    out = runs['root'] / f'seed_{name}'
    proc = sample(
      runs,
      '--prompt=a red apple',
      f'--checkpoints={runs["base"]}',
      '--steps=3',
      f'--seed={seed}',
      '--sampler=ddpm',
      f'--out={out}',
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if name == 'b':  # the same program as run 'a' compiled into the suite's cache
      assert 'the sampler loaded from the persistent compilation cache' in proc.stderr
    outs[name] = np.asarray(Image.open(pngs(out)[0]))
  # Exact: same machine, same compiled programs, same seed; XLA:CPU is deterministic run to run.
  np.testing.assert_array_equal(outs['a'], outs['b'])
  assert not np.array_equal(outs['a'], outs['c'])


def test_two_cpu_devices_split_even_batches_and_match_one_device(runs):
  # IMAGEN_JAX_CPU_DEVICES=2 (sample.py configures the devices; the automatic choice is tested
  # in cpu_devices_test): the batch of 4 is split over the two devices, the last one (1 image)
  # is sampled on the first device. The noise is drawn by index, so the images are those of one
  # device up to float rounding (other batch shapes per program; the text encoder runs on both
  # devices), ddpm's fresh noise at every step included.
  args = ['--prompt=a red apple', '--num_images=5', '--batch_size=4', '--steps=3']
  args += [f'--checkpoints={runs["base"]}', '--sampler=ddpm']
  one = runs['root'] / 'devices_one'
  assert sample(runs, *args, f'--out={one}').returncode == 0
  two = runs['root'] / 'devices_two'
  proc = sample(runs, *args, f'--out={two}', env=with_cpu_devices(runs['env'], 2))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'CPU devices: 2' in proc.stderr, proc.stderr[-3000:]
  assert 'batch 1/2: sampled 4 images over 2 devices, wrote 4.' in proc.stderr
  assert 'batch 2/2: sampled 1 images on the first device, wrote 1.' in proc.stderr
  assert [p.name for p in pngs(two)] == [p.name for p in pngs(one)] and len(pngs(one)) == 5
  for a, b in zip(pngs(one), pngs(two), strict=True):
    diff = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16))
    assert diff.max() <= 3 and diff.mean() < 0.25, (a.name, diff.max(), diff.mean())
    side_a, side_b = (json.loads(p.with_suffix('.json').read_text()) for p in (a, b))
    assert side_a.pop('sampled_on') == {'backend': 'cpu', 'devices': 1, 'batch_size': 4}
    assert side_b.pop('sampled_on') == {'backend': 'cpu', 'devices': 2, 'batch_size': 4}
    assert side_a == side_b
  # A resume on one device of images sampled on two: made, with a warning that the new image
  # matches an uninterrupted run only to float rounding.
  last = pngs(two)[-1]
  last.unlink()
  proc = sample(runs, *args, f'--out={two}', '--skip_existing')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (
    f'--skip_existing: images in {two} were sampled on 2 cpu devices in batches of 4, this run '
    'samples on 1 cpu device in batches of 4: the images it adds match an uninterrupted run only '
    'to float rounding'
  ) in ' '.join(proc.stderr.split()), proc.stderr[-3000:]
  assert last.exists() and last.with_suffix('.json').exists()


def test_an_image_does_not_depend_on_the_batch_size(runs):
  # Image i draws its noise from fold_in(fold_in(key(seed), i), stage): sampled in batches of 4,
  # images 1 and 3 are removed, then remade one per batch (--batch_size=1 --skip_existing, as
  # after an out-of-memory error), with ddpm's fresh noise at every step. They come back the same
  # up to the float rounding of a batch of 1 (before, the batch size was a setting that
  # --skip_existing refused to change, and a batch's noise came from the batch's number).
  args = ['--prompt=a red apple', '--prompt=a bird', '--num_images=2', '--steps=3']
  args += [f'--checkpoints={runs["base"]}', '--sampler=ddpm']
  out = runs['root'] / 'batch_size'
  assert sample(runs, *args, '--batch_size=4', f'--out={out}').returncode == 0
  files = pngs(out)
  first = {p.name: np.asarray(Image.open(p), np.int16) for p in files}
  noise_index = [json.loads(p.with_suffix('.json').read_text())['noise_index'] for p in files]
  assert noise_index == [0, 1, 2, 3]
  for gone in (files[1], files[3]):
    gone.unlink()
  proc = sample(runs, *args, '--batch_size=1', '--skip_existing', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (
    f'images in {out} were sampled on 1 cpu device in batches of 4, this run samples on 1 cpu '
    'device in batches of 1: the images it adds match an uninterrupted run only to float rounding'
  ) in ' '.join(proc.stderr.split()), proc.stderr[-3000:]
  assert 'batch 1/4: all 1 images exist; skipped.' in proc.stderr
  assert 'batch 2/4: sampled 1 images, wrote 1.' in proc.stderr
  assert [p.name for p in pngs(out)] == list(first)
  for p in pngs(out):
    diff = np.abs(np.asarray(Image.open(p), np.int16) - first[p.name])
    assert diff.max() <= 3 and diff.mean() < 0.25, (p.name, diff.max(), diff.mean())


def test_a_training_prompts_folder_is_completed_with_skip_existing(runs):
  # The grid check ran before the training captions joined the request: a folder made by
  # --training_prompts alone held "a grid.png but none of this request's images" and the resume
  # the README describes was refused.
  args = ['--training_prompts=2', '--steps=2', f'--checkpoints={runs["base"]}']
  out = runs['root'] / 'training_prompts_resume'
  assert sample(runs, *args, f'--out={out}').returncode == 0
  files = pngs(out)
  assert len(files) == 2 and (out / 'grid.png').exists()
  files[1].unlink()
  proc = sample(runs, *args, '--skip_existing', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'sampled 2 images, wrote 1.' in proc.stderr, proc.stderr[-3000:]
  assert pngs(out) == files


def test_skip_existing_compares_only_what_decides_the_images(runs):
  # A base stage has no low-res input, but its sidecar recorded --aug_level: a --stop_at 1 rerun
  # without that flag was refused ('stages[0].aug_level: 0.1 -> 0.2') for identical images.
  cascade = f'--checkpoints={runs["base"]},{runs["sr"]}'
  args = ['--prompt=a cat', '--steps=2', '--stop_at=1', cascade]
  out = runs['root'] / 'base_aug_level'
  assert sample(runs, *args, '--aug_level=0.1', f'--out={out}').returncode == 0
  files = pngs(out)
  side = files[0].with_suffix('.json')
  recorded = json.loads(side.read_text())
  assert 'aug_level' not in recorded['stages'][0]
  proc = sample(runs, *args, '--skip_existing', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  # A sidecar from before records it on the base stage too: still the same settings.
  recorded['stages'][0]['aug_level'] = 0.1
  side.write_text(json.dumps(recorded))
  proc = sample(runs, *args, '--skip_existing', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert pngs(out) == files


_ESTIMATES = """
import json, sys
from configs import base64
from imagen_jax import cli, host_memory, sample_lib, train_lib
req = sample_lib.SampleRequest(
  prompts=['a'], checkpoints=sys.argv[1:], out='unused', num_images=2, seed=0, batch_size=2
)
sample_bytes = sample_lib.params_bytes(req)
train_bytes = train_lib.replicated_bytes(base64.get_config('tiny'))
started = host_memory.backend_started()
cli.split_cpu_devices(2, None, distributed=False, copy_bytes=lambda: sample_lib.params_bytes(req))
import jax
print(json.dumps(dict(sample=sample_bytes, train=train_bytes, started=started,
                      devices=jax.device_count())))
"""


def test_memory_estimates_read_the_run_folders_before_the_backend_starts(runs):
  # sample.py and train.py size what two CPU devices would each hold a copy of (cpu_devices'
  # memory check) before JAX's backend starts, which must stay unstarted for the device count
  # to apply. The estimates equal the bytes of the real params and train state.
  import jax

  from configs import base64
  from imagen_jax import checkpoints, device_memory, optim, sharding, stage, train_lib

  env = {k: v for k, v in runs['env'].items() if k not in ('XLA_FLAGS', 'IMAGEN_JAX_CPU_DEVICES')}
  proc = subprocess.run(
    [sys.executable, '-c', _ESTIMATES, str(runs['base']), str(runs['sr'])],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got['started'] is False
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 1
  assert got['devices'] == (2 if cores >= 2 else 1), proc.stderr[-3000:]

  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored = [
    checkpoints.restore_params(
      run, abstract_fn=lambda c: stage.abstract_model(c)[1], sharding=one_device
    ).params
    for run in (runs['base'], runs['sr'])
  ]
  assert got['sample'] == sum(device_memory.tree_bytes(p) for p in restored)
  config = base64.get_config('tiny')
  tx = optim.make_optimizer(config.optim, int(config.train.num_steps))
  _, state, _ = train_lib.create_train_state(
    config, tx, sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  )
  p, e, o = state['params'], state['ema_params'], state['opt_state']
  assert got['train'] == 2 * device_memory.tree_bytes(p) + device_memory.tree_bytes(
    e
  ) + device_memory.tree_bytes(o)  # + gradients
  assert checkpoints.peek_config(f'{runs["base"]}@3') is None  # no such step
  assert checkpoints.peek_config(f'{runs["base"]}@2').train.num_steps == 4


def test_two_stage_cascade(runs):
  out = runs['root'] / 'out_cascade'
  proc = sample(
    runs,
    '--prompt=a red apple',
    f'--checkpoints={runs["base"]},{runs["sr"]}',
    '--steps=3,2',
    '--guidance=3,1',
    '--sampler=ddim,heun',
    f'--out={out}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (png,) = pngs(out)
  assert np.asarray(Image.open(png)).shape == (32, 32, 3)
  side = json.loads(png.with_suffix('.json').read_text())
  assert [s['stage'] for s in side['stages']] == ['base64', 'sr256']
  assert [s['sampler'] for s in side['stages']] == ['ddim', 'heun']
  # --stop_at 1 runs the base stage only.
  out1 = runs['root'] / 'out_stop'
  proc = sample(
    runs,
    '--prompt=a red apple',
    f'--checkpoints={runs["base"]},{runs["sr"]}',
    '--steps=2,3',  # one value per checkpoint: the first taken, as the whole cascade's command
    '--stop_at=1',
    f'--out={out1}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert np.asarray(Image.open(pngs(out1)[0])).shape == (16, 16, 3)
  side = json.loads(pngs(out1)[0].with_suffix('.json').read_text())
  assert [s['steps'] for s in side['stages']] == [2]


def test_overlong_prompt_is_truncated_with_a_warning(runs):
  out = runs['root'] / 'out_long'
  proc = sample(
    runs,
    '--prompt=' + 'a very long prompt ' * 10,
    f'--checkpoints={runs["base"]}',
    '--steps=2',
    f'--out={out}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'truncated' in proc.stderr and 'dropped' in proc.stderr


@pytest.mark.parametrize(
  'args,message',
  [
    (['--prompt=  '], 'empty or whitespace'),
    (['--prompt=x', '--steps=0'], '--steps must be positive'),
    (['--prompt=x', '--num_images=0'], '--num_images must be a positive'),
    (['--prompt=x', '--guidance=-1'], '--guidance must be a finite number >= 0'),
    (['--prompt=x', '--guidance=nan'], '--guidance must be a finite number >= 0'),
    (['--prompt=x', '--dynamic_percentile=99.5'], 'dynamic_percentile is a quantile in (0, 1]'),
    ([], 'No prompt given'),
    (['--prompt=x', '--num_images=1001'], 'more than --max_images=1000; pass --max_images=1001'),
    (['--prompt=x', '--prompt=y', '--num_images=3', '--max_images=5'], 'pass --max_images=6'),
    (['--prompt=x', '--overwrite', '--skip_existing'], 'exclude each other'),
    (['--prompt=x', '--seed=4294967296'], '--seed must be in [0, 4294967296)'),
    (['--prompt=x', '--seed=-1'], '--seed must be in [0, 4294967296)'),
    (['--prompt=x', '--training_prompts=-3'], '--training_prompts must be >= 0, got -3'),
    (['--prompt=x', '--steps=1.5'], '--steps takes whole numbers, got 1.5'),  # was 'numbers'
    # Both were ignored without a word.
    (
      ['--prompt=x', '--thresholding=none', '--dynamic_percentile=0.9'],
      '--dynamic_percentile set but --thresholding none does not use it; pass --thresholding '
      'dynamic, or drop it.',
    ),
    # Bytes that are not UTF-8 (a Latin-1 terminal) reach argv as surrogates: one line, not a
    # traceback from the tokenizer after the checkpoints loaded.
    (['--prompt=caf\udce9'], "Prompt 0 ('caf\\udce9') is not UTF-8 text"),
  ],
)
def test_bad_arguments(runs, args, message):
  out = runs['root'] / 'bad'
  proc = sample(runs, *args, f'--checkpoints={runs["base"]}', f'--out={out}')
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert len(error_lines(proc.stderr)) == 1 and 'Traceback' not in proc.stderr
  assert not out.exists()  # refused before anything was written


def test_per_stage_values_say_how_many_to_give():
  from imagen_jax import sample_lib

  assert sample_lib._per_stage(['3'], 2, 'steps') == ['3', '3']
  assert sample_lib._per_stage(['3', '4'], 1, 'steps', checkpoints=2) == ['3']  # --stop_at=1
  for values, n, checkpoints, message in [
    (['3', '4'], 1, None, '2 values for 1 stage; give 1.'),  # read 'for 1 stages; give 1 or 1'
    (['3', '4', '5'], 2, None, '3 values for 2 stages; give 1 or 2.'),
    (['3', '4', '5'], 1, 2, 'give 1 (or 2, one per checkpoint).'),
  ]:
    with pytest.raises(sample_lib.SampleError, match=re.escape(message)):
      sample_lib._per_stage(values, n, 'steps', checkpoints=checkpoints)


def test_an_empty_out_is_refused_not_the_current_folder(runs, tmp_path):
  script = str(REPO_ROOT / 'sample.py')
  proc = subprocess.run(
    [sys.executable, script, '--prompt=x', '--out=', '--steps=2', f'--checkpoints={runs["base"]}'],
    cwd=tmp_path,
    env=runs['env'],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode != 0 and '--out is empty' in proc.stderr, proc.stderr[-2000:]
  assert list(tmp_path.iterdir()) == []


def test_prompts_file_encodings(runs, tmp_path):
  bom = tmp_path / 'bom.txt'
  # Notepad's UTF-8 with BOM and CRLF; a line break (U+2028) and a form feed inside a line are
  # part of its prompt: str.splitlines() made prompts of their pieces.
  bom.write_bytes('\ufeffa red apple\r\n\r\nblue\u2028sky\x0cat night\n'.encode())
  out = tmp_path / 'out'
  proc = sample(
    runs, f'--prompts_file={bom}', '--out=~/out', f'--checkpoints={runs["base"]}', '--steps=2',
    env={**runs['env'], 'HOME': str(tmp_path)},
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  prompts = sorted(json.loads(p.with_suffix('.json').read_text())['prompt'] for p in pngs(out))
  assert prompts == ['a red apple', 'blue\u2028sky\x0cat night']  # no mark on the first prompt
  assert not (REPO_ROOT / '~').exists()  # --out=~/out is the home folder's, not a '~' folder
  latin = tmp_path / 'latin.txt'
  latin.write_bytes('caf\u00e9\n'.encode('latin-1'))
  blank = tmp_path / 'blank.txt'
  blank.write_text('\n  \n\n')
  for path, message in [
    # was 'No prompt given: pass --prompt ... --prompts_file', of the file just given
    (blank, f'--prompts_file {blank} has no prompt (every line is empty)'),
    (latin, f'--prompts_file {latin} is not UTF-8 text'),
    (tmp_path, f'--prompts_file {tmp_path} is a folder'),
    (tmp_path / 'none.txt', f'--prompts_file {tmp_path / "none.txt"} does not exist'),
  ]:
    proc = sample(runs, f'--prompts_file={path}', f'--checkpoints={runs["base"]}')
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr[-2000:]
    assert error_lines(proc.stderr)[0].startswith(f'error: {message}')


def test_overwrite_removes_the_earlier_files_of_the_request_first(tmp_path):
  # So that a run stopped midway leaves no earlier images among its own, and the advice (the
  # same command with --skip_existing) resumes it instead of meeting other settings.
  from imagen_jax import sample_lib

  req = sample_lib.SampleRequest(prompts=['a'], checkpoints=['x'], out=str(tmp_path))
  paths = [(tmp_path / f'{i}.png', tmp_path / f'{i}.json') for i in range(3)]
  for pair in paths:
    for p in pair:
      p.write_text('earlier run')
  (tmp_path / 'grid.png').write_text('earlier grid')
  (tmp_path / 'other.png').write_text('not this request')
  sample_lib._remove_earlier_outputs(req, paths, [range(0, 2), range(2, 3)])
  assert sorted(p.name for p in tmp_path.iterdir()) == ['other.png']


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def test_missing_and_incomplete_checkpoints(runs, tmp_path):
  proc = sample(runs, '--prompt=x', f'--checkpoints={tmp_path / "nope"}', f'--out={tmp_path / "o"}')
  assert proc.returncode != 0 and 'does not exist' in proc.stderr
  (tmp_path / 'a_file').write_text('x')
  proc = sample(
    runs, '--prompt=x', f'--checkpoints={tmp_path / "a_file"}', f'--out={tmp_path / "o"}'
  )
  assert proc.returncode != 0 and 'is a file, not a run folder' in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'o').exists()
  incomplete = tmp_path / 'incomplete'
  (incomplete / 'checkpoints' / '5.orbax-checkpoint-tmp-1').mkdir(parents=True)
  proc = sample(runs, '--prompt=x', f'--checkpoints={incomplete}', f'--out={tmp_path / "o"}')
  assert proc.returncode != 0
  assert 'no finished checkpoint' in proc.stderr and '5.orbax-checkpoint-tmp-1' in proc.stderr
  # An empty entry (a trailing comma) was read as the current folder.
  proc = sample(runs, '--prompt=x', f'--checkpoints={runs["base"]},', f'--out={tmp_path / "o"}')
  assert proc.returncode == 2 and 'has an empty entry' in proc.stderr, proc.stderr[-2000:]
  # A step that is not kept fails after the output folder was made: every folder the run made
  # (here three deep) is removed again.
  deep = tmp_path / 'deep' / 'a' / 'b'
  proc = sample(runs, '--prompt=x', f'--checkpoints={runs["base"]}@99', f'--out={deep}')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / 'deep').exists()


def test_unwritable_output_and_no_overwrite(runs, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  proc = sample(runs, '--prompt=x', f'--checkpoints={runs["base"]}', f'--out={blocker / "sub"}')
  assert proc.returncode != 0 and 'Cannot write to the output folder' in proc.stderr

  out = tmp_path / 'keep'
  out.mkdir()
  existing = out / '000_00_x.png'
  existing.write_bytes(b'precious')
  proc = sample(runs, '--prompt=x', f'--checkpoints={runs["base"]}', '--steps=2', f'--out={out}')
  assert proc.returncode != 0 and '--overwrite' in proc.stderr
  assert existing.read_bytes() == b'precious'
  proc = sample(
    runs, '--prompt=x', f'--checkpoints={runs["base"]}', '--steps=2', f'--out={out}', '--overwrite'
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert existing.read_bytes() != b'precious'


def test_out_of_memory_is_one_line_and_writes_nothing(runs, tmp_path):
  # 32768 images in one batch under a 4 GiB address-space limit: XLA's allocation of the
  # sampler's temporaries (7.9 GB) fails (RESOURCE_EXHAUSTED), as a GPU's does past its memory.
  # (At 8192 images their block fit and a kernel's own scratch allocation failed instead:
  # std::bad_alloc, an abort that no Python code can catch.)
  out = tmp_path / 'out'
  cmd = [sys.executable, 'sample.py', f'--checkpoints={runs["base"]}', '--prompt=a red apple']
  cmd += ['--num_images=32768', '--batch_size=32768', '--max_images=32768', '--steps=2']
  proc = subprocess.run(
    with_address_space_limit([*cmd, f'--out={out}'], 4),
    cwd=REPO_ROOT,
    env=runs['env'],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  (line,) = error_lines(proc.stderr)
  assert line.startswith(
    'error: Out of memory sampling batch 1 of 1 on stage 1 (RESOURCE_EXHAUSTED: Out of memory '
    'allocating '
  )
  assert line.endswith('): lower --batch_size (now 32768). No image was written.')
  # Foretold by the memory check of the sampler compiled ahead of the batch (4 GiB limit).
  assert 'base64 sampler memory (batch 32768)' in proc.stderr
  assert 'Lower --batch_size (now 32768).' in proc.stderr
  assert 'Traceback' not in proc.stderr and not out.exists()


def test_nan_sample_is_an_error_and_writes_nothing(runs, tmp_path):
  """A checkpoint whose EMA params are NaN: sampling must fail, with no black PNG."""
  code = f"""
import jax, jax.numpy as jnp
from imagen_jax import checkpoints, optim, train_lib, sharding
src, dst = {str(runs['base'])!r}, {str(tmp_path / 'nan_run')!r}
m = checkpoints.make_manager(src, read_only=True)
step = m.latest_step()
config = checkpoints.restore_config(m, step)
tx = optim.make_optimizer(config.optim, config.train.num_steps)
mesh = sharding.make_mesh(config.mesh)
with jax.set_mesh(mesh):
  _, state, sh = train_lib.create_train_state(config, tx, mesh)
  target = train_lib.abstract_with_shardings(state, sh)
  state, data = checkpoints.restore(m, step, abstract_state=target)
  state['ema_params'] = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state['ema_params'])
  # save() refuses a non-finite state now; such checkpoints exist (older versions), so the
  # guard is bypassed here, the checksums still written and verified.
  real_checksums = checkpoints.array_checksums
  checkpoints.array_checksums = lambda tree, *version: (real_checksums(tree, *version)[0], True)
  out = checkpoints.make_manager(dst)
  checkpoints.save(out, step, state=state, data_state=data, config=config)
  out.wait_until_finished()
"""
  proc = subprocess.run(
    [sys.executable, '-c', code],
    cwd=REPO_ROOT,
    env=runs['env'],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / 'out'
  proc = sample(
    runs,
    '--prompt=x',
    f'--checkpoints={tmp_path / "nan_run"}',
    '--steps=2',
    '--thresholding=none',
    f'--out={out}',
  )
  assert proc.returncode != 0 and 'NaN' in proc.stderr
  assert not list(out.glob('*.png'))


def file_ids(paths):
  """(inode, mtime) per file: a rewrite (tmp file + os.replace) changes both."""
  return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def assert_same_files(a, b):
  names = sorted(p.name for p in pathlib.Path(a).iterdir())
  assert names == sorted(p.name for p in pathlib.Path(b).iterdir())
  for name in names:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


def stop_after_first_batch(runs, args, first_batch, sig):
  """Run sample.py, send `sig` once all `first_batch` files exist; (was running, (rc, log))."""
  log_path = pathlib.Path(str(first_batch[0].parent) + '.log')
  # The window between the first batch's files and the end of the run is the compile of the
  # last batch's new shape: seconds, unless the persistent compilation cache already holds it
  # from an earlier test (then the run could finish before the signal). So no cache here.
  env = {k: v for k, v in runs['env'].items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  with open(log_path, 'w') as log_file:
    proc = subprocess.Popen(
      [sys.executable, 'sample.py', *args, '--compilation_cache='],
      cwd=REPO_ROOT,
      env=env,
      stdout=log_file,
      stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 600
    while not all(f.exists() for f in first_batch) and proc.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.02)
    running = proc.poll() is None
    proc.send_signal(sig)
    rc = proc.wait(timeout=600)
  return running, (rc, log_path.read_text())


def test_streaming_kill_then_skip_existing_equals_uninterrupted(runs, tmp_path):
  """Files are written batch by batch: SIGKILL after the first batch keeps it; a rerun with
  --skip_existing skips that batch (no compute) and makes only the missing images, giving
  bitwise the files of an uninterrupted run; a partly-present batch is remade, only its missing
  files written."""
  args = [
    '--prompt=a red apple',
    f'--checkpoints={runs["base"]}',
    '--num_images=3',
    '--batch_size=2',  # batches [0, 1] and [2]: the second compiles a new shape, after the kill
    '--steps=4',
    '--sampler=ddpm',
  ]
  killed, whole = tmp_path / 'killed', tmp_path / 'whole'
  stems = [f'000_{k:02d}_a-red-apple' for k in range(3)]
  first_batch = [killed / f'{stem}.{ext}' for stem in stems[:2] for ext in ('png', 'json')]
  running, _ = stop_after_first_batch(runs, [*args, f'--out={killed}'], first_batch, signal.SIGKILL)
  assert running  # the first batch's files were on disk while the run went on
  assert not (killed / f'{stems[2]}.png').exists() and not (killed / 'grid.png').exists()
  before = file_ids(first_batch)

  proc = sample(runs, *args, f'--out={killed}', '--skip_existing')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'batch 1/2: all 2 images exist; skipped.' in proc.stderr
  assert 'batch 2/2: sampled 1 images, wrote 1.' in proc.stderr
  assert file_ids(first_batch) == before  # the skipped batch's files were not touched

  proc = sample(runs, *args, f'--out={whole}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_same_files(killed, whole)

  # A partly-present batch: remade, and only its missing file written.
  (killed / f'{stems[1]}.png').unlink()
  kept = file_ids([killed / f'{stems[0]}.png', killed / f'{stems[0]}.json'])
  proc = sample(runs, *args, f'--out={killed}', '--skip_existing')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'batch 1/2: sampled 2 images, wrote 1.' in proc.stderr
  assert 'batch 2/2: all 1 images exist; skipped.' in proc.stderr
  assert file_ids([killed / f'{stems[0]}.png', killed / f'{stems[0]}.json']) == kept
  assert_same_files(killed, whole)

  # Everything there: no batch sampled, not even the text encoder loaded, no image touched.
  everything = file_ids(p for p in killed.iterdir() if p.name != 'grid.png')
  proc = sample(runs, *args, f'--out={killed}', '--skip_existing')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'sampled' not in proc.stderr and 'Text encoder' not in proc.stderr, proc.stderr[-3000:]
  assert file_ids(p for p in killed.iterdir() if p.name != 'grid.png') == everything
  assert_same_files(killed, whole)

  # A PNG without its sidecar (a run stopped between the two writes, perhaps with other
  # settings) is not kept: it is made again, with its sidecar.
  (killed / f'{stems[2]}.json').unlink()
  (killed / f'{stems[2]}.png').write_bytes((killed / f'{stems[0]}.png').read_bytes())
  proc = sample(runs, *args, f'--out={killed}', '--skip_existing')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'batch 2/2: sampled 1 images, wrote 1.' in proc.stderr
  assert_same_files(killed, whole)

  # Another request's folder (its grid.png, none of this request's images): refused, since
  # --skip_existing would replace that grid with this request's.
  everything = file_ids(killed.iterdir())
  proc = sample(
    runs,
    *[a for a in args if a != '--prompt=a red apple'],
    '--prompt=a bird',
    f'--out={killed}',
    '--skip_existing',
  )
  assert proc.returncode == 2 and "holds a grid.png but none of this request's" in proc.stderr
  assert file_ids(killed.iterdir()) == everything

  # Other settings than the existing files record: refused, nothing touched.
  everything = file_ids(killed.iterdir())
  proc = sample(
    runs, *[a for a in args if a != '--steps=4'], '--steps=5', f'--out={killed}', '--skip_existing'
  )
  assert proc.returncode != 0 and 'made with other settings' in proc.stderr, proc.stderr[-2000:]
  assert 'stages[0].steps: 4 -> 5' in proc.stderr
  assert file_ids(killed.iterdir()) == everything


def test_sigterm_keeps_finished_batches_and_says_how_to_resume(runs, tmp_path):
  out = tmp_path / 'out'
  first_batch = [out / f'000_0{k}_a-red-apple.{ext}' for k in (0, 1) for ext in ('png', 'json')]
  args = ['--prompt=a red apple', f'--checkpoints={runs["base"]}', '--num_images=3']
  args += ['--batch_size=2', '--steps=5', '--sampler=ddim', f'--out={out}']  # shapes of its own
  running, (rc, log) = stop_after_first_batch(runs, args, first_batch, signal.SIGTERM)
  assert running and rc == 75, log[-3000:]
  assert 'stopped (SIGTERM)' in log and '--skip_existing' in log and 'Traceback' not in log, log
  assert all(f.exists() for f in first_batch) and not (out / '000_02_a-red-apple.png').exists()


def test_a_sigterm_while_the_sampler_compiles_exits_75(runs, tmp_path):
  # The stop line was printed, then the interpreter's shutdown under XLA's compile threads
  # crashed: 'Fatal Python error: Segmentation fault', rc 139 (10 of 10 runs of an audit).
  log_path = tmp_path / 'log'
  env = {k: v for k, v in runs['env'].items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  args = ['--prompt=a red apple', f'--checkpoints={runs["base"]}', '--num_images=3']
  args += ['--steps=5', f'--out={tmp_path / "out"}', '--compilation_cache=']
  with open(log_path, 'w') as log_file:
    proc = subprocess.Popen(
      [sys.executable, 'sample.py', *args],
      cwd=REPO_ROOT,
      env=env,
      stdout=log_file,
      stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 600
    while 'attention up_1_cross_0' not in log_path.read_text() and proc.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.02)
    time.sleep(1.0)  # into the compile
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=600)
  log = log_path.read_text()
  assert rc == 75 and 'Fatal Python error' not in log, log[-3000:]
  # No batch was finished: it said "the finished batches are in OUT" of a folder it had removed.
  assert 'stopped (SIGTERM) before the first batch was written; rerun the same command.' in log
  assert not (tmp_path / 'out').exists()


def test_a_stop_whose_interrupt_was_lost_still_stops_before_the_next_write(runs, monkeypatch):
  # sample.py's SIGTERM handler raises KeyboardInterrupt, but Python drops an exception raised in
  # a garbage-collection callback (jax's _xla_gc_callback runs during compiles): the run went on
  # to the end with rc 0 (seen in CI). The handler also records the signal; here it is recorded
  # while batch 2 samples, with no raise at all, as if the raise had been dropped.
  from imagen_jax import cascade, sample_lib

  image_keys = cascade.image_keys

  def keys_then_signal(seed, batch, *rest):
    if list(batch) == [2]:  # batch 2 of 2 is being placed on the device
      sample_lib.request_stop('SIGTERM')
    return image_keys(seed, batch, *rest)

  monkeypatch.setattr(cascade, 'image_keys', keys_then_signal)
  monkeypatch.setattr(sample_lib, '_stop_requested', None)
  out = runs['root'] / 'lost_interrupt'
  req = sample_lib.SampleRequest(
    prompts=['a red apple'],
    checkpoints=[str(runs['base'])],
    out=str(out),
    num_images=3,
    batch_size=2,
    steps=[2],
  )
  with pytest.raises(KeyboardInterrupt, match='SIGTERM'):
    sample_lib.run(req)
  # Batch 1 is on disk with its sidecars; batch 2 was dropped before its write; no grid.
  assert sorted(f.name for f in out.iterdir()) == [
    f'000_0{k}_a-red-apple.{ext}' for k in (0, 1) for ext in ('json', 'png')
  ]


def test_a_full_disk_mid_run_is_one_error_that_keeps_what_was_written(runs, monkeypatch):
  # A write failing after the first batch (ENOSPC) was an OSError traceback that left a cut
  # '.NAME.tmp' file behind. Injected here in the PNG encoder, after it wrote some bytes, in
  # batch 2's first image.
  import errno

  from imagen_jax import sample_lib

  save = Image.Image.save
  calls = []

  def save_then_fill_the_disk(self, fp, *args, **kwargs):
    calls.append(fp)
    if len(calls) == 3:  # batch 2, image 1 (batches of 2)
      pathlib.Path(fp).write_bytes(b'\x89PNG cut')
      raise OSError(errno.ENOSPC, 'No space left on device')
    return save(self, fp, *args, **kwargs)

  monkeypatch.setattr(Image.Image, 'save', save_then_fill_the_disk)
  out = runs['root'] / 'full_disk'
  req = sample_lib.SampleRequest(
    prompts=['a red apple'], checkpoints=[str(runs['base'])], out=str(out), num_images=4,
    batch_size=2, steps=[2],
  )  # fmt: skip
  with pytest.raises(sample_lib.SampleError) as info:
    sample_lib.run(req)
  assert str(info.value) == (
    f'Cannot write {out / "000_02_a-red-apple.png"} (No space left on device); 2 images from '
    'earlier batches were written with their sidecars. Free space (or fix the folder) and run the '
    'same command with --skip_existing to make the rest.'
  )
  assert sorted(f.name for f in out.iterdir()) == [  # no .tmp file, no grid
    f'000_0{k}_a-red-apple.{ext}' for k in (0, 1) for ext in ('json', 'png')
  ]
  monkeypatch.setattr(Image.Image, 'save', save)
  assert len(sample_lib.run(dataclasses.replace(req, skip_existing=True))) == 4  # finished


def test_an_output_another_run_writes_meanwhile_is_left_and_named(runs, monkeypatch):
  # The output folder is checked at the start; a second sample.py on the same --out can write an
  # image of this request later. save_png refused to replace it, as a FileExistsError traceback.
  from imagen_jax import cascade, sample_lib

  out = runs['root'] / 'raced'
  image_keys = cascade.image_keys

  def keys_then_race(seed, batch, *rest):
    if list(batch) == [2]:  # batch 2 of 2: the other run writes its image first
      (out / '000_02_a-red-apple.png').write_bytes(b'the other run')
    return image_keys(seed, batch, *rest)

  monkeypatch.setattr(cascade, 'image_keys', keys_then_race)
  req = sample_lib.SampleRequest(
    prompts=['a red apple'], checkpoints=[str(runs['base'])], out=str(out), num_images=3,
    batch_size=2, steps=[2],
  )  # fmt: skip
  with pytest.raises(sample_lib.SampleError, match=r'000_02_a-red-apple.png appeared while this'):
    sample_lib.run(req)
  assert (out / '000_02_a-red-apple.png').read_bytes() == b'the other run'


def test_existing_sidecars_are_checked_before_a_resume(tmp_path, caplog):
  from imagen_jax import sample_lib

  req = sample_lib.SampleRequest(prompts=['a'], checkpoints=['unused'], out=str(tmp_path))
  settings = {'seed': 0, 'noise': sample_lib.NOISE, 'grid_end': sample_lib.GRID_END}
  settings['stages'] = [{'step': 4}]
  here = {'backend': 'cpu', 'devices': 1, 'batch_size': 8}
  paths = [(tmp_path / f'{i}.png', tmp_path / f'{i}.json') for i in range(4)]

  def write(i, text):
    paths[i][1].write_text(text)

  write(0, json.dumps({'prompt': 'a', 'image_index': 0, **settings, 'sampled_on': here}))
  write(1, json.dumps({'prompt': 'a', 'image_index': 1, **settings}))  # before sampled_on
  with caplog.at_level('WARNING'):
    sample_lib._check_existing_sidecars(req, paths, settings, here)
  assert 'sampled on' not in caplog.text
  two = {'backend': 'cpu', 'devices': 2}  # no batch_size: described by its devices alone
  write(2, json.dumps({'prompt': 'a', 'image_index': 2, **settings, 'sampled_on': two}))
  with caplog.at_level('WARNING'):
    sample_lib._check_existing_sidecars(req, paths, settings, here)
  assert 'were sampled on 2 cpu devices, this run samples on 1 cpu device in batches of 8' in (
    caplog.text
  )
  older = {k: v for k, v in settings.items() if k != 'noise'}
  write(3, json.dumps({'prompt': 'a', 'image_index': 3, **older, 'batch_size': 8}))
  with pytest.raises(sample_lib.SampleError, match=r'3.json was made by an older imagen-jax'):
    sample_lib._check_existing_sidecars(req, paths, settings, here)
  write(3, json.dumps({'prompt': 'a', 'image_index': 3, **settings, 'seed': 1}))
  with pytest.raises(sample_lib.SampleError, match=r'3.json was made with other settings \(seed'):
    sample_lib._check_existing_sidecars(req, paths, settings, here)
  # Sampled before the grid ended at the clean image: kept, with a warning naming how many.
  before_grid_end = {k: v for k, v in settings.items() if k != 'grid_end'}
  write(3, json.dumps({'prompt': 'a', 'image_index': 3, **before_grid_end, 'sampled_on': here}))
  caplog.clear()
  with caplog.at_level('WARNING'):
    sample_lib._check_existing_sidecars(req, paths, settings, here)
  assert '1 image(s) in' in caplog.text and 'before 2026-11-29' in caplog.text, caplog.text
  for bad in ('[1, 2]', '{"prompt": '):
    write(3, bad)
    with pytest.raises(sample_lib.SampleError, match=r'3.json is unreadable .*delete it'):
      sample_lib._check_existing_sidecars(req, paths, settings, here)


def test_checkpoint_step_choice(runs, tmp_path):
  """run@N samples kept step N; the sidecar records the step used."""
  out = tmp_path / 'at2'
  proc = sample(runs, '--prompt=x', f'--checkpoints={runs["base"]}@2', '--steps=2', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  (png,) = pngs(out)
  side = json.loads(png.with_suffix('.json').read_text())
  assert side['stages'][0]['step'] == 2
  assert side['stages'][0]['checkpoint'] == str(runs['base'])


@pytest.mark.parametrize(
  'suffix,messages',
  [
    ('@3', ['Step 3 is not a kept checkpoint', 'kept steps: [2, 4]']),
    ('@abc', ['RUN@STEP']),
    ('@', ['RUN@STEP']),
  ],
)
def test_bad_checkpoint_step(runs, tmp_path, suffix, messages):
  out = tmp_path / 'out'
  proc = sample(runs, '--prompt=x', f'--checkpoints={runs["base"]}{suffix}', f'--out={out}')
  assert proc.returncode != 0, proc.stderr[-2000:]
  assert len(error_lines(proc.stderr)) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  for message in messages:
    assert message in proc.stderr, proc.stderr[-2000:]
  assert not out.exists()


def test_prompt_embeddings_equal_the_training_cache(runs):
  """sample.py conditions the U-Net on bitwise the embeddings training read from the cache for
  the same caption (the base run was trained with text.dtype=float32, not the default), for
  any number of prompts."""
  code = f"""
import numpy as np
from imagen_jax import precompute, sample_lib
from imagen_jax.data import sources
st = sample_lib.restore_stage({str(runs['base'])!r}, {{}}, True)
assert st.config.text.dtype == 'float32', st.config.text.dtype
cache = precompute.open_or_build_cache(st.config, build_if_missing=False)
captions = sorted(set(sources.build_source(st.config.data).captions()))
for subset in (captions, captions[3:8], captions[-1:]):
  (embs,), (mask,) = sample_lib.encode_prompts(subset, [st])
  ref_embs, ref_mask = cache.lookup(subset)
  assert embs.dtype == np.float32 and embs.shape == ref_embs.shape, (embs.dtype, embs.shape)
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_array_equal(embs, ref_embs)
print('ok', len(captions))
"""
  proc = subprocess.run(
    [sys.executable, '-c', code],
    cwd=REPO_ROOT,
    env=runs['env'],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr[-3000:]


def damage_checkpoint(run_dir, damage):
  """Damage step 4 of a run copy: 'flipped_bytes' (one bit in every array data file: the state
  no longer loads), 'stale_checksums' (step 2's checksums: finite arrays that fail verification,
  as silent bit rot would), 'damaged_config' (its config JSON is not JSON)."""
  step4 = run_dir / 'checkpoints' / '4'
  if damage == 'flipped_bytes':
    data = [p for p in (step4 / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
    assert data, sorted((step4 / 'state').rglob('*'))
    for path in data:
      raw = bytearray(path.read_bytes())
      raw[len(raw) // 2] ^= 0x10
      path.write_bytes(bytes(raw))
  elif damage == 'stale_checksums':
    shutil.rmtree(step4 / 'checksums')
    shutil.copytree(run_dir / 'checkpoints' / '2' / 'checksums', step4 / 'checksums')
  else:
    (step4 / 'config' / 'metadata').write_text('{"stage": "base64", ')


@pytest.mark.parametrize('damage', ['flipped_bytes', 'stale_checksums', 'damaged_config'])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_step(runs, tmp_path, damage):
  """A damaged latest step: sampling reports it (step and path), uses step 2 and says so;
  asking for the damaged step explicitly is a one-line error."""
  run_dir = tmp_path / 'run'
  shutil.copytree(runs['base'], run_dir)
  damage_checkpoint(run_dir, damage)
  out = tmp_path / 'out'
  proc = sample(runs, '--prompt=x', f'--checkpoints={run_dir}', '--steps=2', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'checkpoint step 4' in proc.stderr and str(run_dir / 'checkpoints' / '4') in proc.stderr
  assert 'sampling from checkpoint step 2' in proc.stderr, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]  # tensorstore's closed-loop noise
  (png,) = pngs(out)
  assert json.loads(png.with_suffix('.json').read_text())['stages'][0]['step'] == 2

  if damage != 'flipped_bytes':
    return
  proc = sample(
    runs, '--prompt=x', f'--checkpoints={run_dir}@4', '--steps=2', f'--out={tmp_path / "o4"}'
  )
  assert proc.returncode != 0 and 'checkpoint step 4' in proc.stderr, proc.stderr[-3000:]
  assert len(error_lines(proc.stderr)) == 1 and not (tmp_path / 'o4').exists()
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------------ editing


def write_image(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)
  return path


def smooth_image(height, width, seed=0):
  """A smooth RGB picture (a colour gradient plus a bump): far from the tiny models' outputs."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  base = rng.uniform(0, 255, 3)
  picture = base + 120 * np.stack([x, y, 1 - x], -1) * rng.uniform(0.5, 1.0, 3)
  return np.clip(picture, 0, 255).astype(np.uint8)


def test_upscale_images_of_any_size_from_files_and_a_folder(runs, tmp_path):
  """SR checkpoints only: every image (odd sizes, smaller and larger than the 16 px input) is
  fitted to the SR stage's low-res size, with one log line saying how, and upscaled to 32 px."""
  pics = tmp_path / 'pics'
  pics.mkdir()
  write_image(pics / 'wide.png', smooth_image(23, 37, seed=1))
  write_image(pics / 'big.jpg', smooth_image(50, 50, seed=2))
  small = write_image(tmp_path / 'small.png', smooth_image(12, 9, seed=3))
  out = tmp_path / 'up'
  proc = sample(
    runs,
    '--prompt=a red apple',
    f'--checkpoints={runs["sr"]}',
    f'--init_image={pics}',
    f'--init_image={small}',
    '--steps=2',
    f'--out={out}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  files = pngs(out)
  assert [f.name for f in files] == [
    '000-big_000_00_a-red-apple.png',
    '001-wide_000_00_a-red-apple.png',
    '002-small_000_00_a-red-apple.png',
  ]
  outputs = [np.asarray(Image.open(f)) for f in files]
  assert all(o.shape == (32, 32, 3) for o in outputs)
  assert not np.array_equal(outputs[0], outputs[1])  # each conditioned on its own image
  for line in (
    'wide.png (37x23: centre 23x23 square kept (14 px of its width cut off)) resized down to '
    "16x16 (bicubic) for sr256's low-res input (upscaling).",
    'small.png (9x12: centre 9x9 square kept (3 px of its height cut off)) resized up to 16x16 '
    "(bicubic) for sr256's low-res input (upscaling).",
    'big.jpg (50x50) resized down to 16x16',
  ):
    assert line in proc.stderr, proc.stderr[-3000:]
  side = json.loads(files[1].with_suffix('.json').read_text())
  assert side['init_image'] == str(pics / 'wide.png')
  assert [s['stage'] for s in side['stages']] == ['sr256']
  assert [p['path'] for p in side['edit']['init_images']] == [
    str(pics / 'big.jpg'),
    str(pics / 'wide.png'),
    str(small),
  ]


def test_image_to_image_and_inpainting(runs, tmp_path):
  from imagen_jax import editing

  picture = smooth_image(24, 20, seed=4)
  init = write_image(tmp_path / 'init.png', picture)
  hole = np.zeros((24, 20), np.uint8)
  hole[8:16, 6:14] = 255
  mask = write_image(tmp_path / 'hole.png', hole)
  common = ['--prompt=a red apple', '--seed=0']

  # Strength 1 is plain sampling from the same seed (the image is not used, and it says so).
  plain, full = tmp_path / 'plain', tmp_path / 'full'
  proc = sample(runs, *common, f'--checkpoints={runs["base"]}', '--steps=3', f'--out={plain}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = sample(
    runs,
    *common,
    f'--checkpoints={runs["base"]}',
    '--steps=3',
    f'--init_image={init}',
    '--strength=1',
    f'--out={full}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'the init image is not used' in proc.stderr
  np.testing.assert_array_equal(  # exact: the same compiled loop from the same draw
    np.asarray(Image.open(pngs(full)[0])), np.asarray(Image.open(pngs(plain)[0]))
  )

  # Image-to-image on the base stage.
  varied = tmp_path / 'varied'
  proc = sample(
    runs,
    *common,
    f'--checkpoints={runs["base"]}',
    '--steps=4',
    f'--init_image={init}',
    '--strength=0.5',
    f'--out={varied}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (png,) = pngs(varied)
  assert np.asarray(Image.open(png)).shape == (16, 16, 3)
  side = json.loads(png.with_suffix('.json').read_text())
  assert side['stages'][0]['strength'] == 0.5 and side['edit']['strength'] == 0.5
  assert 'init.png (20x24: centre 20x20 square kept' in proc.stderr

  # Inpainting through both stages: the known pixels of the 32 px result are the image's.
  repainted = tmp_path / 'repainted'
  proc = sample(
    runs,
    *common,
    f'--checkpoints={runs["base"]},{runs["sr"]}',
    '--steps=3,2',
    f'--init_image={init}',
    f'--mask={mask}',
    '--resample=2',
    f'--out={repainted}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (png,) = pngs(repainted)
  result = np.asarray(Image.open(png))
  expected = editing.fit_image(Image.fromarray(picture), 32)
  keep = editing.fit_mask(hole >= 128, 32)[..., 0] == 0
  assert result.shape == (32, 32, 3) and 0 < keep.sum() < keep.size
  np.testing.assert_array_equal(result[keep], expected[keep])  # exact, through uint8 and back
  assert np.abs(result[~keep].astype(int) - expected[~keep]).mean() > 5  # the hole is new
  side = json.loads(png.with_suffix('.json').read_text())
  assert [s['resample'] for s in side['stages']] == [2, 2]
  assert side['edit']['mask']['path'] == str(mask)


EDIT_CASES = {
  'undecodable': (['--init_image={bad}'], 'cannot be decoded as an image'),
  'grey': (['--init_image={grey}', '--strength=0.5'], 'is a greyscale image (mode L)'),
  'rgba': (['--init_image={rgba}', '--strength=0.5'], 'has transparent pixels (alpha channel'),
  'mask_size': (['--init_image={init}', '--mask={small_mask}'], "a mask must have its image's"),
  'mask_black': (
    ['--init_image={init}', '--mask={black}'],
    'has no white pixel: nothing to repaint',
  ),
  'mask_white': (['--init_image={init}', '--mask={white}'], 'is all white: nothing of the image'),
  'strength_0': (['--init_image={init}', '--strength=0'], '--strength must be in (0, 1]'),
  'strength_2': (['--init_image={init}', '--strength=2'], '--strength must be in (0, 1]'),
  'no_sr_stage': (['--init_image={init}'], 'upscales the image with super-resolution stages'),
  'no_image': (['--strength=0.5'], '--strength edits an image: pass it with --init_image'),
  'resample_no_mask': (['--init_image={init}', '--resample=3'], 'pass it with --mask'),
}


@pytest.mark.parametrize('case', sorted(EDIT_CASES))
def test_bad_edit_inputs(runs, tmp_path, case):
  """One error line, a non-zero exit, and the output folder untouched even with --overwrite."""
  rgb = smooth_image(20, 20)
  files = {
    'init': write_image(tmp_path / 'init.png', rgb),
    'grey': write_image(tmp_path / 'grey.png', rgb[..., 0]),
    'rgba': write_image(tmp_path / 'rgba.png', np.dstack([rgb, np.eye(20) * 255])),
    'small_mask': write_image(tmp_path / 'small_mask.png', np.full((10, 10), 255)),
    'black': write_image(tmp_path / 'black.png', np.zeros((20, 20))),
    'white': write_image(tmp_path / 'white.png', np.full((20, 20), 255)),
    'bad': tmp_path / 'bad.png',
  }
  files['bad'].write_text('not a picture')
  args, message = EDIT_CASES[case]
  out = tmp_path / 'out'
  out.mkdir()
  precious = out / '000-init_000_00_x.png'  # the name the request would write
  precious.write_bytes(b'precious')
  proc = sample(
    runs,
    '--prompt=x',
    f'--checkpoints={runs["base"]}',
    '--steps=2',
    *[a.format(**files) for a in args],
    f'--out={out}',
    '--overwrite',
  )
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert len(error_lines(proc.stderr)) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert sorted(p.name for p in out.iterdir()) == [precious.name]
  assert precious.read_bytes() == b'precious'


# Two processes (as `sample.py --distributed` runs them) checking the same --out at once, many
# times: each must remove only its own write probe (a shared name made one process's unlink
# fail with FileNotFoundError, reported as "Cannot write to the output folder").
_PROBE_RACE = """
import sys, types
from imagen_jax import sample_lib
req = types.SimpleNamespace(out=sys.argv[1], overwrite=True, skip_existing=False)
for _ in range(400):
  sample_lib.prepare_output(req)
print('ok')
"""


def test_processes_sharing_an_output_folder_do_not_remove_each_others_probe(tmp_path):
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _PROBE_RACE, str(tmp_path / 'out')],
      cwd=REPO_ROOT,
      env=cli_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and out.strip() == 'ok', err[-2000:]
  assert list((tmp_path / 'out').iterdir()) == []  # no probe left behind


def test_training_prompts_without_the_training_data_is_one_sample_error(
  runs, tmp_path, monkeypatch
):
  # --training_prompts reads the base run's dataset; where it is not available here (another
  # machine, a moved folder), the request fails as a SampleError, not a DataError traceback,
  # and the output folder it made is removed again.
  from imagen_jax import sample_lib
  from imagen_jax.data import pipeline, sources

  def unavailable(config, n, **kwargs):
    raise sources.DataError('Image folder /data/gone does not exist.')

  monkeypatch.setattr(pipeline, 'sample_captions', unavailable)
  out = tmp_path / 'out'
  req = sample_lib.SampleRequest(
    prompts=[], checkpoints=[str(runs['base'])], out=str(out), training_prompts=2
  )
  with pytest.raises(sample_lib.SampleError, match=r"--training_prompts reads the base stage's "):
    sample_lib.run(req)
  assert not out.exists()
