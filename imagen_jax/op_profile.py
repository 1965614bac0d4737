"""Where a compiled step's time goes: a profiler trace, grouped by kind of op and by phase.

  with op_profile.traced(trace_dir):
    for _ in range(n):
      jax.block_until_ready(compiled(*args))
  summary = op_profile.summarize(trace_dir, compiled.as_text(), steps=n)

Each op event of the trace (an XLA:CPU thunk, or a GPU kernel through its `hlo_op`) is
matched to its instruction in the compiled HLO, which gives its kind: 'attention' (a fused
attention kernel), 'conv', 'dot', 'reduce', 'collective', 'copy' (layout moves: copy,
transpose, pad, slice, concatenate...), 'elementwise' (everything else) and its phase from
the op's name stack: 'optimizer' (under `jax.named_scope('optimizer')`), 'backward'
(under a `transpose(...)` of autodiff), 'forward', or 'unknown'; a fusion takes the latest
phase among its instructions (in that order, optimizer latest). An op without any name (XLA:CPU
drops the metadata of the kernel-gradient convolutions it hands to YNNPACK) takes the latest
phase among its operands, since a forward op reads no gradient; 'unknown' is left for ops that
read only parameters and constants. Op events that
match no instruction are summed as 'unmapped' and their heaviest names listed, never
dropped or guessed; an op event is a span named like an op on a device's timeline (GPU/TPU),
or a span whose args name an HLO op or module (the host's own spans, such as dispatch,
argument parsing and the collectives' rendezvous waits, carry neither). Control-flow
instructions (while, conditional, call) are skipped: their bodies' ops are counted themselves.

Times are summed over all threads or streams, so on a CPU running ops concurrently the op
time per step can exceed the wall time (`summary['op_ms_per_step']` vs the caller's step
time).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gzip
import json
import pathlib
import re

KINDS = ('attention', 'conv', 'dot', 'reduce', 'collective', 'copy', 'elementwise')
PHASES = ('forward', 'backward', 'optimizer', 'unknown')

_COLLECTIVES = {
  'all-reduce',
  'all-gather',
  'reduce-scatter',
  'all-to-all',
  'collective-permute',
  'all-reduce-start',
  'all-gather-start',
  'collective-permute-start',
}
_MOVES = {
  'copy',
  'transpose',
  'bitcast',
  'broadcast',
  'reshape',
  'slice',
  'dynamic-slice',
  'dynamic-update-slice',
  'concatenate',
  'pad',
  'parameter',
  'constant',
  'tuple',
  'get-tuple-element',
  'iota',
  'copy-start',
  'copy-done',
}
_CONTROL = {'while', 'conditional', 'call'}
_INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')


@dataclasses.dataclass(frozen=True)
class Op:
  kind: str
  phase: str
  shape: str


def _kind_of_ops(ops: set[str], targets: set[str]) -> str:
  text = ' '.join(targets).lower()
  # cuDNN's fused attention, or a Mosaic kernel on TPU (this project's only Pallas kernel is
  # splash attention).
  if 'fmha' in text or 'tpu_custom_call' in text or 'flash' in text:
    return 'attention'
  if 'convolution' in ops or 'conv' in text:
    return 'conv'
  if 'dot' in ops or 'gemm' in text or 'matmul' in text or 'cublas' in text:
    return 'dot'
  if ops & {'reduce', 'reduce-window', 'select-and-scatter'}:
    return 'reduce'
  if ops & _COLLECTIVES:
    return 'collective'
  if ops and ops <= _MOVES:
    return 'copy'
  return 'elementwise'


_PHASE_ORDER = ('unknown', 'forward', 'backward', 'optimizer')  # later wins in a fusion


def _phase(line: str) -> str:
  match = re.search(r'op_name="([^"]*)"', line)
  if not match:
    return 'unknown'
  name = match.group(1)
  if re.search(r'(^|/)optimizer(/|$)', name):
    return 'optimizer'
  return 'backward' if 'transpose(' in name else 'forward'


def hlo_ops(hlo_text: str) -> dict[str, Op]:
  """Instruction name -> Op (kind, phase, result shape) for every instruction of a compiled
  HLO module's text (`compiled.as_text()`); control flow gets kind 'control'."""
  bodies: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      match = _COMPUTATION.match(line)
      current = match.group(1) if match else None
      if current:
        bodies[current] = []
    elif current is not None and line.strip():
      bodies[current].append(line)

  def contents(lines: list[str], seen: set[str]) -> tuple[set[str], set[str], str]:
    """Opcodes, custom-call targets / fusion kinds, and the latest phase (optimizer, then
    backward, then forward) of the instructions in `lines` and the computations they call
    (fusions often carry no name stack themselves, and one that reads a parameter to update
    it starts with the parameter's forward name); `seen`: computations already read."""
    ops, targets, phase = set(), set(), 'unknown'
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match:
        ops.add(match.group(3))
      targets.update(re.findall(r'custom_call_target="([^"]+)"', line))
      targets.update(re.findall(r'"kind":"([^"]+)"', line))
      phase = max(phase, _phase(line), key=_PHASE_ORDER.index)
      for called in re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', line):
        if called in seen:
          continue
        seen.add(called)
        inner_ops, inner_targets, inner_phase = contents(bodies.get(called, []), seen)
        ops |= inner_ops
        targets |= inner_targets
        phase = max(phase, inner_phase, key=_PHASE_ORDER.index)
    return ops, targets, phase

  result = {}
  for lines in bodies.values():
    for line in lines:  # in order: an instruction's operands are defined above it
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      name, shape, opcode = match.groups()
      shape = shape.split('{')[0]
      if opcode in _CONTROL:
        result[name] = Op('control', 'unknown', shape)
        continue
      ops, targets, phase = contents([line], set())
      if phase == 'unknown':  # no name anywhere: the latest phase among the operands
        operands = re.findall(r'%([\w.\-]+)', line[match.end() :].split(')', 1)[0])
        phases = [result[o].phase for o in operands if o in result]
        phase = max(['unknown', *phases], key=_PHASE_ORDER.index)
      ops.discard('fusion')  # what a fusion is, is what it calls
      result[name] = Op(_kind_of_ops(ops, targets), phase, shape)
  return result


@contextlib.contextmanager
def traced(trace_dir: str | pathlib.Path):
  """`jax.profiler.trace` into trace_dir (created)."""
  import jax

  pathlib.Path(trace_dir).mkdir(parents=True, exist_ok=True)
  with jax.profiler.trace(str(trace_dir)):
    yield


def _trace_events(trace_dir: str | pathlib.Path) -> tuple[list[dict], bool]:
  """The complete spans of the newest trace under trace_dir, and whether they are a device's
  (GPU/TPU: only the device's spans are kept; False: a CPU-only trace, the host's spans)."""
  files = sorted(pathlib.Path(trace_dir).rglob('*.trace.json.gz'), key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(
      f'no *.trace.json.gz under {trace_dir}: was the profiler trace written?'
    )
  with gzip.open(files[-1], 'rt') as f:
    events = json.load(f).get('traceEvents', [])
  device_pids = {
    e['pid']
    for e in events
    if e.get('ph') == 'M'
    and e.get('name') == 'process_name'
    and '/device:' in str(e.get('args', {}).get('name', ''))
  }
  spans = [e for e in events if e.get('ph') == 'X' and 'dur' in e]
  if device_pids:  # GPU/TPU: the kernels on the device, not the host's launches
    spans = [e for e in spans if e.get('pid') in device_pids]
  return spans, bool(device_pids)


def _is_op_event(event: dict, on_device: bool) -> bool:
  """Whether a span that matched no instruction is an op's (counted as unmapped): one whose
  args name an HLO op or module (as XLA:CPU's thunks do), or, on a device's timeline, any span
  named like an op (kernels and copies, whatever their args). On a CPU-only trace the host's
  own spans share the timeline and carry neither arg: ExecuteReplicated.__call__, shard_args,
  ParseArguments, and the Rendezvous waits inside a collective op that is counted already."""
  args = event.get('args') or {}
  if 'hlo_op' in args or 'hlo_module' in args:
    return True
  return on_device and re.match(r'^[\w.\-]+$', str(event.get('name', ''))) is not None


def _lookup(event: dict, ops: dict[str, Op]) -> tuple[str, Op | None]:
  args = event.get('args') or {}
  for name in (args.get('hlo_op'), event.get('name')):
    if not name:
      continue
    name = str(name)
    if name in ops:
      return name, ops[name]
    dotted = re.sub(r'_(\d+)$', r'.\1', name)  # kernel names spell fusion.12 as fusion_12
    if dotted in ops:
      return dotted, ops[dotted]
  return str(args.get('hlo_op') or event.get('name')), None


def summarize(trace_dir: str | pathlib.Path, hlo_text: str, *, steps: int, top: int = 10) -> dict:
  """Milliseconds per step by kind and by phase, and the `top` heaviest ops, from the trace
  of `steps` runs of the compiled module whose HLO text is `hlo_text`."""
  if steps < 1:
    raise ValueError(f'steps={steps}: profile at least one step.')
  ops = hlo_ops(hlo_text)
  by_kind = collections.defaultdict(float)
  by_phase = collections.defaultdict(float)
  by_op = collections.defaultdict(float)
  unmapped = collections.defaultdict(float)
  events, on_device = _trace_events(trace_dir)
  for event in events:
    name, op = _lookup(event, ops)
    ms = float(event['dur']) / 1e3 / steps  # trace durations are microseconds
    if op is None:
      if _is_op_event(event, on_device):
        unmapped[name] += ms
      continue
    if op.kind == 'control':  # a loop's or call's own span; its body's ops count themselves
      continue
    by_kind[op.kind] += ms
    by_phase[op.phase] += ms
    by_op[name] += ms
  heaviest = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
  mapped = sum(by_kind.values())
  return {
    'steps': steps,
    'op_ms_per_step': round(mapped, 3),
    'by_kind_ms': {k: round(by_kind[k], 3) for k in KINDS if k in by_kind},
    'by_phase_ms': {k: round(by_phase[k], 3) for k in PHASES if k in by_phase},
    'top_ops': [[name, round(ms, 3), ops[name].kind, ops[name].shape] for name, ms in heaviest],
    'unmapped_ms_per_step': round(sum(unmapped.values()), 3),
    'top_unmapped': [
      [name, round(ms, 3)] for name, ms in sorted(unmapped.items(), key=lambda kv: -kv[1])[:5]
    ],
  }
