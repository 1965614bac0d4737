"""The checkpoint layer in-process: checksums catch bit rot that still decodes, NaN states are
refused, restores fall back to the previous good step, RUN@STEP parsing."""

import asyncio
import gc
import json
import logging
import shutil
import sys
import unittest.mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from imagen_jax import checkpoints

pytestmark = pytest.mark.unit

CONFIG = ml_collections.ConfigDict({'stage': 'test', 'model': {'dim': 4}})


def state_at(step: int) -> dict:
  return {
    'params': {'w': jnp.arange(12.0).reshape(3, 4) * step, 'b': jnp.ones(4, jnp.bfloat16)},
    'step': jnp.int32(step),
    'rng': jax.random.key(step),
  }


def abstract(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


@pytest.fixture
def two_steps(tmp_path):
  manager = checkpoints.make_manager(tmp_path, async_save=False)
  for step in (1, 2):
    checkpoints.save(manager, step, state=state_at(step), data_state={'pos': step}, config=CONFIG)
  manager.wait_until_finished()
  return tmp_path, manager


def rot_one_bit(workdir, step: int) -> None:
  """Rewrite step's state with one bit of one float flipped, through orbax itself, so the files
  decode cleanly: only the saved checksums can tell."""
  state = jax.device_get(state_at(step))
  w = np.array(state['params']['w'])
  w.view(np.uint32)[1, 2] ^= 1 << 3
  state['params']['w'] = w
  scratch = workdir / 'scratch'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(scratch, state)
  target = checkpoints.step_dir(workdir, step) / 'state'
  shutil.rmtree(target)
  shutil.copytree(scratch, target)


def test_bit_rot_that_decodes_is_caught_and_the_previous_step_used(two_steps):
  workdir, manager = two_steps
  rot_one_bit(workdir, 2)
  target = abstract(state_at(2))
  with pytest.raises(checkpoints.CheckpointError, match='differ from their saved checksums'):
    checkpoints.restore(manager, 2, abstract_state=target)
  step, (state, data), failures = checkpoints.restore_with_fallback(
    manager, step=None, restore_fn=lambda s: checkpoints.load(manager, s, abstract_state=target)
  )
  assert step == 1 and data == {'pos': 1} and int(state['step']) == 1
  assert len(failures) == 1 and 'checkpoint step 2' in failures[0]
  # Asked for explicitly, the damaged step is an error, not a silent fallback.
  with pytest.raises(checkpoints.CheckpointError, match='checkpoint step 2'):
    checkpoints.restore_with_fallback(
      manager, step=2, restore_fn=lambda s: checkpoints.load(manager, s, abstract_state=target)
    )


def test_checkpoints_saved_with_version_1_checksums_still_verify(tmp_path, monkeypatch):
  # Every checkpoint written before 2026-11-29 holds version 1 checksums: verified by that
  # version's sums, damage included, not refused as 'unreadable checksums'.
  with monkeypatch.context() as patch:
    patch.setattr(checkpoints, 'CHECKSUM_VERSION', 1)
    manager = checkpoints.make_manager(tmp_path, async_save=False)
    for step in (1, 2):
      checkpoints.save(manager, step, state=state_at(step), data_state={}, config=CONFIG)
    manager.wait_until_finished()
  stored = json.loads((checkpoints.step_dir(tmp_path, 2) / 'checksums' / 'metadata').read_text())
  assert stored['version'] == 1
  target = abstract(state_at(2))
  state, _ = checkpoints.restore(manager, 2, abstract_state=target)
  assert int(state['step']) == 2
  rot_one_bit(tmp_path, 2)
  with pytest.raises(checkpoints.CheckpointError, match='differ from their saved checksums'):
    checkpoints.restore(manager, 2, abstract_state=target)


def test_restore_params_falls_back_and_reports(two_steps):
  workdir, manager = two_steps
  manager.close()
  rot_one_bit(workdir, 2)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  got = checkpoints.restore_params(
    workdir,
    key='params',
    abstract_fn=lambda config: abstract(state_at(1))['params'],
    sharding=device,
  )
  assert got.step == 1 and got.config.model.dim == 4
  # Exact: a restore returns the saved bytes (the fallback checkpoint is intact).
  np.testing.assert_array_equal(got.params['w'], state_at(1)['params']['w'])
  assert 'checkpoint step 2' in got.failures[0]


def test_non_finite_state_is_never_saved(tmp_path):
  manager = checkpoints.make_manager(tmp_path, async_save=False)
  state = state_at(1)
  state['params']['w'] = state['params']['w'].at[0, 0].set(jnp.nan)
  with pytest.raises(checkpoints.CheckpointError, match='NaN/Inf'):
    checkpoints.save(manager, 1, state=state, data_state={}, config=CONFIG)
  manager.wait_until_finished()
  assert manager.all_steps() == []


def test_checksums_see_every_single_bit():
  x = jnp.linspace(-3.0, 3.0, 64, dtype=jnp.float32)
  base, finite = checkpoints.array_checksums({'x': x})
  assert finite
  bits = np.asarray(x).view(np.uint32)
  for i, bit in [(0, 0), (17, 31), (63, 12)]:
    flipped = bits.copy()
    flipped[i] ^= np.uint32(1 << bit)
    got, _ = checkpoints.array_checksums({'x': jnp.asarray(flipped.view(np.float32))})
    assert got != base
  swapped = bits.copy()
  swapped[[3, 40]] = swapped[[40, 3]]
  got, _ = checkpoints.array_checksums({'x': jnp.asarray(swapped.view(np.float32))})
  assert got["['x']"][0] == base["['x']"][0] and got != base  # the position-mixed sum sees swaps


def test_checksums_see_negated_weights():
  # Version 1 summed the words: a sign bit adds 2**31 to both sums wherever it is, so two
  # negated weights, or a weight swapped with its negation elsewhere, verified as undamaged.
  x = np.linspace(0.5, 3.0, 1000, dtype=np.float32)
  x[20] = -x[10]  # a weight and its negation
  negated_two = x.copy()
  negated_two[[3, 700]] *= -1
  swapped = x.copy()
  swapped[[10, 20]] = swapped[[20, 10]]
  for damaged in (negated_two, swapped):
    for version in (1, 2):
      base = checkpoints.array_checksums({'x': jnp.asarray(x)}, version)[0]
      got = checkpoints.array_checksums({'x': jnp.asarray(damaged)}, version)[0]
      assert (got != base) == (version == 2), version  # version 1's blind spot, pinned


def _mix(h: np.ndarray) -> np.ndarray:
  """MurmurHash3's 32-bit finaliser in numpy (uint32 arithmetic wraps mod 2**32)."""
  with np.errstate(over='ignore'):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def reference_checksum(words: np.ndarray, version: int = checkpoints.CHECKSUM_VERSION) -> list:
  """The saved formats, in numpy, mod 2**32. Version 1: s0 = sum b_i, s1 = sum b_i (2i + 1);
  version 2: s0 = sum mix(b_i), s1 = sum mix(b_i + mix(i + 1))."""
  b = words.reshape(-1).astype(np.uint32)
  index = np.arange(b.size, dtype=np.uint32)
  if version == 1:
    b64 = b.astype(np.uint64)
    weights = index.astype(np.uint64) * 2 + 1
    return [int(b64.sum() % 2**32), int((b64 * weights % 2**32).sum() % 2**32)]
  with np.errstate(over='ignore'):
    second = _mix(b + _mix(index + np.uint32(1)))
  return [int(_mix(b).astype(np.uint64).sum() % 2**32), int(second.astype(np.uint64).sum() % 2**32)]


def test_checksums_keep_the_saved_format_for_every_dtype():
  # Checkpoints written by earlier versions must still verify: the per-leaf values are pinned to
  # a numpy reference of the format (32-bit words; narrower types widened), whatever program
  # computes them. Several leaves share a shape, as a train state's params and moments do.
  w = np.linspace(-2.0, 5.0, 3 * 70, dtype=np.float32).reshape(3, 70)
  half = (np.arange(70) - 30).astype(jnp.bfloat16)
  key = jax.random.key(7)
  tree = {
    'params': {'w': jnp.asarray(w), 'b': jnp.asarray(half)},
    'mu': {'w': jnp.asarray(w * 3), 'b': jnp.asarray(half)},
    'count': jnp.int32(-5),
    'mask': jnp.asarray(np.arange(9) % 2 == 0),
    'rng': key,
  }
  assert checkpoints.CHECKSUM_VERSION == 2  # what saves write
  for version in (1, 2):
    sums, finite = checkpoints.array_checksums(tree, version)
    assert finite
    assert sums == {
      "['count']": reference_checksum(np.array([-5], np.int32).view(np.uint32), version),
      "['mask']": reference_checksum((np.arange(9) % 2 == 0).astype(np.uint8), version),
      "['mu']['b']": reference_checksum(np.asarray(half).view(np.uint16), version),
      "['mu']['w']": reference_checksum((w * 3).view(np.uint32), version),
      "['params']['b']": reference_checksum(np.asarray(half).view(np.uint16), version),
      "['params']['w']": reference_checksum(w.view(np.uint32), version),
      "['rng']": reference_checksum(np.asarray(jax.random.key_data(key)), version),
    }
  half[5] = np.inf
  assert not checkpoints.array_checksums({**tree, 'mu': {'b': jnp.asarray(half)}})[1]


def test_parse_run():
  assert checkpoints.parse_run('runs/base64') == ('runs/base64', None)
  assert checkpoints.parse_run('runs/a@b/base64@1200') == ('runs/a@b/base64', 1200)
  for bad in ('runs/base64@', 'runs/base64@abc', '@12'):
    with pytest.raises(checkpoints.CheckpointError, match='RUN@STEP'):
      checkpoints.parse_run(bad)


def test_step_numbers_are_the_finished_step_folders(tmp_path):
  # A step being written carries orbax's temporary suffix; only number-named folders are saved.
  root = tmp_path / 'checkpoints'
  for name in ('10', '3', '12.orbax-checkpoint-tmp-1732', 'descriptor'):
    (root / name).mkdir(parents=True)
  (root / '7.txt').write_text('')
  assert checkpoints.step_numbers(root) == [3, 10]
  assert checkpoints.step_numbers(tmp_path / 'missing') == []
  assert checkpoints.step_numbers(root / '7.txt') == []


def test_a_home_relative_workdir_is_the_one_train_py_wrote(tmp_path, monkeypatch):
  # A quoted --workdir='~/run' reaches the program unexpanded; train.py expands it, and so must
  # every reader of that folder (sample.py, the out-of-memory message's checkpoint lookup).
  monkeypatch.setenv('HOME', str(tmp_path))
  assert checkpoints.parse_run('~/run@4') == (str(tmp_path / 'run'), 4)
  assert checkpoints.parse_run('~/run') == (str(tmp_path / 'run'), None)
  assert checkpoints.checkpoint_dir('~/run') == tmp_path / 'run' / 'checkpoints'
  assert checkpoints.describe_folder('~/run') == f'{tmp_path / "run"} does not exist'


def test_processes_agree_on_each_restore_attempt():
  ok = {'step': 6, 'error': None}
  bad = {'step': 6, 'error': 'checkpoint step 6 (/w/checkpoints/6): 2 arrays differ.'}
  assert checkpoints.agreed_failures(6, [ok]) == []
  assert checkpoints.agreed_failures(6, [bad]) == [bad['error']]  # one process: as before
  # A step that failed on one process only is a failure for every process.
  assert checkpoints.agreed_failures(6, [ok, bad]) == [f'process 1: {bad["error"]}']
  # A process that already fell back to step 4 while its peer restored 6: refused, naming both.
  fell_back = {'step': 4, 'error': None, 'earlier': [bad['error']]}
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.agreed_failures(6, [ok, fell_back])
  assert 'tried different checkpoint steps (process order: [6, 4])' in str(e.value)
  assert f'process 1: {bad["error"]}' in str(e.value)


def _never_retrieved_records(make_orphan) -> list[logging.LogRecord]:
  """What asyncio logs for an orphan (a task or future whose exception nobody retrieved, as the
  sibling reads of a damaged checkpoint are) made by make_orphan(loop), seen through the filter
  that `quiet_orbax_noise` puts on the 'asyncio' logger."""
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  handler.addFilter(checkpoints._DropOrbaxOrphanTaskErrors())
  asyncio_logger = logging.getLogger('asyncio')
  asyncio_logger.addHandler(handler)
  try:
    loop = asyncio.new_event_loop()
    orphan = make_orphan(loop)
    loop.run_until_complete(asyncio.sleep(0.01))  # it fails; nobody looks
    loop.close()
    del orphan
    gc.collect()  # asyncio reports the unretrieved exception here
  finally:
    asyncio_logger.removeHandler(handler)
  return [r for r in records if 'never retrieved' in r.getMessage()]


def _orphan_task_error_records(filename: str) -> list[logging.LogRecord]:
  """An orphan task whose coroutine is defined in `filename` (orbax's own tasks are)."""
  namespace = {}
  source = 'async def read():\n  raise ValueError("OUT_OF_RANGE: byte range not valid")\n'
  exec(compile(source, filename, 'exec'), namespace)
  return _never_retrieved_records(lambda loop: loop.create_task(namespace['read']()))


class _Pause:
  def __await__(self):
    yield


def _collect_a_read_unfinished(name: str) -> None:
  """A coroutine `name`, as orbax's read of one array's shard, collected while suspended: it
  raises its read error on the way out, which Python hands to the unraisable hook (each was
  printed as 'Exception ignored in: <coroutine ...>' with a TensorStore spec)."""
  namespace = {'_Pause': _Pause}
  source = (
    f'async def {name}():\n'
    '  try:\n'
    '    await _Pause()\n'
    '  except BaseException:\n'
    '    raise Exception("Encountered error while reading array index: (slice(0, 3, 1),)")\n'
  )
  exec(source, namespace)
  coroutine = namespace[name]()
  coroutine.send(None)  # suspended inside the read
  del coroutine
  gc.collect()


def test_unfinished_orbax_reads_of_a_damaged_step_print_nothing(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  checkpoints.quiet_orbax_noise()  # wraps the recorder above
  _collect_a_read_unfinished('_read_array_index_and_device_put')
  assert seen == []
  _collect_a_read_unfinished('my_own_reader')  # anything else still reaches the hook
  assert len(seen) == 1 and 'Encountered error' in str(seen[0].exc_value)


def test_orbax_orphan_task_errors_are_dropped_others_kept():
  assert _orphan_task_error_records('/x/site-packages/orbax/checkpoint/serialization.py') == []
  kept = _orphan_task_error_records('/x/site-packages/mylib/reader.py')
  assert len(kept) == 1 and 'mylib' in kept[0].getMessage()


def test_orphan_read_futures_of_a_step_that_failed_to_load_are_dropped_others_kept(two_steps):
  # Tensorstore's own futures carry no orbax frame; their error names the file they read. Found
  # as a hang in CI: ~5 KB of traceback per orphan, logged whenever the garbage collector met
  # one, filled a stderr pipe and stopped the process mid-restore (and its peer at the barrier).
  workdir, manager = two_steps

  def orphan_reading(step):
    def make(loop):
      future = loop.create_future()
      future.set_exception(
        ValueError(
          'DATA_LOSS: Error reading "params.w/.zarray" in OCDBT database at local file '
          f'"{checkpoints.step_dir(workdir, step)}/state/": Error reading Byte range [0, 328)'
        )
      )
      return future

    return make

  assert len(_never_retrieved_records(orphan_reading(2))) == 1  # step 2 has not failed (yet)
  error = checkpoints._does_not_load(manager, 2, ValueError('DATA_LOSS: ...'))
  assert str(error).startswith(f'checkpoint step 2 ({workdir / "checkpoints" / "2"}) does not load')
  assert _never_retrieved_records(orphan_reading(2)) == []
  for other in (1, 20):  # step 1 loaded, and step 20 is not step 2: their errors are news
    kept = _never_retrieved_records(orphan_reading(other))
    assert len(kept) == 1 and f'{workdir / "checkpoints" / str(other)}/' in kept[0].getMessage()


def test_out_of_memory_while_restoring_is_not_damage(tmp_path):
  # RESOURCE_EXHAUSTED placing the arrays says nothing about the files: it must reach the caller
  # as it is (train.py's out-of-memory line), not mark the step damaged and fall back.
  class Manager:
    directory = tmp_path / 'checkpoints'

    def all_steps(self):
      return [2, 4]

    def restore(self, step, args):
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes.')

  (tmp_path / 'checkpoints' / '4' / 'checksums').mkdir(parents=True)

  def stored_checksums(manager, step):
    return {'arrays': {}}

  with unittest.mock.patch.object(checkpoints, '_read_checksums', stored_checksums):
    with pytest.raises(jax.errors.JaxRuntimeError, match='RESOURCE_EXHAUSTED'):
      checkpoints.load(Manager(), 4, abstract_state={})
    with pytest.raises(jax.errors.JaxRuntimeError, match='RESOURCE_EXHAUSTED'):
      checkpoints.restore_with_fallback(
        Manager(), step=None, restore_fn=lambda s: checkpoints.load(Manager(), s, abstract_state={})
      )


def test_a_damaged_step_asked_for_names_the_other_kept_steps(tmp_path):
  class Manager:
    directory = tmp_path / 'checkpoints'

    def all_steps(self):
      return [2, 4, 6]

  def restore_fn(step):
    raise checkpoints.CheckpointError(f'checkpoint step {step}: 1 array differs.')

  with pytest.raises(checkpoints.CheckpointError) as raised:
    checkpoints.restore_with_fallback(Manager(), step=4, restore_fn=restore_fn)
  assert str(raised.value) == (
    'Checkpoint step 4, the one asked for, is not usable:\n  checkpoint step 4: 1 array differs.'
    '\nAsk for another kept step (2, 6), or for none to use the newest usable one.'
  )


def test_steps_removed_while_read_give_way_to_the_ones_saved_meanwhile(two_steps):
  """sample.py on a run still training with keep_checkpoints=1: the trainer saves a newer step
  and deletes the one being read. The new step is used; no 'restore from a backup' advice."""
  workdir, writer = two_steps
  reader = checkpoints.make_manager(workdir, read_only=True)
  target = abstract(state_at(1))
  saved_meanwhile = []

  def restore_fn(step):
    if not saved_meanwhile:  # the trainer saves step 3 and deletes 1 and 2 during this read
      checkpoints.save(writer, 3, state=state_at(3), data_state={'pos': 3}, config=CONFIG)
      writer.wait_until_finished()
      saved_meanwhile.append(3)
      for old in (1, 2):
        shutil.rmtree(checkpoints.step_dir(workdir, old))
    return checkpoints.load(reader, step, abstract_state=target)

  step, (state, data), failures = checkpoints.restore_with_fallback(
    reader, step=None, restore_fn=restore_fn
  )
  assert step == 3 and data == {'pos': 3} and int(state['step']) == 3
  assert failures == []  # removed steps are not damage ("newer checkpoints could not be used")

  # Removed with nothing saved since: the message says so, not that the folder is damaged.
  def remove_all(step):
    shutil.rmtree(checkpoints.step_dir(workdir, 3))
    return checkpoints.load(reader, step, abstract_state=target)

  reader.reload()
  with pytest.raises(checkpoints.CheckpointError) as raised:
    checkpoints.restore_with_fallback(reader, step=None, restore_fn=remove_all)
  assert 'removed while being read (steps [3])' in str(raised.value)
  assert 'backup' not in str(raised.value)
  reader.close()


def test_a_damaged_checksums_item_is_named_as_such(two_steps):
  # It was reported as 'its config does not load (... checksums/metadata)'.
  workdir, manager = two_steps
  meta = checkpoints.step_dir(workdir, 2) / 'checksums' / 'metadata'
  for damage in (lambda: meta.write_text(meta.read_text()[:10]), meta.unlink):
    damage()
    with pytest.raises(checkpoints.CheckpointError, match=r'step 2 .*: its checksums does not'):
      checkpoints.restore_config(manager, 2)
  assert checkpoints.restore_config(manager, 1).to_dict() == CONFIG.to_dict()  # the other is fine


def test_a_step_that_lost_its_checksums_is_not_used_unverified(two_steps, caplog):
  workdir, manager = two_steps
  target = abstract(state_at(2))
  shutil.rmtree(checkpoints.step_dir(workdir, 2) / 'checksums')  # then a bit may rot unseen
  step, _, failures = checkpoints.restore_with_fallback(
    manager, step=None, restore_fn=lambda s: checkpoints.load(manager, s, abstract_state=target)
  )
  assert step == 1 and 'checksums item is missing' in failures[0]
  # A step saved before checksums existed (its orbax metadata lists no such item) still loads,
  # unverified, with a warning.
  meta_file = checkpoints.step_dir(workdir, 2) / '_CHECKPOINT_METADATA'
  meta = json.loads(meta_file.read_text())
  del meta['item_handlers']['checksums']
  meta_file.write_text(json.dumps(meta))
  with caplog.at_level(logging.WARNING):
    config = checkpoints.restore_config(manager, 2)
    state, _ = checkpoints.restore(manager, 2, abstract_state=target)
  assert int(state['step']) == 2 and config is not None
  assert caplog.text.count('restored unverified') == 1  # not once for the config, then the state


def test_a_run_folder_named_with_an_at_sign(tmp_path):
  # train.py takes --workdir=runs/lr@3e-4 and runs/exp@2: sample.py must read them as runs.
  for run in ('lr@3e-4', 'exp@2', 'exp', 'only@5'):
    if run != 'only@5':
      (tmp_path / run / 'checkpoints').mkdir(parents=True)
  assert checkpoints.parse_run(f'{tmp_path}/lr@3e-4') == (f'{tmp_path}/lr@3e-4', None)
  assert checkpoints.parse_run(f'{tmp_path}/only@5') == (f'{tmp_path}/only', 5)
  with pytest.raises(checkpoints.CheckpointError, match='names both the run folder'):
    checkpoints.parse_run(f'{tmp_path}/exp@2')
  shutil.rmtree(tmp_path / 'exp')
  assert checkpoints.parse_run(f'{tmp_path}/exp@2') == (f'{tmp_path}/exp@2', None)


def test_a_step_set_aside_by_a_resume_is_pointed_to(two_steps):
  # 'run@2' for a step that a resume to step 1 moved to checkpoints_set_aside/ said only that
  # it is not kept.
  workdir, manager = two_steps
  checkpoints.set_aside_newer(workdir, 1, manager)
  with pytest.raises(checkpoints.CheckpointError) as raised:
    checkpoints.candidate_steps(manager, 2)
  aside = workdir.absolute() / checkpoints.SET_ASIDE_DIR / '2'
  assert 'kept steps: [1]' in str(raised.value)
  assert f'set step 2 aside, to {aside}; move it back into' in str(raised.value)
  with pytest.raises(checkpoints.CheckpointError) as raised:
    checkpoints.candidate_steps(manager, 3)
  assert 'A resume' not in str(raised.value)


def test_background_writes_still_running_are_waited_for():
  # After a failed save orbax's wait returns at the first failed write while sibling writes go on
  # in their commit threads; train.py then exited with them still writing, and one printed
  # "cannot schedule new futures after interpreter shutdown" with its traceback (seen in a full
  # test run, in fault_test's few-inodes case). The run's clean-up now waits for them.
  from orbax.checkpoint._src.futures import future as orbax_future

  async def write(seconds):
    await asyncio.sleep(seconds)

  orbax_future.CommitFuture(write(0.5), name='a sibling write')
  assert 'a sibling write' in [t.name for t in checkpoints._orbax_write_threads()]
  assert 'a sibling write' not in checkpoints.wait_for_background_writes()
  assert 'a sibling write' not in [t.name for t in checkpoints._orbax_write_threads()]
  # A bounded wait: one still running is named.
  orbax_future.CommitFuture(write(2.0), name='a slow write')
  assert 'a slow write' in checkpoints.wait_for_background_writes(timeout=0.1)
  assert 'a slow write' not in checkpoints.wait_for_background_writes()
