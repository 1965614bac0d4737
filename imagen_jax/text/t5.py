"""Frozen T5 encoder in Flax NNX, loading Hugging Face T5 checkpoints (safetensors).

Covers T5 v1.0 (ReLU feed-forward, `t5-small` ...) and v1.1 / mT5 (gated-GELU feed-forward,
`google/t5-v1_1-*`). The architecture, as in the reference implementation:

  x = token_embedding[ids]
  for each layer:  x += Attn(RMSNorm(x));  x += FFN(RMSNorm(x))
  out = RMSNorm(x)

with bidirectional relative-position buckets (one bias table, owned by the first layer and
shared by all), RMS norm without mean subtraction or bias (variance in float32), no biases
anywhere, no 1/sqrt(d) attention scaling (T5 folds it into the init) and no dropout.

The layers' parameters are stacked on a leading [num_layers] axis and run with `lax.scan`,
so compile time and memory analysis do not grow with depth. Checkpoints are read one tensor
(or one stacked parameter) at a time with `safetensors.safe_open`, cast to the target dtype
on the host and placed straight onto the device / mesh sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ('t5', 'mt5')
# Mesh axes that parameters and batches are sharded over (see imagen_jax/sharding.py).
SHARD_AXES = ('data', 'fsdp')

_ACTIVATIONS = {
  'relu': jax.nn.relu,
  'gelu': lambda x: jax.nn.gelu(x, approximate=False),
  'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
  'silu': jax.nn.silu,
}

_HUB_PATTERNS = (
  'config.json',
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'added_tokens.json',
  'spiece.model',
  'model.safetensors.index.json',
)


class T5CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as a T5 encoder; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder fields of a Hugging Face T5 `config.json`."""

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = 'relu'
  layer_norm_epsilon: float = 1e-6

  def __post_init__(self):
    self.activation_name  # validates feed_forward_proj  # noqa: B018

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith('gated-')

  @property
  def activation_name(self) -> str:
    """Activation as Hugging Face names it ('gated-gelu' means the tanh-approximate GELU)."""
    parts = self.feed_forward_proj.split('-')
    ok = len(parts) == 1 or (len(parts) == 2 and parts[0] == 'gated')
    if not ok or parts[-1] not in _ACTIVATIONS:
      raise T5CheckpointError(
        f'feed_forward_proj={self.feed_forward_proj!r} is not supported; expected '
        f"'relu', 'gelu', 'silu' or their 'gated-' forms (T5 v1.0: 'relu', v1.1: 'gated-gelu')."
      )
    if self.feed_forward_proj == 'gated-gelu':
      return 'gelu_new'
    return parts[-1]

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> T5Config:
    """Reads the fields this encoder needs from a (validated) Hugging Face config dict."""
    missing = [
      f for f in ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers', 'num_heads') if f not in d
    ]
    if missing:
      raise T5CheckpointError(f'T5 config lacks fields {missing}; is this a T5 config.json?')
    kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
    return cls(**kwargs)

  def num_params(self) -> int:
    """Number of encoder parameters (shared embedding included)."""
    d, f, inner = self.d_model, self.d_ff, self.inner_dim
    ffn = (3 if self.is_gated else 2) * d * f
    per_layer = 4 * d * inner + ffn + 2 * d
    return (
      self.vocab_size * d
      + self.relative_attention_num_buckets * self.num_heads
      + self.num_layers * per_layer
      + d
    )


# Real architectures (the encoder halves), for synthetic benchmarks without downloads.
T5_V1_1_CONFIGS = {
  'small': T5Config(32128, 512, 64, 1024, 8, 6, feed_forward_proj='gated-gelu'),
  'base': T5Config(32128, 768, 64, 2048, 12, 12, feed_forward_proj='gated-gelu'),
  'large': T5Config(32128, 1024, 64, 2816, 24, 16, feed_forward_proj='gated-gelu'),
  'xl': T5Config(32128, 2048, 64, 5120, 24, 32, feed_forward_proj='gated-gelu'),
  'xxl': T5Config(32128, 4096, 64, 10240, 24, 64, feed_forward_proj='gated-gelu'),
}


def relative_position_buckets(length: int, *, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of (key position - query position), as a static [L, L] int32.

  Half the buckets are for positive offsets; within a half, offsets below num_buckets/4
  get their own bucket and larger ones share log-spaced buckets up to max_distance.
  Computed in float32 like the reference so that boundary cases round the same way.
  """
  positions = np.arange(length, dtype=np.int64)
  relative = positions[None, :] - positions[:, None]  # [Lq, Lk]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  with np.errstate(divide='ignore'):
    scaled = (
      np.log(distance.astype(np.float32) / np.float32(max_exact))
      / np.float32(math.log(max_distance / max_exact))
      * np.float32(half - max_exact)
    )
  large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets += np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)


def np_dtype(name: str | np.dtype) -> np.dtype:
  """NumPy dtype by name, 'bfloat16' included (through ml_dtypes)."""
  return np.dtype(ml_dtypes.bfloat16) if str(name) == 'bfloat16' else np.dtype(name)


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """T5LayerNorm: x / rms(x) * weight, variance in float32, no mean, no bias."""
  variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
  normed = x.astype(jnp.float32) * jax.lax.rsqrt(variance + eps)
  return weight * normed.astype(weight.dtype)


def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype) -> nnx.Param:
  return nnx.Param(
    (jax.random.normal(rngs.params(), tuple(shape), jnp.float32) * std).astype(dtype)
  )


class T5Layers(nnx.Module):
  """All encoder layers, parameters stacked on a leading [num_layers] axis."""

  def __init__(self, config: T5Config, *, param_dtype, rngs: nnx.Rngs):
    n, d, f, inner = config.num_layers, config.d_model, config.d_ff, config.inner_dim
    # Reference init (T5PreTrainedModel._init_weights), factor 1.
    self.attn_norm = nnx.Param(jnp.ones((n, d), param_dtype))
    self.q = _normal(rngs, (n, d, inner), (d * config.d_kv) ** -0.5, param_dtype)
    self.k = _normal(rngs, (n, d, inner), d**-0.5, param_dtype)
    self.v = _normal(rngs, (n, d, inner), d**-0.5, param_dtype)
    self.o = _normal(rngs, (n, inner, d), inner**-0.5, param_dtype)
    self.ffn_norm = nnx.Param(jnp.ones((n, d), param_dtype))
    if config.is_gated:
      self.wi_0 = _normal(rngs, (n, d, f), d**-0.5, param_dtype)
      self.wi_1 = _normal(rngs, (n, d, f), d**-0.5, param_dtype)
    else:
      self.wi = _normal(rngs, (n, d, f), d**-0.5, param_dtype)
    self.wo = _normal(rngs, (n, f, d), f**-0.5, param_dtype)


class T5Encoder(nnx.Module):
  """T5 encoder stack: ids [B, L] + mask [B, L] -> hidden states [B, L, D]."""

  def __init__(self, config: T5Config, *, dtype='bfloat16', param_dtype=None, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype or dtype)
    self.token_embedding = _normal(rngs, (config.vocab_size, config.d_model), 1.0, param_dtype)
    self.relative_attention_bias = _normal(
      rngs,
      (config.relative_attention_num_buckets, config.num_heads),
      config.d_model**-0.5,
      param_dtype,
    )
    self.layers = T5Layers(config, param_dtype=param_dtype, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((config.d_model,), param_dtype))

  def position_bias(self, length: int) -> jax.Array:
    """Relative attention bias [H, L, L] (float32), shared by all layers."""
    buckets = relative_position_buckets(
      length,
      num_buckets=self.config.relative_attention_num_buckets,
      max_distance=self.config.relative_attention_max_distance,
    )
    bias = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), buckets, axis=0)
    return jnp.transpose(bias, (2, 0, 1))  # [H, Lq, Lk]

  def __call__(self, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """input_ids [B, L] int, mask [B, L] bool (True on real tokens) -> [B, L, D] in dtype.

    Padding keys are masked out of attention, so real tokens never see padding; the
    outputs at padding positions are meaningless (callers zero them).
    """
    cfg = self.config
    dtype = self.dtype
    batch, length = input_ids.shape
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None

    x = jnp.take(self.token_embedding[...], input_ids, axis=0).astype(dtype)  # [B, L, D]
    neg = jnp.finfo(jnp.float32).min
    key_bias = jnp.where(mask[:, None, None, :], 0.0, neg).astype(jnp.float32)  # [B, 1, 1, Lk]
    attn_bias = self.position_bias(length)[None] + key_bias  # [B, H, Lq, Lk]
    act = _ACTIVATIONS[cfg.activation_name]
    eps = cfg.layer_norm_epsilon

    def dense(h, w):
      return jnp.einsum('bld,df->blf', h, w.astype(dtype), precision=precision)

    def layer(x, p):
      h = _rms_norm(x, p['attn_norm'], eps).astype(dtype)  # [B, L, D]
      q = dense(h, p['q']).reshape(batch, length, cfg.num_heads, cfg.d_kv)
      k = dense(h, p['k']).reshape(batch, length, cfg.num_heads, cfg.d_kv)
      v = dense(h, p['v']).reshape(batch, length, cfg.num_heads, cfg.d_kv)
      scores = jnp.einsum(
        'bqhd,bkhd->bhqk', q, k, precision=precision, preferred_element_type=jnp.float32
      )  # [B, H, Lq, Lk]; no 1/sqrt(d_kv) scaling in T5
      weights = jax.nn.softmax(scores + attn_bias, axis=-1).astype(dtype)
      attn = jnp.einsum('bhqk,bkhd->bqhd', weights, v, precision=precision)
      x = x + dense(attn.reshape(batch, length, cfg.inner_dim), p['o'])

      h = _rms_norm(x, p['ffn_norm'], eps).astype(dtype)
      if cfg.is_gated:
        hidden = act(dense(h, p['wi_0'])) * dense(h, p['wi_1'])  # [B, L, F]
      else:
        hidden = act(dense(h, p['wi']))
      x = x + dense(hidden, p['wo'])
      return x, None

    params = {
      name: var[...] for name, var in vars(self.layers).items() if isinstance(var, nnx.Param)
    }
    x, _ = jax.lax.scan(layer, x, params)
    return _rms_norm(x, self.final_norm[...], eps).astype(dtype)


# ----------------------------------------------------------------------------- sharding


def auto_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """The same devices and axes with Auto axis types (Explicit axes reject FSDP matmuls)."""
  types = getattr(mesh, 'axis_types', None)
  auto = jax.sharding.AxisType.Auto
  if types is not None and all(t == auto for t in types):
    return mesh
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names))


def shard_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """The mesh axes ('data', 'fsdp') with more than one device: params and batches use them."""
  return tuple(a for a in SHARD_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def param_sharding(shape: Sequence[int], mesh: jax.sharding.Mesh | None) -> Any:
  """Sharding of one parameter: its largest non-layer dim divisible by the shard-axes size.

  The frozen encoder is ZeRO-3 style: every big matrix is split over all of the mesh's
  'data' x 'fsdp' devices and XLA gathers it per layer. Vectors (norms) stay replicated.
  """
  if mesh is None:
    return None
  axes = shard_axes(mesh)
  size = math.prod(mesh.shape[a] for a in axes)
  spec = [None] * len(shape)
  if axes and len(shape) >= 2:
    dims = range(1, len(shape)) if len(shape) == 3 else range(len(shape))  # never the layer axis
    candidates = [i for i in dims if shape[i] % size == 0 and shape[i] >= size]
    if candidates:
      best = max(candidates, key=lambda i: shape[i])
      spec[best] = axes if len(axes) > 1 else axes[0]
  return NamedSharding(mesh, P(*spec))


def shard_encoder(model: T5Encoder, mesh: jax.sharding.Mesh | None) -> T5Encoder:
  """Places the encoder's parameters on the mesh (or the default device when mesh is None)."""
  graphdef, state = nnx.split(model)
  state = jax.tree.map(
    lambda a: jax.device_put(a, param_sharding(a.shape, mesh)) if mesh is not None else a, state
  )
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- checkpoints


def _looks_local(name: str) -> bool:
  return (
    name.startswith(('/', './', '../', '~'))
    or os.sep in name.strip('/').replace('/', '', 1)
    or os.path.exists(name)
  )


_WHOLE_FILE_BYTES = 1 << 20  # config and tokenizer files: hashed whole
_PIECES, _PIECE_BYTES = 16, 1 << 16  # weights: 16 evenly spaced 64 KiB pieces per file


def folder_fingerprint(name_or_path: str) -> str | None:
  """A short digest of the checkpoint a local folder holds, so that an embedding cache built
  from it is not reused after the folder's weights or tokenizer change (or a relative path
  names another folder). None for a Hub name, which its name already identifies.

  What the loader reads is hashed: config.json, the tokenizer files and the shard index whole;
  each safetensors file by its name, size and 16 evenly spaced 64 KiB pieces. Another checkpoint
  (retrained, fine-tuned, another size) differs in every piece, and reading about 1 MiB per file
  keeps this instant for T5-XXL's 9 GB encoder. It names the weights, it does not verify them:
  a few changed bytes between the pieces go unseen. Copying or moving the folder keeps it."""
  path = pathlib.Path(os.path.expanduser(name_or_path))
  if not path.is_dir():
    return None
  digest = hashlib.sha256()
  names = sorted(
    p.name
    for p in path.iterdir()
    if p.is_file() and (p.name in _HUB_PATTERNS or p.name.endswith('.safetensors'))
  )
  for name in names:
    file = path / name
    size = file.stat().st_size
    digest.update(f'{name}\0{size}\0'.encode())
    with open(file, 'rb') as f:
      if size <= _WHOLE_FILE_BYTES:
        digest.update(f.read())
        continue
      for k in range(_PIECES):
        f.seek((size - _PIECE_BYTES) * k // (_PIECES - 1))
        digest.update(f.read(_PIECE_BYTES))
  return digest.hexdigest()[:12]


def resolve_checkpoint(name_or_path: str, *, revision: str | None = None) -> pathlib.Path:
  """A local folder, or a Hugging Face Hub name downloaded (encoder shards only) to the cache."""
  path = pathlib.Path(os.path.expanduser(name_or_path))
  if path.is_dir():
    return path
  if _looks_local(name_or_path):
    raise T5CheckpointError(
      f'T5 checkpoint folder {str(path)!r} does not exist. Pass an existing folder with '
      'config.json + model.safetensors (or model.safetensors.index.json + shards), or a '
      "Hugging Face Hub name such as 'google/t5-v1_1-xxl'."
    )
  return _download_from_hub(name_or_path, revision=revision)


def _download_from_hub(repo_id: str, *, revision: str | None) -> pathlib.Path:
  import huggingface_hub

  try:
    folder = huggingface_hub.snapshot_download(
      repo_id, revision=revision, allow_patterns=list(_HUB_PATTERNS)
    )
    folder = pathlib.Path(folder)
    index = folder / 'model.safetensors.index.json'
    if index.exists():
      weight_map = _weight_map(index)
      needed = sorted({f for k, f in weight_map.items() if _is_encoder_tensor(k)})
    else:
      needed = ['model.safetensors']
    folder = pathlib.Path(
      huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=needed)
    )
  except Exception as e:  # network, auth, missing repo: one message with the fix
    raise T5CheckpointError(
      f'Could not download T5 checkpoint {repo_id!r} from the Hugging Face Hub '
      f'({type(e).__name__}: {e}). Check the name and network access (or HF_TOKEN), or '
      'download it elsewhere and pass the local folder instead.'
    ) from e
  if not _safetensors_files(folder):
    try:
      remote = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception:  # listing is only for the error message
      remote = []
    message = _no_safetensors_message(repo_id, remote)
    offers = _safetensors_pull_requests(huggingface_hub, repo_id)
    if offers:
      message += (
        f" On the Hub, {'; '.join(offers)}. These are pull requests, not the repo owner's "
        'branch: check who made one on its page, then pass its ref as --config.text.revision.'
      )
    raise T5CheckpointError(message)
  return folder


_MAX_PULL_REQUESTS_LISTED = 8


def _safetensors_pull_requests(hub: Any, repo_id: str) -> list[str]:
  """The repo's newest pull-request refs that hold safetensors weights, each described.

  Some repos (google/t5-v1_1-xxl among them, reported in January 2026) keep safetensors only in
  an unmerged conversion pull request. They are named for the user to choose, never used
  unasked. Best effort: any Hub error gives an empty list.
  """
  try:
    refs = hub.list_repo_refs(repo_id, include_pull_requests=True).pull_requests or []
  except Exception:  # noqa: BLE001 - only for the error message
    return []
  numbered = []
  for ref in refs:
    number = ref.ref.rsplit('/', 1)[-1]
    if ref.ref.startswith('refs/pr/') and number.isdigit():
      numbered.append((int(number), ref.ref))
  offers = []
  for number, ref in sorted(numbered, reverse=True)[:_MAX_PULL_REQUESTS_LISTED]:
    try:
      files = hub.list_repo_files(repo_id, revision=ref)
    except Exception:  # noqa: BLE001
      continue
    if not any(f.endswith('.safetensors') for f in files):
      continue
    about = ''
    try:
      details = hub.get_discussion_details(repo_id, number)
      about = f' ({details.title!r} by {details.author}, {details.status})'
    except Exception:  # noqa: BLE001 - the ref alone is still worth naming
      pass
    offers.append(
      f'{ref}{about} has safetensors (https://huggingface.co/{repo_id}/discussions/{number})'
    )
  return offers


def _is_encoder_tensor(name: str) -> bool:
  return name.startswith('encoder.') or name == 'shared.weight'


def _no_safetensors_message(where: str, found: Sequence[str]) -> str:
  return (
    f'T5 checkpoint {where!r} has no safetensors weights (found: {sorted(found)[:12]}). '
    'Only model.safetensors or model.safetensors.index.json + shards are read (no torch here). '
    'Convert once on a machine with PyTorch: transformers.T5EncoderModel.from_pretrained(src)'
    '.save_pretrained(dst, safe_serialization=True), then pass dst; many hub repos also offer '
    "a safetensors revision: pass it as --config.text.revision (e.g. 'refs/pr/<n>'), or use a "
    'safetensors mirror.'
  )


def _json_object(path: pathlib.Path) -> dict:
  """The JSON object in `path`; T5CheckpointError naming the file when it is cut, not JSON or
  not an object (a partly copied or downloaded checkpoint folder)."""
  try:
    raw = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    raise T5CheckpointError(
      f'{str(path)!r} does not read as JSON ({type(e).__name__}: {e}); the checkpoint folder is '
      'incomplete or damaged: download or copy it again.'
    ) from e
  if not isinstance(raw, dict):
    raise T5CheckpointError(
      f'{str(path)!r} holds a JSON {type(raw).__name__}, not an object; the checkpoint folder is '
      'damaged: download or copy it again.'
    )
  return raw


def _weight_map(index: pathlib.Path) -> dict:
  """The tensor -> file map of a sharded checkpoint's model.safetensors.index.json."""
  weight_map = _json_object(index).get('weight_map')
  if not isinstance(weight_map, dict):
    raise T5CheckpointError(
      f"{str(index)!r} has no 'weight_map' object (tensor name -> file); the checkpoint folder "
      'is damaged: download or copy it again.'
    )
  return weight_map


def _safetensors_files(folder: pathlib.Path) -> list[str]:
  """The safetensors files holding encoder tensors (all of them for a single file)."""
  index = folder / 'model.safetensors.index.json'
  if index.exists():
    weight_map = _weight_map(index)
    return sorted({f for k, f in weight_map.items() if _is_encoder_tensor(k)})
  if (folder / 'model.safetensors').exists():
    return ['model.safetensors']
  return []


def read_config(folder: pathlib.Path) -> T5Config:
  """Validated T5 encoder config from `folder/config.json`."""
  path = folder / 'config.json'
  if not path.exists():
    raise T5CheckpointError(
      f'No config.json in {str(folder)!r} '
      f'(found: {sorted(q.name for q in folder.iterdir())[:12]}); '
      'a Hugging Face T5 checkpoint folder needs config.json next to its safetensors.'
    )
  raw = _json_object(path)
  model_type = raw.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise T5CheckpointError(
      f'{str(path)!r} describes model_type={model_type!r} '
      f'(architectures={raw.get("architectures")}), not a T5 encoder-decoder; expected '
      f'model_type in {SUPPORTED_MODEL_TYPES} (e.g. google/t5-v1_1-xxl, t5-small). Point '
      'config.text.encoder at a T5 checkpoint.'
    )
  if raw.get('relative_attention_num_buckets', 32) < 4:
    raise T5CheckpointError(f'{str(path)!r}: relative_attention_num_buckets must be >= 4.')
  return T5Config.from_dict(raw)


def _block_index(name: str) -> int | None:
  """The encoder block a HF tensor name belongs to ('encoder.block.<i>....'), else None."""
  parts = name.split('.')
  if len(parts) > 2 and parts[:2] == ['encoder', 'block'] and parts[2].isdigit():
    return int(parts[2])
  return None


def _target_of(name: str, num_layers: int) -> tuple[str, int | None, bool] | None:
  """HF tensor name -> (our param path, layer index or None, transpose?) or None if unused."""
  if name in ('shared.weight', 'encoder.embed_tokens.weight'):
    return 'token_embedding', None, False
  if name == 'encoder.final_layer_norm.weight':
    return 'final_norm', None, False
  if name == 'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight':
    return 'relative_attention_bias', None, False
  parts = name.split('.')
  if len(parts) < 6 or parts[:2] != ['encoder', 'block'] or parts[3] != 'layer':
    return None
  layer, sub, rest = int(parts[2]), parts[4], '.'.join(parts[5:])
  if layer >= num_layers:
    return None
  table = {
    ('0', 'layer_norm.weight'): ('layers.attn_norm', False),
    ('0', 'SelfAttention.q.weight'): ('layers.q', True),
    ('0', 'SelfAttention.k.weight'): ('layers.k', True),
    ('0', 'SelfAttention.v.weight'): ('layers.v', True),
    ('0', 'SelfAttention.o.weight'): ('layers.o', True),
    ('1', 'layer_norm.weight'): ('layers.ffn_norm', False),
    ('1', 'DenseReluDense.wi.weight'): ('layers.wi', True),
    ('1', 'DenseReluDense.wi_0.weight'): ('layers.wi_0', True),
    ('1', 'DenseReluDense.wi_1.weight'): ('layers.wi_1', True),
    ('1', 'DenseReluDense.wo.weight'): ('layers.wo', True),
  }
  hit = table.get((sub, rest))
  if hit is None:
    return None
  return hit[0], layer, hit[1]


def _damaged_message(path: pathlib.Path, error: BaseException) -> str:
  """One line for a safetensors file that cannot be read: a Git LFS pointer (a clone without
  `git lfs`), or a truncated or corrupt download."""
  size = path.stat().st_size if path.exists() else 0
  with open(path, 'rb') as f:
    head = f.read(64)
  if head.startswith(b'version https://git-lfs'):
    return (
      f'{str(path)!r} is a Git LFS pointer ({size} bytes), not the weights: fetch them with '
      '`git lfs pull` in that folder, or download it with huggingface_hub.'
    )
  return (
    f'{str(path)!r} ({size} bytes) is not a readable safetensors file ({error}): the download '
    'is truncated or corrupt; download it again.'
  )


def _open_safetensors(path: pathlib.Path):
  from safetensors import safe_open

  try:
    return safe_open(str(path), framework='np')
  except Exception as e:  # noqa: BLE001 - safetensors' own error type
    raise T5CheckpointError(_damaged_message(path, e)) from e


def load_t5_encoder(
  name_or_path: str,
  *,
  dtype: str = 'bfloat16',
  param_dtype: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  revision: str | None = None,
) -> tuple[T5Encoder, pathlib.Path]:
  """Loads a Hugging Face T5 checkpoint's encoder (safetensors only) into our NNX module.

  Returns (encoder, local checkpoint folder). Tensors stream one stacked parameter at a
  time from the memory-mapped safetensors files, are cast to `param_dtype` (default:
  `dtype`) on the host and put straight onto `mesh` (sharded) or the default device.
  """

  folder = resolve_checkpoint(name_or_path, revision=revision)
  config = read_config(folder)
  files = _safetensors_files(folder)
  if not files:
    found = [p.name for p in folder.iterdir()]
    raise T5CheckpointError(_no_safetensors_message(str(folder), found))
  mesh = auto_mesh(mesh) if mesh is not None else None
  param_dtype = np_dtype(param_dtype or dtype)

  abstract = nnx.eval_shape(
    lambda: T5Encoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  )
  graphdef, abstract_state = nnx.split(abstract)
  flat_abstract = {'.'.join(map(str, k)): v for k, v in nnx.to_flat_state(abstract_state)}

  # Where each tensor of interest lives: target -> list of (layer, transpose, file, name).
  sources: dict[str, list[tuple[int | None, bool, str, str]]] = {}
  extra_layers: set[int] = set()
  handles = {}
  try:
    for file in files:
      if not (folder / file).exists():
        raise T5CheckpointError(
          f'Checkpoint shard {file!r} listed in the index is missing from {str(folder)!r}; '
          're-download the checkpoint.'
        )
      handles[file] = _open_safetensors(folder / file)
      for name in handles[file].keys():
        target = _target_of(name, config.num_layers)
        if target is not None:
          sources.setdefault(target[0], []).append((target[1], target[2], file, name))
        elif (layer := _block_index(name)) is not None and layer >= config.num_layers:
          extra_layers.add(layer)
    if extra_layers:
      raise T5CheckpointError(
        f'T5 checkpoint {str(folder)!r} has encoder blocks up to {max(extra_layers)} but its '
        f'config.json says num_layers={config.num_layers}: the config does not belong to these '
        'weights; copy the config.json that came with them.'
      )
    missing = []
    for path in flat_abstract:
      have = sources.get(path, [])
      if path.startswith('layers.'):
        layers = {layer for layer, *_ in have}
        missing += [f'{path}[layer {i}]' for i in range(config.num_layers) if i not in layers]
      elif not have:
        missing.append(path)
    if missing:
      raise T5CheckpointError(
        f'T5 checkpoint {str(folder)!r} lacks encoder tensors for {missing[:8]}'
        f'{" ..." if len(missing) > 8 else ""}: its config.json (feed_forward_proj='
        f'{config.feed_forward_proj!r}, num_layers={config.num_layers}) does not match its weights.'
      )

    values = {}
    for path, var in flat_abstract.items():
      shape = tuple(var.shape)
      host = np.empty(shape, param_dtype)
      entries = sources[path] if path.startswith('layers.') else sources[path][:1]
      for layer, transpose, file, name in entries:
        try:
          tensor = handles[file].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors' own error type
          raise T5CheckpointError(_damaged_message(folder / file, e)) from e
        tensor = tensor.T if transpose else tensor
        expected = shape[1:] if layer is not None else shape
        if tuple(tensor.shape) != expected:
          raise T5CheckpointError(
            f'Tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected} from '
            f'config.json; the config and weights in {str(folder)!r} disagree.'
          )
        if layer is None:
          host[...] = tensor.astype(param_dtype)
        else:
          host[layer] = tensor.astype(param_dtype)
        del tensor
      sharding = param_sharding(shape, mesh)
      values[path] = jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)
      del host
  finally:
    handles.clear()

  state = nnx.from_flat_state(
    [(tuple(k.split('.')), var.replace(values[k])) for k, var in flat_abstract.items()]
  )
  log.info(
    'Loaded T5 encoder from %s: %d layers, d_model %d, %.1fM params (%s).',
    folder,
    config.num_layers,
    config.d_model,
    config.num_params() / 1e6,
    np.dtype(param_dtype).name,
  )
  return nnx.merge(graphdef, state), folder


def random_encoder(
  config: T5Config,
  *,
  seed: int = 0,
  dtype: str = 'bfloat16',
  mesh: jax.sharding.Mesh | None = None,
) -> T5Encoder:
  """An untrained encoder with the reference init from a fixed PRNG seed (tests, benches).

  Initialised in one jitted call, straight into the mesh sharding when `mesh` is given.
  """
  mesh = auto_mesh(mesh) if mesh is not None else None
  graphdef, init = _random_init_fn(config, str(dtype), int(seed), mesh)
  return nnx.merge(graphdef, init())


@functools.lru_cache(maxsize=8)
def _random_init_fn(config: T5Config, dtype: str, seed: int, mesh):
  """(graphdef, jitted state initialiser), cached so repeated loads compile once."""

  def make() -> T5Encoder:
    return T5Encoder(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(params=seed))

  graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
  shardings = None
  if mesh is not None:
    shardings = jax.tree.map(lambda a: param_sharding(a.shape, mesh), abstract_state)
  return graphdef, jax.jit(lambda: nnx.state(make()), out_shardings=shardings)


def encoder_state_to_hf(model: T5Encoder) -> dict[str, np.ndarray]:
  """Our parameters under Hugging Face T5 tensor names ([out, in] matrices), float32."""
  out = {}
  flat = {
    '.'.join(map(str, k)): np.asarray(v[...], np.float32)
    for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  out['shared.weight'] = flat['token_embedding']
  out['encoder.final_layer_norm.weight'] = flat['final_norm']
  out['encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'] = flat[
    'relative_attention_bias'
  ]
  names = {
    'attn_norm': ('0', 'layer_norm.weight'),
    'q': ('0', 'SelfAttention.q.weight'),
    'k': ('0', 'SelfAttention.k.weight'),
    'v': ('0', 'SelfAttention.v.weight'),
    'o': ('0', 'SelfAttention.o.weight'),
    'ffn_norm': ('1', 'layer_norm.weight'),
    'wi': ('1', 'DenseReluDense.wi.weight'),
    'wi_0': ('1', 'DenseReluDense.wi_0.weight'),
    'wi_1': ('1', 'DenseReluDense.wi_1.weight'),
    'wo': ('1', 'DenseReluDense.wo.weight'),
  }
  for ours, (sub, rest) in names.items():
    if f'layers.{ours}' not in flat:
      continue
    stacked = flat[f'layers.{ours}']
    for i in range(stacked.shape[0]):
      t = stacked[i].T if stacked.ndim == 3 else stacked[i]
      out[f'encoder.block.{i}.layer.{sub}.{rest}'] = np.ascontiguousarray(t)
  return out
