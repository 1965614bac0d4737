r"""Text to image through the trained cascade.

  python sample.py --prompt "a red apple" --checkpoints runs/base64,runs/sr256 --out samples/
  python sample.py --prompts_file prompts.txt --checkpoints runs/base64 --num_images 4 \
      --sampler dpmpp_2m --steps 25 --guidance 5

Editing an image you have (imagen_jax/editing.py; --init_image is repeatable, files or folders):

  python sample.py --init_image photo.png --checkpoints runs/sr256,runs/sr1024 --prompt "a cat"
  python sample.py --init_image photo.png --strength 0.6 --checkpoints runs/base64 --prompt ...
  python sample.py --init_image photo.png --mask hole.png --resample 5 \
      --checkpoints runs/base64,runs/sr256,runs/sr1024 --prompt "a red apple"

upscales (SR checkpoints only: the image is fitted to the first one's low-res size), varies
(image-to-image: the last fraction S of the steps, from the image noised to that point) or
repaints (white in the mask; every stage keeps the rest, RePaint resampling N takes per step).
The log says how each image was cropped and resized for each stage.

Per-stage settings take one value (all stages) or one per stage: --steps 25,20,10.
`--checkpoints runs/base64@1200` samples from kept checkpoint step 1200 (default: the latest
usable one; a checkpoint that fails its checksums is reported and the previous one used).

Files are written batch by batch (PNG + JSON sidecar per image; at the end grid.png of the first
64 images, read back from their files), so a stopped run keeps every finished batch; rerun the
same command with --skip_existing to make only the missing images (bitwise the same as an
uninterrupted run). --overwrite replaces existing files instead; the two exclude each other.
Requests for more than --max_images images in total (default 1000) are refused unless
--max_images is raised.

On a CPU of two or more cores whose first batch is even, sampling runs on two JAX devices: each
even batch as two halves, one per device, an odd last batch on one (imagen_jax.cpu_devices;
IMAGEN_JAX_CPU_DEVICES=1 keeps one device). The images are one device's up to float rounding.

Exit codes: 0 done; 2 bad input, a bad image or mask included (one line on stderr, nothing
written); 75 stopped by SIGTERM/SIGINT (finished batches kept; rerun with --skip_existing to
make the rest).
"""

import logging
import os
import pathlib
import signal

from absl import flags

from imagen_jax import cli

EXIT_STOPPED = 75  # as train.py: stopped early by a signal, resumable

FLAGS = flags.FLAGS
flags.DEFINE_multi_string('prompt', [], 'A prompt (repeatable).')
flags.DEFINE_string('prompts_file', None, 'A text file with one prompt per line.')
flags.DEFINE_integer('training_prompts', 0, 'Also use the first N captions of the training data.')
flags.DEFINE_list(
  'checkpoints',
  [],
  'Run folders of the stages, base first: runs/base64,runs/sr256; run@N picks kept step N.',
)
flags.DEFINE_integer('num_images', 1, 'Images per prompt.')
# --distributed: every process samples every n-th batch on its own devices (same files as one).
cli.define_distributed_flags()
cli.define_compilation_cache_flag()
flags.adopt_module_key_flags(cli)  # --helpshort lists them too
flags.DEFINE_integer('seed', 0, 'Random seed; the same seed gives the same images on one backend.')
flags.DEFINE_integer(
  'batch_size', 8, 'Images per batch (memory and speed; each image keeps its own noise).'
)
flags.DEFINE_list('sampler', None, 'ddpm | ddim | dpmpp_2m | heun, per stage (default: config).')
flags.DEFINE_list('steps', None, 'Sampling steps per stage (default: config, 25).')
flags.DEFINE_list(
  'grid', None, 'Sampling grid per stage: quad | time | logsnr | karras | auto (default: config).'
)
flags.DEFINE_list('guidance', None, 'Classifier-free guidance scale per stage (1 = none).')
flags.DEFINE_enum('thresholding', None, ['dynamic', 'static', 'none'], 'x0 thresholding.')
flags.DEFINE_float(
  'dynamic_percentile',
  None,
  'Dynamic thresholding quantile p in (0, 1] (0.995: the 99.5th percentile of |x0|).',
)
flags.DEFINE_float('dynamic_max', None, 'Upper clamp on the dynamic threshold (0: none).')
flags.DEFINE_float('aug_level', None, 'Noise-conditioning augmentation level of SR stages.')
flags.DEFINE_integer('stop_at', None, 'Run only the first N stages.')
flags.DEFINE_bool('ema', True, 'Use the EMA parameters.')
flags.DEFINE_string('out', 'samples', 'Output folder.')
flags.DEFINE_bool('overwrite', False, 'Replace existing output files.')
flags.DEFINE_bool(
  'skip_existing',
  False,
  'Keep existing output files and make only the missing ones (same seed and settings).',
)
flags.DEFINE_multi_string(
  'init_image',
  [],
  'Edit this image (repeatable; a folder: its images): upscale it when the checkpoints start '
  'with an SR stage, vary it with --strength, repaint it with --mask.',
)
flags.DEFINE_float(
  'strength', None, 'Image-to-image: the fraction of the steps run, in (0, 1] (1: from noise).'
)
flags.DEFINE_string('mask', None, 'Inpainting: a mask of the init image size, white = repaint.')
flags.DEFINE_list('resample', None, 'Inpainting: RePaint takes per step, per stage (default 1).')
flags.DEFINE_integer(  # sample_lib.DEFAULT_MAX_IMAGES
  'max_images', 1000, 'Refuse requests for more images than this in total (prompts x num_images).'
)


def _numbers(values, kind, name):
  if values is None:
    return None
  try:
    return [kind(v) for v in values]
  except ValueError:
    what = 'whole numbers' if kind is int else 'numbers'
    cli.fail(f'--{name} takes {what}, got {",".join(values)}')


def _stop(signum, frame):
  """SIGTERM: stop like Ctrl-C (the batch in progress is dropped, finished ones are on disk).
  Recorded as well as raised: a raise inside a garbage-collection callback is dropped by Python,
  and the batch loop then stops at its next check (`sample_lib.request_stop`)."""
  from imagen_jax import sample_lib

  sample_lib.request_stop(signal.Signals(signum).name)
  cli.raise_stop(signum, frame)


def _read_prompts_file(name: str) -> list[str]:
  """One prompt per non-empty line of a UTF-8 text file (a byte-order mark is dropped, not kept
  on the first prompt; a pipe such as <(...) or /dev/stdin is read too); one error line, exit 2,
  for a file that cannot be read or is not UTF-8."""
  path = pathlib.Path(name).expanduser()
  try:
    text = path.read_text(encoding='utf-8-sig')
  except FileNotFoundError:
    cli.fail(f'--prompts_file {path} does not exist.')
  except IsADirectoryError:
    cli.fail(f'--prompts_file {path} is a folder; pass a text file with one prompt per line.')
  except UnicodeDecodeError as e:
    cli.fail(f'--prompts_file {path} is not UTF-8 text ({e}); save it as UTF-8.')
  except OSError as e:
    cli.fail(f'--prompts_file {path} cannot be read ({e.strerror}).')
  # Lines end at \n, \r\n or \r only: str.splitlines() also split a prompt at U+2028, U+0085,
  # a form feed or \x1c-\x1e inside it, into prompts of its own.
  lines = text.replace('\r\n', '\n').replace('\r', '\n').split('\n')
  prompts = [line.strip() for line in lines if line.strip()]
  if not prompts:  # was 'No prompt given: pass ... --prompts_file', of the file just given
    cli.fail(f'--prompts_file {path} has no prompt (every line is empty); one prompt per line.')
  return prompts


def main(argv):
  if len(argv) > 1:
    cli.fail(
      f'Unexpected arguments: {argv[1:]}; quote a prompt that has spaces, e.g. '
      '--prompt "a red apple".'
    )
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  cli.check_distributed_flags()
  cli.keep_freed_host_buffers()
  from imagen_jax import checkpoints, multihost, sample_lib

  prompts = list(FLAGS.prompt)
  if FLAGS.prompts_file:
    prompts += _read_prompts_file(FLAGS.prompts_file)
  req = sample_lib.SampleRequest(
    prompts=prompts,
    checkpoints=FLAGS.checkpoints,
    out=os.path.expanduser(FLAGS.out),  # '~/samples' (a quoted --out=~/... reaches us as is)
    num_images=FLAGS.num_images,
    seed=FLAGS.seed,
    batch_size=FLAGS.batch_size,
    samplers=FLAGS.sampler,
    steps=_numbers(FLAGS.steps, int, 'steps'),
    grids=FLAGS.grid,
    guidance=_numbers(FLAGS.guidance, float, 'guidance'),
    thresholding=FLAGS.thresholding,
    dynamic_percentile=FLAGS.dynamic_percentile,
    dynamic_max=FLAGS.dynamic_max,
    aug_level=FLAGS.aug_level,
    stop_at=FLAGS.stop_at,
    use_ema=FLAGS.ema,
    overwrite=FLAGS.overwrite,
    skip_existing=FLAGS.skip_existing,
    max_images=FLAGS.max_images,
    training_prompts=FLAGS.training_prompts,
    init_images=list(FLAGS.init_image) or None,
    strength=FLAGS.strength,
    mask=FLAGS.mask,
    resample=_numbers(FLAGS.resample, int, 'resample'),
  )
  # Two CPU devices when the first batch splits over them and two copies of the params fit
  # (imagen_jax.cpu_devices), before JAX's backend starts.
  cli.split_cpu_devices(
    sample_lib.first_batch_size(req),
    None,
    distributed=FLAGS.distributed,
    copy_bytes=lambda: sample_lib.params_bytes(req),
  )
  if FLAGS.distributed:
    cli.initialize_distributed()
  cli.enable_compilation_cache()
  checkpoints.quiet_orbax_noise()
  signal.signal(signal.SIGTERM, _stop)
  signal.signal(signal.SIGINT, _stop)  # Ctrl-C's KeyboardInterrupt can be dropped the same way
  # Every ending goes through cli.fail: with --distributed it tells the other processes, which
  # stop within about a second with the same line and code (a plain exit left them waiting in
  # the next collective until JAX aborted them all, rc 134, minutes later).
  try:
    written = sample_lib.run(req)
  except sample_lib.SampleError as e:
    cli.fail(str(e))
  except multihost.PeersLostError as e:  # --distributed: a peer process failed
    cli.fail(str(e), 1)
  except KeyboardInterrupt as e:  # SIGINT, or SIGTERM through _stop
    instead = ' instead of --overwrite' if FLAGS.overwrite else ''
    out = pathlib.Path(req.out)
    if out.is_dir() and any(out.glob('*.png')):
      why = (
        f'before the last batch; the finished batches are in {FLAGS.out}: rerun the same command '
        f'with --skip_existing{instead} to make only the missing images.'
      )
    else:  # it said "the finished batches are in OUT" of a folder it had removed again
      why = 'before the first batch was written; rerun the same command.'
    cli.fail(
      f'stopped ({cli.stop_name(e)}) {why}',
      EXIT_STOPPED,
      prefix='',
      now=True,  # the sampler may be compiling in XLA's threads
    )
  # Every file is written: a stop signal now has nothing to stop (it raised KeyboardInterrupt
  # here, a traceback after a finished run).
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  print(f'{len(written)} images and grid.png in {FLAGS.out}')


if __name__ == '__main__':
  cli.run(main)
