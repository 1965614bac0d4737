"""Per-stage schedules, sampling grids and augmentation, from the stage configs themselves."""

import importlib.util
import pathlib
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base64, sr256, sr1024
from imagen_jax import cascade, stage
from imagen_jax.diffusion import gaussian, guidance

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _print_grids():
  spec = importlib.util.spec_from_file_location('print_grids', ROOT / 'tools' / 'print_grids.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


FULL_STAGES = [base64.get_config(), sr256.get_config(), sr1024.get_config()]


@pytest.mark.parametrize('config', FULL_STAGES, ids=lambda c: c.stage)
def test_every_stage_ends_its_default_sampling_at_high_snr(config):
  """The last network call of every stage's default sampling sits at logsnr > 9 (noise
  s = sigma / alpha < 0.011): before, sr1024's was at -0.33 (sigma 0.76) and sr256's at 2.44."""
  row = _print_grids().describe(config)
  assert row['schedule'] == 'cosine'
  assert row['last_call_logsnr'] > 9.0, row


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim', 'dpmpp_2m', 'heun'])
def test_every_sampler_ends_at_high_snr_on_its_default_grid(sampler):
  config = sr1024.get_config()
  config.sample.sampler = sampler
  row = _print_grids().describe(config)
  assert row['grid'] == ('karras' if sampler == 'heun' else 'quad')
  assert row['last_call_logsnr'] > 9.0, row


def test_sr_stages_train_on_the_unshifted_cosine():
  for config in (sr256.get_config(arg) for arg in ('', 'demo', 'tiny')):
    assert stage.schedule(config)(jnp.float32(0.5)) == pytest.approx(0.0, abs=0.05)
  # The median training example of sr1024 (t = 0.5) at logsnr ~0, not -5.6 as when shifted.
  assert float(stage.schedule(sr1024.get_config())(jnp.float32(0.5))) > -0.1


def test_aug_level_means_the_same_corruption_on_both_sr_stages():
  level = jnp.float32(0.2)
  alphas = [
    float(gaussian.alpha_sigma(stage.aug_schedule(c)(level))[0])
    for c in (sr256.get_config(), sr1024.get_config(), sr256.get_config('demo'))
  ]
  np.testing.assert_allclose(alphas, 0.8187, atol=1e-3)


def test_a_config_from_before_aug_schedule_keeps_augmenting_on_its_stage_schedule():
  """Runs saved before `diffusion.aug_schedule` existed trained their augmentation on the stage
  schedule: their checkpoints must sample with that same corruption."""
  old = sr256.get_config('tiny')
  old.diffusion.schedule = 'shifted_cosine'
  old.diffusion.shift_base = 8
  del old.diffusion['aug_schedule']
  level = jnp.float32(0.3)
  np.testing.assert_allclose(stage.aug_schedule(old)(level), stage.schedule(old)(level))
  new = sr256.get_config('tiny')
  np.testing.assert_allclose(stage.aug_schedule(new)(level), guidance.aug_schedule()(level))
  new.diffusion.aug_schedule = 'quadratic'
  with pytest.raises(ValueError, match="aug_schedule 'quadratic'; choose one of linear, stage"):
    stage.aug_schedule(new)


def test_sampling_options_grid_from_config_and_validated():
  config = sr256.get_config('tiny')
  options = cascade.SamplingOptions.from_config(config)
  assert options.grid == 'auto' and options.spacing == 'quad'
  assert cascade.SamplingOptions.from_config(config, sampler='heun').spacing == 'karras'
  assert cascade.SamplingOptions.from_config(config, grid='logsnr').spacing == 'logsnr'
  del config.sample['grid']  # a config saved before the field: the same 'auto'
  assert cascade.SamplingOptions.from_config(config).grid == 'auto'
  with pytest.raises(ValueError, match="grid must be 'auto' or one of"):
    cascade.SamplingOptions(grid='uniform')
  grid = np.asarray(cascade.SamplingOptions(steps=6, grid='time').logsnrs(config))
  # The network calls at the stage's own schedule; the grid ends at the clean image.
  np.testing.assert_allclose(grid[:-1], stage.schedule(config)(jnp.linspace(1.0, 0.0, 7))[:-1])
  assert grid[-1] == np.inf


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('guidance', float('nan'), 'guidance must be a finite number >= 0'),
    ('guidance', float('inf'), 'guidance must be a finite number >= 0'),
    ('dynamic_percentile', 99.5, r'dynamic_percentile is a quantile in \(0, 1\]'),
    ('dynamic_percentile', 0.0, r'dynamic_percentile is a quantile in \(0, 1\]'),
    ('dynamic_max', float('nan'), 'dynamic_max must be 0'),
    ('dynamic_max', 0.5, 'dynamic_max must be 0'),
  ],
)
def test_sampling_options_refuse_values_that_would_sample_silently_wrong(field, value, message):
  # 99.5 (the paper's "99.5th percentile") would clamp to the maximum; NaN would reach the
  # images and be blamed on the checkpoint by the NaN check.
  with pytest.raises(ValueError, match=message):
    cascade.SamplingOptions(**{field: value})
  options = cascade.SamplingOptions(dynamic_percentile=1.0, dynamic_max=float('inf'), guidance=0)
  # No clamp, as 0 says: the sidecar JSON records 0 (json.dumps wrote 'Infinity', not JSON).
  assert options.dynamic_max == 0.0


def test_print_grids_tool_prints_one_line_per_stage():
  out = subprocess.run(
    [sys.executable, 'tools/print_grids.py', 'configs/sr256.py:tiny', '--all'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
    env={'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'},
  ).stdout.splitlines()
  assert out[0].startswith('stage=sr256 resolution=32 schedule=cosine sampler=dpmpp_2m grid=quad')
  assert 'aug_level=0.2 aug_alpha=0.819' in out[0]
  assert len(out[1].split()) == 1 + 5  # 'logsnrs:' and the 4-step grid's 5 values


def test_print_grids_tool_parses_overrides_by_field_type_and_refuses_bad_ones_in_one_line():
  tool = _print_grids()
  # bool('false') is True: an override of a bool field used to turn it on whatever it said.
  assert tool.parse_value(True, 'false') is False and tool.parse_value(False, 'True') is True
  assert tool.parse_value(4, '7') == 7 and tool.parse_value(0.2, '0.5') == 0.5
  assert tool.parse_value((1, 2), '(3, 4)') == (3, 4) and tool.parse_value('quad', 'k') == 'k'
  with pytest.raises(ValueError, match='expected true or false'):
    tool.parse_value(True, 'maybe')
  for args, message in (
    (['configs/nope.py'], 'no such config file configs/nope.py'),
    (['configs/sr256.py:tiny', '--config.sample.nope=1'], "sample has no field 'nope'"),
  ):
    run = subprocess.run(
      [sys.executable, 'tools/print_grids.py', *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env={'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'},
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.count('\n') == 1 and message in run.stderr, run.stderr


def test_sr_sampler_refuses_a_lowres_of_another_size():
  # run_cascade / make_stage_sampler users (the notebook, the API) passing the wrong low-res size
  # used to get an image upsampled from it anyway; the check runs while tracing, before the model.
  config = sr256.get_config('tiny')
  want = config.data.lowres_resolution
  graphdef, params = stage.abstract_model(config)
  sample_fn = cascade.make_stage_sampler(config, graphdef, cascade.SamplingOptions(steps=1))
  embs = jax.ShapeDtypeStruct((1, 4, config.model.text_dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 4), jnp.bool_)
  key = jax.random.key(0)
  for size in (want // 2, want * 2):
    lowres = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    with pytest.raises(ValueError, match=rf'upsamples \[B, {want}, {want}, 3\] images; the lowres'):
      jax.eval_shape(sample_fn, params, embs, mask, key, lowres)
  lowres = jax.ShapeDtypeStruct((1, want, want, 3), jnp.float32)
  res = config.data.resolution
  assert jax.eval_shape(sample_fn, params, embs, mask, key, lowres).shape == (1, res, res, 3)


@pytest.mark.parametrize('low,high', [(0.3, 0.1), (0.0, -0.5), (0.0, 1.5), (float('nan'), 0.3)])
def test_training_refuses_an_aug_level_range_it_cannot_draw_from(low, high):
  # training_aug_levels(min 0.3, max 0.1) drew a constant 0.3; max -0.5 drew zeros, silently.
  from imagen_jax import train_lib

  config = sr256.get_config('tiny')
  config.diffusion.aug_level_min, config.diffusion.aug_level_max = low, high
  with pytest.raises(ValueError, match=r'use 0 <= aug_level_min <= aug_level_max <= 1'):
    train_lib.check_settings(config)
  config.diffusion.aug_level_min, config.diffusion.aug_level_max = 0.0, 0.3
  train_lib.check_settings(config)
  config.diffusion.cond_drop_prob = 1.5
  with pytest.raises(ValueError, match=r'diffusion.cond_drop_prob=1.5: use a probability'):
    train_lib.check_settings(config)


def test_sampling_outside_the_trained_aug_range_warns(caplog):
  from imagen_jax import sample_lib

  base, sr = base64.get_config('tiny'), sr256.get_config('tiny')
  sr.data.lowres_resolution = base.data.resolution
  high = sr.diffusion.aug_level_max

  def chain(level):
    caplog.clear()
    stages = [
      types.SimpleNamespace(
        config=c, workdir=name, options=cascade.SamplingOptions(aug_level=level)
      )
      for c, name in ((base, 'runs/base'), (sr, 'runs/sr'))
    ]
    sample_lib.check_chain(stages)
    return [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']

  assert chain(high) == []
  assert chain(min(1.0, high + 0.3)) == [
    f'runs/sr trained with low-res augmentation levels in [0, {high:g}]; sampling at aug_level '
    f'{min(1.0, high + 0.3):g} is outside what it has seen (pass --aug_level in that range).'
  ]


def test_flags_that_no_sampled_stage_reads_are_refused():
  """--dynamic_percentile / --dynamic_max where every stage's config samples with static (or no)
  thresholding, and --aug_level with no SR stage, were kept in the sidecars and read by
  nothing."""
  from imagen_jax import sample_lib

  base, sr = base64.get_config('tiny'), sr256.get_config('tiny')
  sr.data.lowres_resolution = base.data.resolution

  def chain(thresholdings, stop_at=None, **flags):
    configs = ((base, 'runs/base'), (sr, 'runs/sr'))[: len(thresholdings)]
    stages = [
      types.SimpleNamespace(config=c, workdir=name, options=cascade.SamplingOptions(thresholding=t))
      for (c, name), t in zip(configs, thresholdings, strict=True)
    ]
    checkpoints = [name for _, name in configs] + (['runs/sr'] if stop_at else [])
    req = sample_lib.SampleRequest(
      prompts=['x'], checkpoints=checkpoints, out='unused', stop_at=stop_at, **flags
    )
    sample_lib.check_chain(stages, req)

  with pytest.raises(
    sample_lib.SampleError,
    match=re.escape(
      '--dynamic_percentile and --dynamic_max set but no stage uses dynamic thresholding '
      "(runs/base samples with static, runs/sr samples with none: its config's "
      'sample.thresholding); pass --thresholding dynamic, or drop them.'
    ),
  ):
    chain(['static', 'none'], dynamic_percentile=0.9, dynamic_max=2.0)
  chain(['static', 'dynamic'], dynamic_percentile=0.9)  # read by the SR stage
  chain(['static', 'static'])
  with pytest.raises(
    sample_lib.SampleError,
    match=re.escape(
      '--aug_level 0.3 sets the noise-conditioning level of super-resolution stages, but none '
      'is sampled (runs/base); drop --aug_level'
    ),
  ):
    chain(['dynamic'], aug_level=0.3)
  chain(['dynamic', 'dynamic'], aug_level=0.3)
  # The whole cascade's command with --stop_at=1: the flags are for the stages it leaves out.
  chain(['static'], stop_at=1, aug_level=0.3, dynamic_percentile=0.9)


def test_guidance_on_a_run_trained_without_caption_dropout_is_refused():
  # cond_drop_prob=0 trains no unconditional (null-caption) prediction, which classifier-free
  # guidance extrapolates from: sample.py sampled it at guidance 5 without a word.
  from imagen_jax import sample_lib

  base, sr = base64.get_config('tiny'), sr256.get_config('tiny')
  sr.data.lowres_resolution = base.data.resolution
  sr.diffusion.cond_drop_prob = 0.0

  def chain(*guidances):
    stages = [
      types.SimpleNamespace(config=c, workdir=name, options=cascade.SamplingOptions(guidance=g))
      for (c, name), g in zip(((base, 'runs/base'), (sr, 'runs/sr')), guidances, strict=True)
    ]
    sample_lib.check_chain(stages)

  with pytest.raises(
    sample_lib.SampleError,
    match=r'^runs/sr was trained with diffusion.cond_drop_prob=0, .* guidance 5 .*--guidance 1,5',
  ):
    chain(5.0, 5.0)
  chain(5.0, 1.0)  # the SR stage unguided, the base guided
  assert cascade.guidance_without_unconditional('r', base, 5.0) is None


def test_a_stage_chain_that_does_not_fit_names_the_fix():
  # A skipped stage (base, sr1024) or a mismatched SR run named the sizes but not the fix.
  from imagen_jax import sample_lib

  base, sr = base64.get_config('tiny'), sr1024.get_config('tiny')
  stages = [
    types.SimpleNamespace(config=c, workdir=name, options=cascade.SamplingOptions())
    for c, name in ((base, 'runs/base'), (sr, 'runs/sr1024'))
  ]
  with pytest.raises(sample_lib.SampleError) as e:
    sample_lib.check_chain(stages)
  assert str(e.value) == (
    f'runs/sr1024 upsamples {sr.data.lowres_resolution} px images but the stage before it '
    f'(runs/base) makes {base.data.resolution} px: list the stages in order, each SR run after '
    'the stage whose output size is its low-res size (base, sr256, sr1024), with none left out.'
  )
