"""Command line of the evaluation (absl flags only; the logic is in runner.py).

  python evaluate.py --checkpoints runs/digits --num 500
  python -m imagen_jax.evaluate --checkpoints runs/digits@1000 --sampler ddpm --steps 64 \
      --guidance 3 --out eval.json
  python evaluate.py --checkpoints runs/digits --num 400 \
      --template 'an image of the number {word}' --template 'an image of the {word}'

Prints the table (generated images beside the calibration rows) and, last, ONE JSON line with
everything. Bad input: one line on stderr starting with 'error:', exit status 2.
"""

import json
import logging
import sys

from absl import flags

from imagen_jax import cli as common_cli

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoints', None, 'Run folder of the base stage (or RUN@STEP).')
flags.DEFINE_integer('num', 500, 'Generated images: a multiple of the 10 classes, >= 20.')
flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.DEFINE_integer(
  'batch_size',
  50,
  'Images per sampling batch (memory and speed; the images stay the same on the same device '
  'count: on a CPU an odd batch samples on one device, an even one on two).',
)
flags.DEFINE_string('sampler', None, 'ddpm | ddim | dpmpp_2m | heun (default: the run config).')
flags.DEFINE_integer('steps', None, 'Sampling steps (default: the run config).')
flags.DEFINE_float('guidance', None, 'Classifier-free guidance scale, 1 = none (default: config).')
flags.DEFINE_enum('thresholding', None, ['dynamic', 'static', 'none'], 'x0 thresholding.')
flags.DEFINE_float(
  'dynamic_percentile',
  None,
  'Dynamic thresholding quantile p in (0, 1] (0.995: the 99.5th percentile of |x0|).',
)
flags.DEFINE_float('dynamic_max', None, 'Upper clamp on the dynamic threshold (0: none).')
flags.DEFINE_bool('ema', True, 'Use the EMA parameters.')
flags.DEFINE_string('judge', None, 'An existing judge file (.npz); default: cached in --judge_dir.')
flags.DEFINE_string('judge_dir', 'cache/judge', 'Where judges are cached (trained on first use).')
flags.DEFINE_integer('k', 3, 'Neighbours of the precision/recall k-NN manifolds.')
flags.DEFINE_bool('calibration', True, 'Also score the calibration rows.')
flags.DEFINE_string('out', None, 'Also write the result to this JSON file.')
flags.DEFINE_string(
  'grid',
  None,
  'Also save a PNG of samples: a row per class, seen | held-out (with --template: a column '
  'group per template).',
)
flags.DEFINE_bool('overwrite', False, 'Replace existing --out / --grid files.')
flags.DEFINE_multi_string(
  'template',
  None,
  "Probe your own caption phrasing instead of the benchmark's templates (repeatable): "
  "{word} ('seven') and/or {numeral} ('7') name the class, e.g. 'an image of the {word}'. "
  'Each template gets --num / (number of templates) prompts; one no training caption uses '
  'counts as held out.',
)
common_cli.define_compilation_cache_flag()
flags.adopt_module_key_flags(common_cli)  # --helpshort lists --compilation_cache too


def _params_bytes() -> int | None:
  from imagen_jax import checkpoints, stage

  config = checkpoints.peek_config(FLAGS.checkpoints)
  return None if config is None else stage.params_bytes(config)


def main(argv) -> None:
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}; see --helpshort.', file=sys.stderr)
    sys.exit(2)
  if not FLAGS.checkpoints:
    print('error: --checkpoints RUN is required (the base stage run folder).', file=sys.stderr)
    sys.exit(2)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  common_cli.keep_freed_host_buffers()
  # Two CPU devices when they split a batch (every batch has --batch_size rows, the last one
  # padded) and two copies of the params fit, before JAX's backend starts (imagen_jax.cpu_devices).
  common_cli.split_cpu_devices(
    max(1, FLAGS.batch_size), None, distributed=False, copy_bytes=_params_bytes
  )
  common_cli.enable_compilation_cache()
  from imagen_jax import checkpoints
  from imagen_jax.evaluate import runner, scoring

  checkpoints.quiet_orbax_noise()

  req = runner.EvalRequest(
    checkpoints=FLAGS.checkpoints,
    num=FLAGS.num,
    seed=FLAGS.seed,
    batch_size=FLAGS.batch_size,
    sampler=FLAGS.sampler,
    steps=FLAGS.steps,
    guidance=FLAGS.guidance,
    thresholding=FLAGS.thresholding,
    dynamic_percentile=FLAGS.dynamic_percentile,
    dynamic_max=FLAGS.dynamic_max,
    use_ema=FLAGS.ema,
    judge=FLAGS.judge,
    judge_dir=FLAGS.judge_dir,
    k=FLAGS.k,
    calibration=FLAGS.calibration,
    out=FLAGS.out,
    grid=FLAGS.grid,
    overwrite=FLAGS.overwrite,
    templates=tuple(FLAGS.template or ()),
  )
  try:
    result = runner.run(req)
  except runner.EvalError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except Exception as e:
    from imagen_jax import device_memory

    xla_message = device_memory.out_of_memory(e)
    if xla_message is None:
      raise
    print(
      f'error: Out of memory ({xla_message}): lower --batch_size '
      f'(now {min(FLAGS.batch_size, FLAGS.num)}).',
      file=sys.stderr,
    )
    sys.exit(2)
  print(
    f'{result["checkpoint"]} step {result["step"]}: {result["num"]} samples, '
    f'{result["sampler"]} {result["steps"]} steps, guidance {result["guidance"]}, '
    f'{result["sampling_seconds"]:.1f} s sampling, {result["seconds"]:.1f} s total'
  )
  if result['templates']:
    print(
      f"Prompts from {len(result['templates'])} --template, not the benchmark's templates: "
      'compare adherence with runs probed by the same templates.'
    )
  print(scoring.format_table(result['rows']))
  print(f'per class (generated): {scoring.format_per_class(result["rows"]["generated"])}')
  print(f'per template (generated): {scoring.format_per_template(result["rows"]["generated"])}')
  generated, real = result['rows']['generated'], result['rows'].get('real_test')
  if 'fd_matched' in generated and real:
    print(
      f"At the real_test row's n and class mix ({generated['n_matched']} generated images): "
      f'FD {generated["fd_matched"]:.2f}, {generated["fd_matched"] / real["fd"]:.1f}x the '
      f'real-vs-real floor {real["fd"]:.2f}; precision {generated["precision_matched"]:.3f}, '
      f'recall {generated["recall_matched"]:.3f} (real_test: {real["precision"]:.3f}, '
      f'{real["recall"]:.3f}).'
    )
  print(
    f'judge: real test accuracy {result["judge_test_accuracy"]:.4f} ({result["judge"]}). '
    f'FD, precision/recall (k={result["k"]}) in judge feature space against the '
    f'{result["reference"]}; nn_train: RMS pixel distance ([-1, 1] scale) to the nearest '
    'train image; border: mean grey level (0..1) of the R/8-pixel frame. FD shrinks as n '
    'grows: compare rows of similar n.'
  )
  print(json.dumps(result, sort_keys=True))


def run() -> None:
  from imagen_jax import cli

  cli.run(main)
