"""sample.py through the real CLI on tiny checkpoints trained here: outputs, reproducibility,
a two-stage cascade, and every bad input (clear message, non-zero exit, nothing overwritten)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.smoke, pytest.mark.xdist_group('sample')]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('sample')
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
    JAX_COMPILATION_CACHE_DIR=str(root / 'xla_cache'),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )
  common = [
    f'--config.text.cache_dir={root / "embeddings"}',
    f'--config.data.render_cache_dir={root / "openmoji"}',
    '--config.train.num_steps=2',
  ]
  for config, workdir, extra in [
    ('configs/base64.py:tiny', 'base', []),
    (
      'configs/sr256.py:tiny',
      'sr',
      ['--config.data.lowres_resolution=16', '--config.data.resolution=32'],
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


def sample(runs, *args):
  return subprocess.run(
    [sys.executable, 'sample.py', *args],
    cwd=REPO_ROOT,
    env=runs['env'],
    capture_output=True,
    text=True,
    timeout=900,
  )


def pngs(folder):
  return sorted(p for p in pathlib.Path(folder).glob('*.png') if p.name != 'grid.png')


def test_base_stage_outputs_and_sidecars(runs):
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
  assert side['stages'][0]['steps'] == 3 and side['stages'][0]['step'] == 2
  assert side['stages'][0]['sampler'] == 'dpmpp_2m'


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
    outs[name] = np.asarray(Image.open(pngs(out)[0]))
  # Exact: same machine, same compiled programs, same seed; XLA:CPU is deterministic run to run.
  np.testing.assert_array_equal(outs['a'], outs['b'])
  assert not np.array_equal(outs['a'], outs['c'])


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
    '--steps=2',
    '--stop_at=1',
    f'--out={out1}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert np.asarray(Image.open(pngs(out1)[0])).shape == (16, 16, 3)


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
    (['--prompt=x', '--guidance=-1'], '--guidance must be >= 0'),
    ([], 'No prompt given'),
  ],
)
def test_bad_arguments(runs, args, message):
  proc = sample(runs, *args, f'--checkpoints={runs["base"]}', f'--out={runs["root"] / "bad"}')
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_missing_and_incomplete_checkpoints(runs, tmp_path):
  proc = sample(runs, '--prompt=x', f'--checkpoints={tmp_path / "nope"}', f'--out={tmp_path / "o"}')
  assert proc.returncode != 0 and 'does not exist' in proc.stderr
  incomplete = tmp_path / 'incomplete'
  (incomplete / 'checkpoints' / '5.orbax-checkpoint-tmp-1').mkdir(parents=True)
  proc = sample(runs, '--prompt=x', f'--checkpoints={incomplete}', f'--out={tmp_path / "o"}')
  assert proc.returncode != 0
  assert 'no finished checkpoint' in proc.stderr and '5.orbax-checkpoint-tmp-1' in proc.stderr


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
