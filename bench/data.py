"""Input-pipeline throughput (images/s) on the OpenMoji default dataset.

    .venv/bin/python bench/data.py                       # 64 and 256 px, 0 and 2 workers
    .venv/bin/python bench/data.py --resolutions 64 --workers 0 --batches 10

Prints ONE JSON line on stdout. The text cache is an in-memory stand-in with the shapes of
T5-XXL embeddings (L=128, D=4096, bfloat16, ~12 tokens per caption), so the per-batch
padding/conversion cost is realistic while no T5 has to run. Worker start-up is excluded
(the clock starts after `--warmup` batches). Rendering the dataset, when it is not cached
yet, is timed separately (`build_source_s`).
"""

import argparse
import json
import logging
import os
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402


class XXLShapedCache:
  """Stand-in for `imagen_jax.text.cache.EmbeddingCache` with T5-XXL sized entries."""

  def __init__(self, max_length: int = 128, dim: int = 4096, tokens: int = 12):
    import ml_dtypes

    self.max_length, self.dim = max_length, dim
    rng = np.random.default_rng(0)
    self._embs = rng.normal(size=(tokens, dim)).astype(ml_dtypes.bfloat16)  # [n, D]

  def get(self, caption: str) -> np.ndarray:
    del caption
    return self._embs


def _config(resolution: int, workers: int, batch_size: int, cache_dir: str):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(
    dict(
      source='openmoji',
      path='',
      split='train',
      image_column='image',
      caption_column='text',
      render_cache_dir=cache_dir,
      resolution=resolution,
      lowres_resolution=0,
      random_crop=False,
      small_images='skip',
      max_skip_fraction=0.01,
      max_examples=0,
      num_workers=workers,
      prefetch=2,
    )
  )
  c.train = ml_collections.ConfigDict(dict(batch_size=batch_size))
  return c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--resolutions', type=int, nargs='+', default=[64, 256])
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--cache_dir', default=str(REPO_ROOT / 'cache' / 'openmoji'))
  args = parser.parse_args()
  if min(args.resolutions) < 1 or args.batch_size < 1 or args.batches < 1:
    parser.error('--resolutions, --batch_size and --batches must be at least 1.')
  if min(args.workers) < 0 or args.warmup < 0:
    parser.error('--workers and --warmup must be at least 0.')
  logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

  from imagen_jax.data import pipeline, sources

  cache = XXLShapedCache()
  results = {}
  render_s = {}
  for resolution in args.resolutions:
    start = time.perf_counter()
    source = sources.build_source(_config(resolution, 0, args.batch_size, args.cache_dir).data)
    render_s[str(resolution)] = round(time.perf_counter() - start, 2)
    for workers in args.workers:
      config = _config(resolution, workers, args.batch_size, args.cache_dir)
      iterator = pipeline.make_iterator(config, text_cache=cache, source=source)
      try:
        for _ in range(args.warmup):
          next(iterator)
        start = time.perf_counter()
        for _ in range(args.batches):
          next(iterator)
        elapsed = time.perf_counter() - start
      finally:
        iterator.close()
      results[f'{resolution}px_{workers}workers'] = round(
        args.batches * args.batch_size / elapsed, 1
      )
  print(
    json.dumps(
      {
        'bench': 'data',
        'unit': 'images/s',
        'images_per_s': results,
        'batch_size': args.batch_size,
        'batches': args.batches,
        'source': 'openmoji',
        'num_examples': len(source),
        'build_source_s': render_s,
        'cpu_count': os.cpu_count(),
        'text_cache': 'in-memory stand-in, L=128, D=4096, bfloat16',
      }
    )
  )


if __name__ == '__main__':
  main()
