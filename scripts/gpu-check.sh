#!/usr/bin/env bash
# Runs the GPU suite on the device machine from prebuilt binaries (it builds
# nothing: that machine has no Rust toolchain). scripts/gpu-build.sh fills gpu-bin/
# beforehand, on any machine. Every test binary in gpu-bin/tests runs (one test
# thread, so kernels do not share the GPU), then the timing tests (ignored by
# default), then mipha-bench if it was built with --device; one markdown summary
# table is printed last. Logs go to $OUT (the run tool's folder) or gpu-bin/logs.
#
# Environment: GPU_BIN (default gpu-bin), TEST_TIMEOUT (seconds per binary,
# default 240), BENCH_TIMEOUT (default 240), BENCH_ARGS (extra mipha-bench
# arguments), MIPHA_CUDA_CACHE (NVRTC cache; default under the log folder).
# Exit status: 0 when nothing failed (skips are not failures), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${GPU_BIN:-gpu-bin}
LOGS=${OUT:-$BIN/logs}
mkdir -p "$LOGS"
export MIPHA_CUDA_CACHE=${MIPHA_CUDA_CACHE:-$LOGS/cuda-cache}
export RUST_BACKTRACE=1

if [ ! -d "$BIN/tests" ]; then
    echo "no $BIN/tests: run scripts/gpu-build.sh first (and carry $BIN)" >&2
    exit 2
fi

# NVRTC and cuBLAS may be installed outside the loader's path (a CUDA toolkit under
# /usr/local, or the nvidia-* Python wheels): add the folders that hold them.
extra=""
for pat in 'libnvrtc.so*' 'libcublas.so*' 'libcublasLt.so*'; do
    for d in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu \
        /usr/local/lib/python3*/dist-packages/nvidia/*/lib /usr/lib/python3*/dist-packages/nvidia/*/lib \
        /usr/local/lib/python3*/site-packages/nvidia/*/lib "$HOME"/.local/lib/python3*/site-packages/nvidia/*/lib; do
        if compgen -G "$d/$pat" >/dev/null 2>&1; then
            case ":$extra:" in *":$d:"*) ;; *) extra="$extra:$d" ;; esac
        fi
    done
done
export LD_LIBRARY_PATH="${extra#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== machine"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } || echo "(no nvidia-smi)"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
[ -f "$BIN/commit" ] && echo "binaries from commit $(cat "$BIN/commit")"

rows=()
failed=0
add_row() { rows+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }

run_tests() { # name binary label extra-args...
    local name=$1 bin=$2 label=$3
    shift 3
    local log="$LOGS/$label.log" t0 t1 rc
    t0=$(date +%s.%N)
    # --nocapture: the skip messages (and seeds) of passing tests reach the log
    timeout "${TEST_TIMEOUT:-240}" "$bin" --test-threads=1 --nocapture "$@" >"$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local secs passed fails skips status
    secs=$(awk "BEGIN{printf \"%.1f\", $t1-$t0}")
    passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END{print s+0}')
    fails=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END{print s+0}')
    skips=$(grep -c 'skipping: no CUDA device' "$log")
    if [ $rc -eq 124 ]; then
        status="TIMEOUT"
    elif [ $rc -ne 0 ]; then
        status="FAIL"
    elif [ "$skips" -gt 0 ]; then
        status="SKIP (no device)"
    else
        status="PASS"
    fi
    case $status in PASS | "SKIP (no device)") ;; *)
        failed=1
        echo "---- $label: $status (last 60 lines of $log)"
        tail -n 60 "$log"
        ;;
    esac
    add_row "$label" "$status" "$passed" "$fails" "$skips" "$secs"
}

echo "== tests"
for b in "$BIN"/tests/*; do
    [ -x "$b" ] || continue
    n=$(basename "$b")
    echo "-- $n"
    run_tests "$n" "$b" "$n"
done

# Timing tests are #[ignore]d (slow, and meaningless without a GPU); their
# `BENCH name value unit` lines go into the table.
bench_lines=()
for b in "$BIN"/tests/*timing*; do
    [ -x "$b" ] || continue
    n=$(basename "$b")
    echo "-- $n --ignored"
    run_tests "$n" "$b" "$n (timings)" --ignored
    while IFS= read -r l; do bench_lines+=("$l"); done < <(grep '^BENCH ' "$LOGS/$n (timings).log" || true)
done

echo "== bench"
bench_status="not built"
if [ -x "$BIN/mipha-bench" ]; then
    if "$BIN/mipha-bench" --help 2>&1 | grep -q -- '--device'; then
        # shellcheck disable=SC2086
        if timeout "${BENCH_TIMEOUT:-300}" "$BIN/mipha-bench" --device cuda ${BENCH_ARGS:---quick} \
            --json-out "$LOGS/mipha-bench.jsonl" >"$LOGS/mipha-bench.log" 2>&1; then
            bench_status="ok (see mipha-bench.log)"
        else
            bench_status="FAIL (rc $?, see mipha-bench.log)"
            failed=1
            tail -n 40 "$LOGS/mipha-bench.log"
        fi
    else
        bench_status="skipped: this mipha-bench has no --device"
    fi
fi

echo
echo "## GPU check summary"
echo
echo "| suite | result | passed | failed | skipped (no device) | seconds |"
echo "| --- | --- | --- | --- | --- | --- |"
for r in "${rows[@]}"; do echo "$r"; done
echo "| mipha-bench | $bench_status | | | | |"
if [ ${#bench_lines[@]} -gt 0 ]; then
    echo
    echo "| kernel timing | value | unit |"
    echo "| --- | --- | --- |"
    for l in "${bench_lines[@]}"; do
        # BENCH <name> <value> <unit...>
        set -- $l
        name=$2 val=$3
        shift 3
        echo "| $name | $val | $* |"
    done
fi
# The bench's figures (JSON lines, written as they were measured, so a run cut
# short still shows what it got).
if [ -s "$LOGS/mipha-bench.jsonl" ]; then
    echo
    echo "| bench figure | quant | tokens | median (min-max) | unit | of bound |"
    echo "| --- | --- | --- | --- | --- | --- |"
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$LOGS/mipha-bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        f = json.loads(line)
    except ValueError:
        continue
    num = lambda v: "" if v is None else (f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}")
    frac = f.get("bound_fraction")
    print(f"| {f['figure']} | {f.get('quant') or ''} | {f.get('tokens') or ''} | "
          f"{num(f.get('median'))} ({num(f.get('min'))}-{num(f.get('max'))}) | {f.get('unit')} | "
          f"{'' if frac is None else f'{100 * frac:.0f}%'} |")
PY
    else
        sed 's/^/    /' "$LOGS/mipha-bench.jsonl"
    fi
fi
exit $failed
