"""Captions -> frozen T5 embeddings: the one text API the rest of imagen-jax codes against.

  encoder = load_text_encoder('google/t5-v1_1-xxl', max_length=128)   # or a local folder
  text_embs, text_mask = encoder.encode(['a corgi on a skateboard'])   # [B, L, D], [B, L]

't5-tiny-random' is an offline, deterministic, UNTRAINED tiny T5 (d_model 32, byte-level
tokenizer) for tests and demos: its embeddings carry no meaning beyond the bytes.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax import device_memory
from imagen_jax.text import t5
from imagen_jax.text import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

TINY_RANDOM = 't5-tiny-random'
TINY_RANDOM_SEED = 0
TINY_RANDOM_CONFIG = t5.T5Config(
  vocab_size=384,  # ByT5 tokenizer: 3 specials + 256 bytes + 125 sentinels
  d_model=32,
  d_kv=16,
  d_ff=64,
  num_layers=2,
  num_heads=2,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  feed_forward_proj='gated-gelu',
)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, input_ids, mask):
  """Jitted once per (architecture, dtype, shapes); shared by all TextEncoder instances."""
  model = nnx.merge(graphdef, state)
  hidden = model(input_ids, mask)  # [B, L, D]
  return jnp.where(mask[..., None], hidden.astype(jnp.float32), 0.0)


def batch_sharding(mesh: jax.sharding.Mesh | None) -> tuple[NamedSharding | None, int]:
  """(sharding of [B, L] token batches, multiple that B must be padded to) on `mesh`."""
  if mesh is None:
    return None, 1
  axes = t5.shard_axes(mesh)
  multiple = math.prod(mesh.shape[a] for a in axes)
  spec = P(axes if len(axes) > 1 else (axes[0] if axes else None), None)
  return NamedSharding(mesh, spec), multiple


def lower_encoder(
  graphdef, state, *, batch: int, length: int, mesh: jax.sharding.Mesh | None = None
) -> jax.stages.Lowered:
  """The jitted embedding function lowered for [batch, length] tokens (for AOT compile /
  memory analysis). `state` may be abstract (ShapeDtypeStructs carrying their shardings)."""
  sharding, multiple = batch_sharding(mesh)
  if batch % multiple:
    raise ValueError(f'batch {batch} must be a multiple of the {multiple} batch-sharded devices.')
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_, sharding=sharding)
  if mesh is None:
    return _embed.lower(graphdef, state, ids, mask)
  with jax.set_mesh(mesh):
    return _embed.lower(graphdef, state, ids, mask)


class TextEncoder:
  """A T5 encoder + its tokenizer, jitted; optionally sharded over a ('data', 'fsdp') mesh."""

  def __init__(
    self,
    name: str,
    model: t5.T5Encoder,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    mesh: jax.sharding.Mesh | None = None,
  ):
    if tokenizer.vocab_size > model.config.vocab_size:
      raise ValueError(
        f'Tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the T5 encoder '
        f'{name!r} only {model.config.vocab_size} embeddings; use the tokenizer saved with '
        'the checkpoint.'
      )
    self.name = name
    self.dim = model.config.d_model
    self.max_length = tokenizer.max_length
    self.tokenizer = tokenizer
    self.config = model.config
    self.dtype = model.dtype
    self.mesh = t5.auto_mesh(mesh) if mesh is not None else None
    self._graphdef, self._state = nnx.split(model)
    self._batch_sharding, self._batch_multiple = batch_sharding(self.mesh)

  def num_params(self) -> int:
    return self.config.num_params()

  def param_bytes(self) -> int:
    return device_memory.tree_bytes(self._state)

  def lower(self, batch: int) -> jax.stages.Lowered:
    """The embedding function lowered for a [batch, max_length] token batch."""
    padded = -(-batch // self._batch_multiple) * self._batch_multiple
    return lower_encoder(
      self._graphdef, self._state, batch=padded, length=self.max_length, mesh=self.mesh
    )

  def encode_tokens(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """ids [B, L] int, mask [B, L] bool -> embeddings [B, L, D] float32, zeros at padding."""
    batch = input_ids.shape[0]
    padded = -(-max(batch, 1) // self._batch_multiple) * self._batch_multiple
    ids = np.zeros((padded, input_ids.shape[1]), np.int32)
    ids[:batch] = input_ids
    full_mask = np.zeros((padded, input_ids.shape[1]), bool)
    full_mask[:batch] = mask
    full_mask[batch:, 0] = True  # padding rows: one real token keeps softmax finite
    if self._batch_sharding is not None:
      ids = jax.device_put(ids, self._batch_sharding)
      full_mask = jax.device_put(full_mask, self._batch_sharding)
    if self.mesh is not None:
      with jax.set_mesh(self.mesh):
        embs = _embed(self._graphdef, self._state, ids, full_mask)
    else:
      embs = _embed(self._graphdef, self._state, ids, full_mask)
    return np.asarray(embs)[:batch]

  def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """text_embs [B, L, D] float32 (zeros at padding), text_mask [B, L] bool; L == max_length."""
    input_ids, mask = self.tokenizer(captions)
    return self.encode_tokens(input_ids, mask), mask

  def __repr__(self) -> str:
    return (
      f'TextEncoder({self.name!r}, dim={self.dim}, max_length={self.max_length}, '
      f'dtype={self.dtype.name}, layers={self.config.num_layers})'
    )


def load_text_encoder(
  name_or_path: str,
  *,
  max_length: int = 128,
  dtype: str = 'bfloat16',
  mesh: jax.sharding.Mesh | None = None,
  revision: str | None = None,
) -> TextEncoder:
  """A frozen T5 encoder by hub name ('google/t5-v1_1-xxl'), local folder, or 't5-tiny-random'.

  `revision`: the Hub revision of a hub name (branch, tag, commit, 'refs/pr/<n>'; None or '':
  the default branch).

  `dtype` is the compute and parameter dtype ('bfloat16' or 'float32'); with `mesh`, the
  parameters are sharded over its 'data' x 'fsdp' axes and batches over the same devices.
  """
  if name_or_path == TINY_RANDOM:
    log.warning(
      "Text encoder 't5-tiny-random' is an UNTRAINED random tiny T5 (d_model %d, seed %d): "
      'fine for tests and demos, meaningless for real training. Set config.text.encoder to '
      "a real T5 such as 'google/t5-v1_1-xxl' for actual text conditioning.",
      TINY_RANDOM_CONFIG.d_model,
      TINY_RANDOM_SEED,
    )
    model = t5.random_encoder(TINY_RANDOM_CONFIG, seed=TINY_RANDOM_SEED, dtype=dtype, mesh=mesh)
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_lib.BYTE_TOKENIZER, max_length=max_length)
    return TextEncoder(TINY_RANDOM, model, tokenizer, mesh=mesh)
  model, folder = t5.load_t5_encoder(
    name_or_path, dtype=dtype, mesh=mesh, revision=revision or None
  )
  tokenizer = tokenizer_lib.load_tokenizer(folder, max_length=max_length)
  return TextEncoder(name_or_path, model, tokenizer, mesh=mesh)
