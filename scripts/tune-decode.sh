#!/usr/bin/env bash
# Sweeps the per-CPU tuning of the decode matmuls on this machine, to fill in
# (or check) its row of the table in kernels/src/cpu/dispatch.rs. Streams a
# model-sized set of Phi-2-shaped matrices once per pass (one activation row:
# a decode step) with each MIPHA_TUNING value and prints GB/s per value; run it
# on a quiet machine and compare with `mipha-bench`'s memory-read probe.
#
#   scripts/tune-decode.sh [TYPES] [GB]     e.g. scripts/tune-decode.sh "q4_0 q8_0 bf16" 1.5
#   PREFETCH="0 4096:l1 16384:l2" THREADS=2 scripts/tune-decode.sh
# Q8_0/Q4_0 set int8_prefetch, F16/BF16 float_prefetch (BYTES or BYTES:l1|l2).
set -euo pipefail
types=${1:-"q4_0 q8_0 f16 bf16"}
gb=${2:-1.5}
prefetch=${PREFETCH:-"0 2048:l1 4096:l1 8192:l1 8192:l2 16384:l2 32768:l2"}
cargo build -q --release -p mipha-kernels --example batch_decode_speed
bin=target/release/examples/batch_decode_speed
export RAYON_NUM_THREADS=${THREADS:-2}
grep -m1 "model name" /proc/cpuinfo || true
echo "threads: $RAYON_NUM_THREADS; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for ty in $types; do
    for p in $prefetch; do
        case $ty in q*) key=int8_prefetch ;; *) key=float_prefetch ;; esac
        line=$(MIPHA_TUNING="$key=$p" "$bin" "$ty" "$gb" 1 | tail -1)
        echo "$ty $key=$p: $line"
    done
done
