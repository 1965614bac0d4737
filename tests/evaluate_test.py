"""The digits evaluation: metrics on constructed inputs, prompts, judge and calibration rows,
bad input, and one tiny end-to-end run of evaluate.py on a freshly trained tiny checkpoint.

The judge trains once per module (~20-30 s on 2 busy cores) into a temporary cache; the
end-to-end runs share one persistent XLA compilation cache, so each program compiles once.
"""

import json
import logging
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import base64, sr256
from imagen_jax.data import digits
from imagen_jax.evaluate import judge as judge_lib
from imagen_jax.evaluate import metrics, runner, scoring
from tests.conftest import (
  REPO_ROOT,
  cli_env,
  one_move_entropy_bits,
  with_address_space_limit,
  with_cpu_devices,
)

CHANCE = 1 / digits.NUM_CLASSES


# ---- metrics on constructed inputs ----


@pytest.mark.unit
def test_frechet_distance_of_identical_and_shifted_sets():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
  trace = np.trace(np.cov(a, rowvar=False))
  # Identical sets: FD = Tr(2S - 2 (S S)^(1/2)) = 0 exactly; in float64 the eigen-square-roots
  # leave ~1e-13 relative to Tr(S) (measured 1e-14); 1e-9 * Tr(S) is far above that, far below
  # any real difference.
  assert metrics.frechet_distance(a, a) <= 1e-9 * trace
  # A pure translation d keeps the covariance: FD = |d|^2 (same rounding argument).
  shift = rng.normal(size=16)
  np.testing.assert_allclose(
    metrics.frechet_distance(a, a + shift), np.sum(shift**2), rtol=1e-9, atol=1e-9 * trace
  )
  # Isotropic Gaussians N(0, s1^2 I), N(0, s2^2 I): FD = F (s1 - s2)^2, here with sampling
  # error: 20k samples in 4 dims estimate each variance to ~1% (sqrt(2/20000)).
  x = rng.normal(size=(20000, 4))
  y = 3.0 * rng.normal(size=(20000, 4))
  np.testing.assert_allclose(metrics.frechet_distance(x, y), 4 * (3.0 - 1.0) ** 2, rtol=0.05)
  with pytest.raises(ValueError):
    metrics.frechet_distance(a[:1], a)


@pytest.mark.unit
def test_precision_recall_and_nearest_distance():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(200, 8))
  assert metrics.precision_recall(real=real, fake=real, k=3) == (1.0, 1.0)
  far = real + 100.0
  assert metrics.precision_recall(real=real, fake=far, k=3) == (0.0, 0.0)
  # Fakes collapsed onto one real point: all inside the real manifold (precision 1), but their
  # k-NN balls have radius 0, so they cover only that one real point (recall 1/200).
  collapsed = np.repeat(real[:1], 50, axis=0)
  assert metrics.precision_recall(real=real, fake=collapsed, k=3) == (1.0, 1 / 200)
  # |x|^2 + |y|^2 - 2 x.y cancels to ~eps * |x|^2 ~ 1e-15 before the sqrt (measured 4e-8 after
  # it); 1e-6 is well above that and far below any real distance here (~1).
  np.testing.assert_allclose(metrics.nearest_distance(samples=real, reference=real), 0.0, atol=1e-6)
  d = metrics.nearest_distance(samples=real[:3] + 0.5, reference=real)
  assert np.all(d <= 0.5 + 1e-12)  # RMS per value: the shifted copy is at most 0.5 away


@pytest.mark.unit
def test_entropy_and_adherence():
  assert metrics.class_entropy_bits(predicted=np.arange(100) % 10, num_classes=10) == (
    pytest.approx(np.log2(10))
  )
  assert metrics.class_entropy_bits(predicted=np.full(50, 7), num_classes=10) == 0.0
  assert metrics.adherence(predicted=np.array([1, 2, 3]), prompted=np.array([1, 2, 4])) == (
    pytest.approx(2 / 3)
  )
  per_class = metrics.per_class_adherence(
    predicted=np.array([0, 0, 1, 2]), prompted=np.array([0, 1, 1, 2]), num_classes=3
  )
  assert per_class == [1.0, 0.5, 1.0]


# ---- prompts and bad input (no model needed) ----


@pytest.mark.unit
def test_prompt_set_is_class_balanced_half_heldout():
  prompts = scoring.prompt_set(40)
  assert np.bincount(prompts.labels).tolist() == [4] * 10
  assert prompts.heldout.sum() == 20
  heldout = {digits.caption(c, t) for c in range(10) for t in digits.HELDOUT_TEMPLATES}
  seen = {digits.caption(c, t) for c in range(10) for t in digits.SEEN_TEMPLATES}
  for prompt, label, held in zip(prompts.prompts, prompts.labels, prompts.heldout, strict=True):
    assert prompt in (heldout if held else seen)
    assert digits.CLASS_NAMES[label] in prompt or str(label) in prompt
  big = scoring.prompt_set(500)
  assert set(big.prompts) == heldout | seen  # every template of every class is used
  for num in (0, 5, 10, 25):
    with pytest.raises(scoring.EvalError, match='multiple of the 10 classes'):
      scoring.prompt_set(num)


@pytest.mark.unit
def test_prompt_set_of_given_templates_and_its_refusals():
  # --template: round r of 10 prompts uses templates[r % 3]; a template the training captions
  # use counts as seen, any other as held out.
  templates = ('an image of the {word}', 'digit {numeral}', 'the number {word}')
  prompts = scoring.prompt_set(60, templates)
  assert prompts.templates == tuple(t for t in templates * 2 for _ in range(10))
  assert prompts.labels.tolist() == list(range(10)) * 6
  assert prompts.heldout.tolist() == [t != 'digit {numeral}' for t in prompts.templates]
  assert prompts.prompts[:2] == ('an image of the zero', 'an image of the one')
  assert prompts.prompts[13] == 'digit 3' and prompts.prompts[29] == 'the number nine'
  refused = {
    'is given twice': (('{word}', 'x {numeral}', '{word}'), 60),
    "must name the class with {word} ('seven')": (('a photo of a cat',), 20),
    'use no other field': (('a {colour} {word}',), 20),
    'write a literal brace': (('a {word',), 20),
    'must be a multiple of 30 with 3 --template': (templates, 40),
    'multiple of the 10 classes': (templates, 25),
  }
  for expected, (given, num) in refused.items():
    with pytest.raises(scoring.EvalError, match=re.escape(expected)):
      scoring.prompt_set(num, given)
  # The table shows '-' where a row has no prompt of a kind; the template line marks held out.
  row = {
    **dict.fromkeys(scoring.SCALARS, 0.5),
    'n': 20,
    'adherence_seen': None,
    'per_template': {'digit {numeral}': 1.0, 'the {word}': 0.25},
  }
  (_, line) = scoring.format_table({'generated': row}).splitlines()
  assert line.split()[:5] == ['generated', '20', '0.500', '-', '0.500']
  assert scoring.format_per_template(row) == "'digit {numeral}' 1.00  'the {word}' (held out) 0.25"


@pytest.mark.unit
def test_a_seed_a_jax_key_cannot_hold_is_refused(tmp_path):
  for seed in (-1, 2**32):
    req = runner.EvalRequest(checkpoints=str(tmp_path), seed=seed)
    with pytest.raises(scoring.EvalError, match=r'--seed must be in \[0, 4294967296\)'):
      runner.validate(req)
  # --out and --grid on one file: the evaluation would run, then fail to write or replace one.
  same = runner.EvalRequest(checkpoints=str(tmp_path), out='a/../x.out', grid='x.out')
  with pytest.raises(scoring.EvalError, match='--out and --grid name the same file'):
    runner.validate(same)
  # sample.py's --grid is the sampling grid: `--grid karras` here wrote a PNG named 'karras'.
  with pytest.raises(scoring.EvalError, match=r"--grid karras is not a .png path: evaluate.py's"):
    runner.validate(runner.EvalRequest(checkpoints=str(tmp_path), grid='karras'))
  runner.validate(runner.EvalRequest(checkpoints=str(tmp_path), grid=str(tmp_path / 'g.PNG')))


@pytest.mark.unit
def test_only_labelled_base_stages_are_evaluated():
  runner.check_labelled_base(_digits_config(), 'run')
  with pytest.raises(scoring.EvalError, match='super-resolution stage.*base run'):
    runner.check_labelled_base(sr256.get_config('tiny'), 'run')
  on_test = _digits_config()
  on_test.data.split = 'test'
  with pytest.raises(scoring.EvalError, match="trained on the digits 'test' split"):
    runner.check_labelled_base(on_test, 'run')
  with pytest.raises(scoring.EvalError, match="'openmoji', which has no class labels"):
    runner.check_labelled_base(base64.get_config('tiny'), 'run')


def _digits_config():
  config = base64.get_config('tiny')
  config.data.source = 'digits'
  return config


@pytest.mark.unit
def test_dynamic_flags_the_runs_own_thresholding_ignores_are_refused(tmp_path, monkeypatch):
  """--dynamic_max on a run whose config samples with static thresholding (the digits recipe)
  was accepted and read by nothing; now refused before the judge or the params load."""
  config = _digits_config()
  config.sample.thresholding = 'static'
  monkeypatch.setattr(runner, '_saved_config', lambda spec: (config, 2))
  monkeypatch.setattr(runner, '_load_judge', lambda *a: pytest.fail('loaded the judge'))
  req = runner.EvalRequest(checkpoints=str(tmp_path), num=20, dynamic_max=2.0)
  with pytest.raises(
    scoring.EvalError,
    match=re.escape(
      f'--dynamic_max set but no stage uses dynamic thresholding ({tmp_path} samples with '
      "static: its config's sample.thresholding); pass --thresholding dynamic, or drop them."
    ),
  ):
    runner.run(req)


@pytest.mark.unit
def test_guidance_on_a_run_trained_without_caption_dropout_is_refused(tmp_path, monkeypatch):
  config = _digits_config()
  config.diffusion.cond_drop_prob = 0.0
  monkeypatch.setattr(runner, '_saved_config', lambda spec: (config, 2))
  monkeypatch.setattr(runner, '_load_judge', lambda *a: pytest.fail('loaded the judge'))
  req = runner.EvalRequest(checkpoints=str(tmp_path), num=20, guidance=3.0)
  with pytest.raises(scoring.EvalError, match=r'cond_drop_prob=0, .* with --guidance 1 \(no'):
    runner.run(req)


@pytest.mark.unit
def test_make_train_eval_fn_off_and_refusals(tmp_path):
  config = _digits_config()
  assert runner.make_train_eval_fn(config, None, tmp_path) is None  # eval_every = 0
  config.train.eval_every = 10
  config.data.source = 'openmoji'
  with pytest.raises(scoring.EvalError, match='no class labels'):
    runner.make_train_eval_fn(config, None, tmp_path)
  # train.py refuses both before the run starts (they failed after the text cache was built).
  from imagen_jax import train_lib

  with pytest.raises(scoring.EvalError, match='no class labels'):
    train_lib.check_settings(config)
  config.data.source = 'digits'
  config.train.eval_num = 15
  with pytest.raises(scoring.EvalError, match='eval_num'):
    runner.make_train_eval_fn(config, None, tmp_path)
  with pytest.raises(scoring.EvalError, match='config.train.eval_num: eval_num must be'):
    train_lib.check_settings(config)
  config.train.eval_num = 20
  train_lib.check_settings(config)


@pytest.mark.unit
def test_prompt_embeddings_match_the_training_cache(tmp_path):
  """Evaluation prompts must reach the U-Net exactly as training captions did."""
  from imagen_jax import precompute
  from imagen_jax.data import pipeline, sources

  config = _digits_config()
  config.data.max_examples = 20
  config.text.max_length = 32
  config.text.cache_dir = str(tmp_path)
  cache = precompute.precompute(config)
  captions = sorted(set(sources.build_source(config.data).captions()))
  cached_embs, cached_mask = pipeline.lookup_text(cache, captions)
  text_embs, text_mask = runner.encode_prompts(config, captions)
  np.testing.assert_array_equal(text_mask, cached_mask)
  # Same encoder, dtype, mesh (8 fake devices here), batch shape and rounding: bit-identical.
  np.testing.assert_array_equal(text_embs, cached_embs)


# ---- the judge and the calibration rows ----


@pytest.fixture(scope='module')
def judge(tmp_path_factory):
  cache = tmp_path_factory.mktemp('judge')
  return judge_lib.load_or_train(resolution=16, cache_dir=cache)


@pytest.mark.unit
def test_judge_is_cached_deterministic_and_checked(judge, tmp_path):
  # A digit classifier on this split must beat 95% (a linear model on the raw 8x8 scans does).
  assert judge.test_accuracy > 0.95
  assert judge.path and pathlib.Path(judge.path).is_file()
  again = judge_lib.load_or_train(resolution=16, cache_dir=pathlib.Path(judge.path).parent)
  assert again.path == judge.path and again.meta == judge.meta  # loaded, not retrained
  bad = tmp_path / 'judge.npz'
  bad.write_bytes(b'not a judge')
  with pytest.raises(judge_lib.JudgeError, match='unreadable'):
    judge_lib.load_judge(bad)
  with pytest.raises(judge_lib.JudgeError, match='does not exist'):
    judge_lib.load_judge(tmp_path / 'missing.npz')
  # Files a user may pass as --judge by mistake: one JudgeError each, no traceback.
  npy = tmp_path / 'array.npy'
  np.save(npy, np.zeros(3))
  meta_list = tmp_path / 'meta_list.npz'
  np.savez(meta_list, meta=np.asarray('[1, 2]'))
  no_resolution = tmp_path / 'no_resolution.npz'
  with np.load(judge.path) as data:
    fields = {k: data[k] for k in data.files}
  meta = json.loads(str(fields['meta']))
  del meta['resolution']
  np.savez(no_resolution, **{**fields, 'meta': np.asarray(json.dumps(meta))})
  truncated, empty = tmp_path / 'truncated.npz', tmp_path / 'empty.npz'
  whole = pathlib.Path(judge.path).read_bytes()
  truncated.write_bytes(whole[: len(whole) // 2])  # BadZipFile
  empty.write_bytes(b'')  # EOFError
  for path in (npy, meta_list, no_resolution, truncated, empty):
    with pytest.raises(judge_lib.JudgeError, match='is unreadable .*omit --judge'):
      judge_lib.load_judge(path)
  other_shapes = tmp_path / 'other_shapes.npz'
  first = next(k for k in fields if k != 'meta')
  np.savez(other_shapes, **{**fields, first: np.zeros((2, 2), np.float32)})
  with pytest.raises(judge_lib.JudgeError, match='holds layers of other shapes'):
    judge_lib.load_judge(other_shapes)


@pytest.mark.unit
def test_a_named_judge_of_other_settings_is_used_with_a_warning(judge, tmp_path, caplog):
  # --judge FILE of another data version / seed / settings was used silently: its scores are not
  # comparable with the cached judge's.
  from imagen_jax.evaluate import runner

  with np.load(judge.path) as data:
    fields = {k: data[k] for k in data.files}
  meta = {**json.loads(str(fields['meta'])), 'fingerprint': '0000stale0000000'}
  stale = tmp_path / 'stale.npz'
  np.savez(stale, **{**fields, 'meta': np.asarray(json.dumps(meta))})
  for path, warned in ((judge.path, False), (stale, True)):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      runner._load_judge(runner.EvalRequest(checkpoints='run', judge=str(path)), 16)
    assert ('was trained on other data or settings' in caplog.text) is warned, caplog.text


@pytest.mark.unit
def test_per_template_adherence_shows_the_misread_phrasing(judge):
  # prompt_set records each prompt's template, in the caption it fills.
  prompts = scoring.prompt_set(40)
  assert len(prompts.templates) == 40
  triples = zip(prompts.prompts, prompts.labels, prompts.templates, strict=True)
  for prompt, label, template in triples:
    assert prompt == digits.caption(label, template)
  # Real test images under two templates; under the second the "prompts" name a wrong class
  # (the label plus one), as a model that misreads that phrasing would draw.
  images, labels = digits.load_split('test', 16)
  images = digits.to_float(images)
  first, second = digits.SEEN_TEMPLATES[0], digits.HELDOUT_TEMPLATES[0]
  templates = tuple(second if i % 3 == 0 else first for i in range(len(labels)))
  of_second = np.array([t == second for t in templates])
  prompted = np.where(of_second, (labels + 1) % 10, labels)
  reference = scoring.Reference.build(judge)
  row = scoring.score(
    images, prompted=prompted, heldout=of_second, reference=reference, templates=templates
  )
  predicted, _ = judge.predict(images)
  assert list(row['per_template']) == [second, first]  # in the order first seen
  assert row['per_template'][first] == np.mean(predicted[~of_second] == labels[~of_second])
  assert row['per_template'][first] > 0.95 and row['per_template'][second] < 0.05
  assert row['per_template'][second] == row['adherence_heldout']
  line = scoring.format_per_template(row)
  assert line.startswith(f"'{second}' (held out) {row['per_template'][second]:.2f}  '{first}' ")
  # Calibration rows have no templates, and a count that does not match is refused.
  assert 'per_template' not in scoring.score(
    images, prompted=labels, heldout=of_second, reference=reference
  )
  # No seen prompt (a --template probe of new phrasings): null in the JSON, not NaN.
  all_held = scoring.score(
    images, prompted=labels, heldout=np.ones(len(labels), bool), reference=reference
  )
  assert all_held['adherence_seen'] is None
  assert all_held['adherence_heldout'] == all_held['adherence']
  with pytest.raises(ValueError, match='2 templates for 359 prompts'):
    scoring.score(
      images, prompted=labels, heldout=of_second, reference=reference, templates=(first, second)
    )


@pytest.mark.unit
def test_calibration_rows_score_as_expected(judge):
  reference = scoring.Reference.build(judge)
  rows = {
    name: scoring.score(images, prompted=labels, heldout=held, reference=reference)
    for name, (images, labels, held) in scoring.calibration_sets(16, num=500).items()
  }
  real, shuffled, means, noise = (rows[n] for n in scoring.CALIBRATION_ROWS)
  # num=500 > the test split: the real row is the whole test split, so its adherence IS the
  # judge's test accuracy.
  assert real['n'] == 359
  assert real['adherence'] == pytest.approx(judge.test_accuracy)
  assert real['entropy_bits'] > 3.2  # log2(10) = 3.32 for balanced classes
  # Prompt-independent images: expected adherence is exactly 1/10 with balanced prompts; 359
  # or 500 draws give a binomial standard error of 0.016, so 0.07 is > 4 sigma.
  assert abs(shuffled['adherence'] - CHANCE) < 0.07
  assert abs(noise['adherence'] - CHANCE) < 0.07
  # Shuffling labels leaves the images, so the image metrics are those of the real row.
  for key in ('fd', 'precision', 'recall', 'nn_train', 'entropy_bits'):
    assert shuffled[key] == real[key]
  assert real['fd'] < means['fd'] < noise['fd']
  assert real['precision'] > 0.7 and real['recall'] > 0.7
  assert means['recall'] < 0.05  # 10 distinct images: no diversity
  # At small num, num/10 <= k copies per class gave each copy a k-NN ball spanning the classes
  # (recall 0.96); the row keeps k + 1 copies per class.
  small = scoring.calibration_sets(16, num=20, k=3)['class_means']
  assert len(small[0]) == 40 and np.bincount(small[1]).tolist() == [4] * 10
  row = scoring.score(small[0], prompted=small[1], heldout=small[2], reference=reference, k=3)
  assert row['recall'] < 0.05 and row['adherence'] == 1.0
  assert noise['precision'] == 0.0 and noise['nn_train'] > 3 * real['nn_train']
  assert real['border'] == 0.0 and means['border'] == 0.0
  # Uniform in [0, 1]: mean 1/2, standard error 0.29 / sqrt(500 * 112 * 3) ~ 0.001 << 0.02.
  assert noise['border'] == pytest.approx(0.5, abs=0.02)


# ---- end to end through the real CLI ----


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, judge):
  root = tmp_path_factory.mktemp('evaluate')
  env = cli_env(devices=1)
  shared = {'root': root, 'env': env, 'judge_dir': str(pathlib.Path(judge.path).parent)}

  def train(name, *overrides):
    workdir = root / name
    proc = subprocess.run(
      [
        sys.executable,
        'train.py',
        '--config=configs/base64.py:tiny',
        f'--workdir={workdir}',
        f'--config.text.cache_dir={root / "embeddings"}',
        f'--config.data.render_cache_dir={root / "openmoji"}',
        '--config.train.num_steps=2',
        *overrides,
      ],
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir

  shared['train'] = train
  shared['digits'] = train('digits', '--config.data.source=digits')
  return shared


def evaluate(shared, *args, module=False, env=None):
  entry = ['-m', 'imagen_jax.evaluate'] if module else ['evaluate.py']
  return subprocess.run(
    [sys.executable, *entry, f'--judge_dir={shared["judge_dir"]}', *args],
    cwd=REPO_ROOT,
    env=env or shared['env'],
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.mark.smoke
def test_evaluate_cli_end_to_end(tiny_run, judge):
  out = tiny_run['root'] / 'eval.json'
  grid = tiny_run['root'] / 'grid.png'
  proc = evaluate(
    tiny_run,
    f'--checkpoints={tiny_run["digits"]}',
    '--num=20',  # the default --batch_size 50 is clamped to 20: no padding rows sampled
    f'--out={out}',
    f'--grid={grid}',
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert any(line.startswith('generated ') for line in lines)
  assert result == json.loads(out.read_text())
  assert result['step'] == 2 and result['num'] == 20 and result['resolution'] == 16
  assert result['batch_size'] == 20 and 'Sampled 20 images in ' in proc.stderr
  # Which devices sampled (the images depend on their count, on a CPU on the batch's parity).
  assert result['sampled_on'] == {'backend': 'cpu', 'devices': result['sampled_on']['devices']}
  assert result['sampled_on']['devices'] in (1, 2)
  assert re.search(r'Sampled 20 images in [0-9.]+ s, batches of 20,', proc.stderr)
  assert result['judge_fingerprint'] == judge_lib.fingerprint(16, 0)
  assert result['judge_test_accuracy'] == pytest.approx(judge.test_accuracy)
  assert set(result['rows']) == set(scoring.ROWS)
  for name, row in result['rows'].items():
    for key in ('adherence', 'adherence_seen', 'adherence_heldout', 'precision', 'recall'):
      assert 0.0 <= row[key] <= 1.0, (name, key)
    assert 0.0 <= row['entropy_bits'] <= np.log2(10) + 1e-9
    assert row['fd'] >= 0.0 and row['nn_train'] >= 0.0 and 0.0 <= row['border'] <= 1.0
    assert len(row['per_class']) == 10
  assert result['rows']['generated']['n'] == 20
  # 10 rows (classes) x 8 columns (4 seen, 4 held-out) of 16 px tiles with 2 px padding.
  assert Image.open(grid).size == (8 * 18 + 2, 10 * 18 + 2)
  assert result['grid_png'] == str(grid) and result['grid'] == 'auto'  # the sampler's spacing
  assert 'fd_matched' not in result['rows']['generated']  # 20 test images: already equal n
  # --out exists now: refused, file untouched.
  before = out.read_bytes()
  proc = evaluate(tiny_run, f'--checkpoints={tiny_run["digits"]}', '--num=20', f'--out={out}')
  assert proc.returncode == 2 and 'pass --overwrite' in proc.stderr
  assert out.read_bytes() == before


@pytest.mark.smoke
def test_evaluate_cli_probes_given_templates(tiny_run, tmp_path):
  out, grid = tmp_path / 'probe.json', tmp_path / 'probe.png'
  templates = ['the {word}', 'digit {numeral}', 'a {numeral}']  # 'digit {numeral}' is seen
  args = [f'--checkpoints={tiny_run["digits"]}', f'--out={out}', '--calibration=false']
  proc = evaluate(
    tiny_run, *args, '--num=30', f'--grid={grid}', *(f'--template={t}' for t in templates)
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result == json.loads(out.read_text()) and result['templates'] == templates
  generated = result['rows']['generated']
  assert sorted(generated['per_template']) == sorted(templates)  # 10 prompts each, one a class
  per = generated['per_template']
  assert generated['adherence_heldout'] == pytest.approx(
    (per['the {word}'] + per['a {numeral}']) / 2
  )
  assert generated['adherence_seen'] == per['digit {numeral}']
  assert 'Prompts from 3 --template, not the benchmark' in proc.stdout
  # The grid: a row per class, a group of 4 columns per template (not seen | held-out).
  assert Image.open(grid).size == (12 * 18 + 2, 10 * 18 + 2)
  assert "'the {word}' (held out) " in proc.stdout
  # A prompt longer than the run's text.max_length (16 byte tokens here) would lose its end,
  # maybe the class word: refused with one line, nothing written.
  out.unlink()
  proc = evaluate(tiny_run, *args, '--num=20', '--template=an image of the number {word}')
  assert proc.returncode == 2, proc.stderr[-2000:]
  (error,) = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert "'an image of the number three' is 29 tokens" in error, error  # the longest prompt
  assert 'text.max_length=16' in error and 'shorten its --template' in error
  assert not out.exists()


def test_evaluate_on_two_cpu_devices_matches_one(tiny_run, tmp_path):
  # IMAGEN_JAX_CPU_DEVICES=2: each batch of 10 is split over the two devices (the noise is drawn
  # by index, so the images are one device's up to float rounding) and scores the same.
  args = [f'--checkpoints={tiny_run["digits"]}', '--num=20', '--batch_size=10']
  one = evaluate(tiny_run, *args, f'--out={tmp_path / "one.json"}')
  assert one.returncode == 0, one.stderr[-3000:]
  made = r'of 10, compile included \(the sampler (compiled|loaded from the persistent [a-z ]+)\)\.'
  assert re.search(made, one.stderr), one.stderr[-3000:]  # compile_events: either, by cache
  two = evaluate(
    tiny_run, *args, f'--out={tmp_path / "two.json"}', env=with_cpu_devices(tiny_run['env'], 2)
  )
  assert two.returncode == 0, two.stderr[-3000:]
  assert 'CPU devices: 2' in two.stderr and 'batches of 10 over 2 devices, compile' in two.stderr
  rows = [
    json.loads((tmp_path / f'{n}.json').read_text())['rows']['generated'] for n in 'one two'.split()
  ]
  for key in ('adherence', 'adherence_seen', 'adherence_heldout', 'precision', 'recall'):
    assert rows[1][key] == pytest.approx(rows[0][key], abs=0.051), key  # one image of 20 at most
  # The class entropy moves, at most, as much as one image changing class can move it.
  assert rows[1]['entropy_bits'] == pytest.approx(
    rows[0]['entropy_bits'], abs=one_move_entropy_bits(20) + 1e-9
  )
  for key in ('fd', 'nn_train'):
    assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-2), key


def test_generated_images_do_not_depend_on_the_batch_size(tiny_run):
  # Image i draws its noise from fold_in(fold_in(key(seed), i), 0): in one batch of 20 or in
  # batches of 8 (the last padded with 4 rows of their own keys), the same images up to the float
  # rounding of the network at another batch size. Before, batch b's noise came from b.
  from imagen_jax import sample_lib

  st = sample_lib.restore_stage(str(tiny_run['digits']), {}, True)
  text_embs, text_mask = runner.encode_prompts(st.config, list(scoring.prompt_set(20).prompts))
  images = {
    b: runner.generate(st.sample_fn, st.params, text_embs, text_mask, seed=0, batch_size=b)
    for b in (20, 8)
  }
  assert images[8].shape == images[20].shape == (20, 16, 16, 3)
  np.testing.assert_allclose(images[8], images[20], rtol=0, atol=1e-3)
  other_seed = runner.generate(st.sample_fn, st.params, text_embs, text_mask, seed=1, batch_size=8)
  assert np.abs(other_seed - images[8]).max() > 0.1


@pytest.mark.smoke
def test_evaluate_cli_bad_input_one_line_each(tiny_run, tmp_path):
  run_dir = tiny_run['digits']
  cases = {
    'does not exist': [f'--checkpoints={tmp_path / "nope"}'],
    'multiple of the 10 classes': [f'--checkpoints={run_dir}', '--num=25'],
    '--judge': [f'--checkpoints={run_dir}', '--num=20', f'--judge={tmp_path / "j.npz"}'],
    # was 'cannot write to the folder', of a folder that is not there
    f'the folder {tmp_path / "no"} does not exist; create it first': [
      f'--checkpoints={run_dir}',
      '--num=20',
      f'--out={tmp_path / "no" / "e.json"}',
    ],
    '--thresholding static does not use it': [  # one flag: 'it' (was 'them')
      f'--checkpoints={run_dir}',
      '--thresholding=static',
      '--dynamic_max=2',
    ],
  }
  for expected, args in cases.items():
    proc = evaluate(tiny_run, *args, module=expected == '--judge')
    assert proc.returncode == 2, (expected, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
  # Out of memory (XLA's RESOURCE_EXHAUSTED, injected by a 4 GiB address-space limit, under
  # which the sampler's temporaries for a batch of 32760 do not fit): one line too. The batch
  # is clamped to --num (a larger one sampled padding rows: 200M of them was a numpy traceback).
  cmd = [sys.executable, 'evaluate.py', f'--judge_dir={tiny_run["judge_dir"]}']
  cmd += [f'--checkpoints={run_dir}', '--num=32760', '--batch_size=200000000']
  proc = subprocess.run(
    with_address_space_limit([*cmd, f'--out={tmp_path / "eval.json"}'], 4),
    cwd=REPO_ROOT,
    env=tiny_run['env'],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  (error,) = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert error.startswith('error: Out of memory (RESOURCE_EXHAUSTED: Out of memory allocating ')
  assert error.endswith('): lower --batch_size (now 32760).'), error
  assert not list(tmp_path.iterdir())  # nothing written
  # A run on a dataset without labels (the default OpenMoji data): refused from its config.
  openmoji_run = tiny_run['train']('openmoji')
  proc = evaluate(tiny_run, f'--checkpoints={openmoji_run}', '--num=20')
  assert proc.returncode == 2 and 'no class labels' in proc.stderr.splitlines()[-1]


@pytest.mark.smoke
def test_train_eval_fn_compiles_once_and_is_deterministic(tiny_run, monkeypatch):
  from imagen_jax import cascade, sample_lib

  st = sample_lib.restore_stage(str(tiny_run['digits']), {}, True)
  config = st.config.copy_and_resolve_references()
  config.train.eval_every = 1
  config.train.eval_num = 20
  config.train.eval_judge_dir = tiny_run['judge_dir']
  traces = []
  make_sampler = cascade.make_stage_sampler

  def counting_sampler(*args, **kwargs):
    fn = make_sampler(*args, **kwargs)

    def counted(*a):
      traces.append(1)  # runs only while jax.jit traces
      return fn(*a)

    return jax.jit(counted)

  monkeypatch.setattr(cascade, 'make_stage_sampler', counting_sampler)
  eval_fn = runner.make_train_eval_fn(config, st.graphdef, tiny_run['root'])
  first = eval_fn(st.params, 1)
  second = eval_fn(st.params, 2)
  assert first == second  # fixed prompts and noise
  assert len(traces) == 1
  assert set(first) == set(scoring.SCALARS) | {'num_nonfinite'}
  assert all(isinstance(v, float) for v in first.values())
  assert 0.0 <= first['adherence'] <= 1.0 and first['fd'] >= 0.0


@pytest.mark.unit
def test_fd_at_the_floor_rows_n_and_class_mix(judge):
  # --num 500 against the 359 test images: FD shrinks as n grows, so the generated row's FD is
  # also given at the real row's n and class mix (here with train images standing in).
  reference = scoring.Reference.build(judge)
  train, train_labels = digits.load_split('train', 16)
  keep = np.concatenate([np.flatnonzero(train_labels == c)[:50] for c in range(10)])
  images, prompted = digits.to_float(train[keep]), train_labels[keep]
  real = scoring.calibration_sets(16, num=500)['real_test']
  got = scoring.fd_at_matched_n(images, prompted, real[1], reference=reference)
  assert got['n_matched'] == len(real[0]) == 359
  subset = np.concatenate(
    [np.flatnonzero(prompted == c)[: int(np.sum(real[1] == c))] for c in range(10)]
  )
  _, features = judge.predict(images[np.sort(subset)])
  want = metrics.frechet_distance(features, reference.features)
  assert got['fd_matched'] == pytest.approx(want, rel=1e-6)
  precision, recall = metrics.precision_recall(real=reference.features, fake=features, k=3)
  assert (got['precision_matched'], got['recall_matched']) == (precision, recall)
  full_recall = metrics.precision_recall(
    real=reference.features, fake=judge.predict(images)[1], k=3
  )[1]
  assert got['recall_matched'] < full_recall  # fewer images cover less of the reference
  full = metrics.frechet_distance(judge.predict(images)[1], reference.features)
  assert got['fd_matched'] > full  # fewer images, larger FD
  assert scoring.fd_at_matched_n(images[:100], prompted[:100], real[1], reference=reference) == {}
