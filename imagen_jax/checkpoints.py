"""Orbax checkpoints of a training run: state, data-iterator state and the resolved config.

Each checkpoint step holds three items:
  state   params, EMA params, optimizer state, step, base RNG (sharded arrays)
  data    the grain iterator state (JSON), so a resumed run sees exactly the same batches
  config  the resolved ConfigDict (JSON), so sample.py can rebuild the model from it
Saves are async and atomic (orbax writes to a temporary folder and renames it when complete),
so a save killed midway never becomes the latest checkpoint; leftover temporary folders are
removed when the manager opens.
"""

import json
import os
import pathlib
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

ITEMS = ('state', 'data', 'config')


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be used; the message says what was found."""


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / 'checkpoints'


def make_manager(
  workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=not read_only,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=not read_only,
    read_only=read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(
  manager: ocp.CheckpointManager,
  step: int,
  *,
  state: Any,
  data_state: Any,
  config: ml_collections.ConfigDict,
  force: bool = False,
) -> bool:
  """Start an (async) save of step; returns whether a save was started."""
  return manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    ),
    force=force,
  )


def restore(manager: ocp.CheckpointManager, step: int, *, abstract_state: Any) -> tuple[Any, Any]:
  """(state, data_state) of step, with state placed as `abstract_state`'s shardings say."""
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
    ),
  )
  return restored['state'], restored['data']


def restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(restored['config'])


def describe_folder(workdir: str | os.PathLike) -> str:
  """What a run folder holds, for error messages."""
  root = pathlib.Path(workdir)
  if not root.exists():
    return f'{root} does not exist'
  ckpt = checkpoint_dir(root)
  if not ckpt.exists():
    listing = sorted(p.name for p in root.iterdir())[:20]
    return f'{root} has no checkpoints/ folder (it holds: {listing or "nothing"})'
  listing = sorted(p.name for p in ckpt.iterdir())[:20]
  return f'{ckpt} holds no finished checkpoint (it holds: {listing or "nothing"})'


def latest_finished_step(workdir: str | os.PathLike) -> int:
  """The latest finished checkpoint step of a run folder; CheckpointError naming what is there."""
  if not checkpoint_dir(workdir).exists():
    raise CheckpointError(f'No checkpoint to load: {describe_folder(workdir)}.')
  manager = make_manager(workdir, read_only=True)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise CheckpointError(f'No checkpoint to load: {describe_folder(workdir)}.')
  return step


def config_differences(
  saved: ml_collections.ConfigDict | dict,
  current: ml_collections.ConfigDict | dict,
  prefix: str = '',
) -> list[str]:
  """'field: saved -> current' for every leaf that differs (tuples and lists compare equal)."""
  saved = saved.to_dict() if isinstance(saved, ml_collections.ConfigDict) else dict(saved)
  current = current.to_dict() if isinstance(current, ml_collections.ConfigDict) else dict(current)
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, '<absent>'), current.get(key, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_differences(a, b, f'{prefix}{key}.')
    elif _normalise(a) != _normalise(b):
      out.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return out


def _normalise(v: Any) -> Any:
  if isinstance(v, list | tuple):
    return tuple(_normalise(x) for x in v)
  return v
