#!/usr/bin/env bash
# The accelerator benchmark set of the speed issue: bench/unet.py points in priority order,
# bfloat16, one process and one JSON line each, appended to OUT_DIR/unet.jsonl as they finish.
#
#   bash bench/accelerator.sh [OUT_DIR] [FIRST_POINT]
#   PY=python3 DEADLINE=540 bash bench/accelerator.sh /tmp/bench 0
#
# DEADLINE (seconds from the start, default 3000) bounds the whole set: a point gets at most its own
# limit and what is left of the deadline, and is skipped (an "error" line saying so) when less than
# its minimum is left (base64's compile alone takes 84-153 s on an H100); one that runs out or fails
# prints a line with "error" and the set goes on. FIRST_POINT skips the points before it (to
# continue a set that a deadline cut short). PROFILE_STEPS (default 3; 0 = off) more steps of each
# point are traced and summarised by kind of op and by phase ("profile" in its line). Points 0 and 1
# are the same small64 point with a fresh persistent compilation cache: point 1's compile_s is a
# second start's (reload, no compile; its "compile" and "sample_compile" read "loaded from the
# persistent compilation cache", point 0's "compiled"). Points 8 and 9 repeat point 4 with the other
# ways of fixing the gradients' layout before the optimizer (optim.settle_gradients), to compare
# with one call: POINTS="4 8 9" (point 8's row-major gradients with the row-major state they were
# made for). Every point times train.py's step (bench/unet.py --step train: EMA, gradient norm);
# point 10 is point 4 with --step=bare, the step of the earlier H100/H200 rows, so POINTS="4 10"
# shows what the EMA costs. Every point stores the state as training does (bench/unet.py
# --state_layout=auto: on GPU the conv kernels, their EMA and moments [O, kh, kw, I], as cuDNN takes
# them); points 11 and 12 are points 10 and 4 with the row-major state of the rows before 2026-11-27
# (--state_layout=default), point 13 is point 10 without the gradient barrier. SAMPLE_STEPS
# (default: as --steps; 0 = none) sets the timed guided sampling steps of every point. POINTS (a
# space-separated list of point numbers) runs those points in that order instead; TRACE_POINTS (same
# form) keeps those points' profiler traces and train-step HLO as OUT_DIR/trace_<n>.json.gz and
# OUT_DIR/hlo_<n>.txt.gz. A relative OUT_DIR or CACHE is read from the caller's folder; CACHE (the
# compilation cache, deleted when point 0 runs) must lie outside the repository.
set -u
# Made absolute before the cd to the repository.
out=$(realpath -m -- "${1:-/tmp/imagen_jax_bench}")
cache=$(realpath -m -- "${CACHE:-/tmp/imagen_jax_bench_cache}")
root=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$root" || exit 2
first=${2:-0}
read -ra py <<<"${PY:-python3}"  # a command: words split on spaces (e.g. "python3 -X dev")
deadline=${DEADLINE:-3000}
usage_error() {
  echo "accelerator.sh: $1" >&2
  exit 2
}
[[ "$deadline" =~ ^[0-9]+$ ]] ||
  usage_error "DEADLINE '$deadline' is not a whole number of seconds; give e.g. DEADLINE=600."
deadline=$((10#$deadline))  # decimal: a leading 0 would read as octal
[[ "${PROFILE_STEPS:-3}" =~ ^[0-9]+$ ]] ||
  usage_error "PROFILE_STEPS '${PROFILE_STEPS}' is not a whole number; give e.g. PROFILE_STEPS=3 (0: off)."
[[ "${SAMPLE_STEPS:--1}" =~ ^(-1|[0-9]+)$ ]] ||
  usage_error "SAMPLE_STEPS '${SAMPLE_STEPS}' is not a whole number; give e.g. SAMPLE_STEPS=10 (0: none)."
# Point 0 deletes CACHE to start with a fresh one: never the repository, a folder in it or above
# it, / or the home folder.
if [ "$cache" = / ] || [ "$cache" = "${HOME:-}" ] || [[ "$cache/" == "$root/"* ]] ||
  [[ "$root/" == "$cache/"* ]]; then
  usage_error "CACHE '$cache' is the repository, a folder in it or above it, / or the home folder; point 0 deletes CACHE, so give a folder of its own, e.g. CACHE=/tmp/imagen_jax_bench_cache."
fi
mkdir -p "$out"
start=$SECONDS

# Each point: its time limit, the least time worth starting it with (seconds), its flags.
points=(
  "300 60 --preset=small64 --batch=32 --compilation_cache=$cache"
  "120 30 --preset=small64 --batch=32 --compilation_cache=$cache"
  "300 60 --preset=small64 --batch=128"
  "420 150 --preset=base64 --batch=16 --remat=block"
  "420 150 --preset=base64 --batch=16 --remat=none"
  "420 220 --preset=base64 --batch=64 --remat=block"
  "420 220 --preset=base64 --batch=64 --remat=none"
  "420 180 --preset=sr256 --resolution=256 --batch=4 --remat=block --optimizer=adafactor"
  "420 150 --preset=base64 --batch=16 --remat=none --grad_layout=row_major --state_layout=default"
  "420 150 --preset=base64 --batch=16 --remat=none --grad_layout=none"
  "420 150 --preset=base64 --batch=16 --remat=none --step=bare"
  "420 150 --preset=base64 --batch=16 --remat=none --step=bare --state_layout=default"
  "420 150 --preset=base64 --batch=16 --remat=none --state_layout=default"
  "420 150 --preset=base64 --batch=16 --remat=none --step=bare --grad_layout=none"
)
last=$((${#points[@]} - 1))
if ! [[ "$first" =~ ^[0-9]+$ ]] || [ "$first" -gt "$last" ]; then
  usage_error "FIRST_POINT '$first' does not exist; give a number 0-$last."
fi
order=${POINTS:-$(seq -s ' ' "$first" "$last")}
for i in $order; do
  if ! [[ "$i" =~ ^[0-9]+$ ]] || [ "$i" -gt "$last" ]; then
    usage_error "point '$i' in POINTS does not exist; give numbers 0-$last."
  fi
done
for i in ${TRACE_POINTS:-}; do
  if ! [[ "$i" =~ ^[0-9]+$ ]] || [ "$i" -gt "$last" ]; then
    usage_error "point '$i' in TRACE_POINTS does not exist; give numbers 0-$last."
  fi
done
case " $(echo $order) " in *" 0 "*) [ "$cache" != / ] && rm -rf "$cache" ;; esac

for i in $order; do
  read -r limit least args <<<"${points[$i]}"
  trace=()
  case " ${TRACE_POINTS:-} " in *" $i "*) rm -rf "$out/trace.d" && trace=(--trace_dir="$out/trace.d") ;; esac
  left=$((deadline - (SECONDS - start)))
  if [ "$left" -lt "$least" ]; then
    echo "# deadline: ${left}s left, point $i needs ${least}s: skipped" >&2
    echo "{\"point\": $i, \"args\": \"$args\", \"error\": \"skipped: ${left}s left of DEADLINE, the point needs ${least}s\"}" | tee -a "$out/unet.jsonl"
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "# $(date +%T) point $i (limit ${limit}s): $args" >&2
  # shellcheck disable=SC2086  # args is a word list by design
  timeout "$limit" "${py[@]}" bench/unet.py --dtype=bfloat16 --steps=10 \
    --profile_steps="${PROFILE_STEPS:-3}" --sample_steps="${SAMPLE_STEPS:--1}" "${trace[@]}" $args \
    >"$out/point.out" 2>"$out/point.err"
  rc=$?
  if [ -d "$out/trace.d" ]; then
    find "$out/trace.d" -name '*.trace.json.gz' -exec cp {} "$out/trace_$i.json.gz" \;
    gzip -c "$out/trace.d/train_step.hlo.txt" >"$out/hlo_$i.txt.gz" 2>/dev/null
    rm -rf "$out/trace.d"
  fi
  line=$(grep '^{' "$out/point.out" | tail -n 1)
  if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
    # One JSON string: quotes and backslashes replaced, all but printable ASCII dropped (tabs,
    # colour codes, and multibyte characters that the byte cut could split).
    why=$(tail -n 3 "$out/point.err" | tr '\n\t"\\' '   /' | LC_ALL=C tr -cd ' -~' | cut -c 1-600)
    [ "$rc" -eq 124 ] && why="ran past ${limit}s. $why"
    line="{\"point\": $i, \"args\": \"$args\", \"error\": \"exit $rc: $why\"}"
    tail -n 40 "$out/point.err" >>"$out/errors.log"
  fi
  echo "$line" | tee -a "$out/unet.jsonl"
done
rm -f "$out/point.out" "$out/point.err"
