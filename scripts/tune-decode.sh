#!/usr/bin/env bash
# Sweeps the per-CPU tuning of the decode matmuls on this machine, to fill in
# (or check) its row of the table in kernels/src/cpu/dispatch.rs. Streams a
# model-sized set of Phi-2-shaped matrices once per pass (one activation row:
# a decode step) with each MIPHA_TUNING value and prints GB/s per value; run it
# on a quiet machine and compare with `mipha-bench`'s memory-read probe.
#
#   scripts/tune-decode.sh [TYPES] [GB]     e.g. scripts/tune-decode.sh "q4_0 q8_0 bf16" 1.5
#   PREFETCH="0 1024 2048 4096 8192" THREADS=2 scripts/tune-decode.sh
set -euo pipefail
types=${1:-"q4_0 q8_0 f16 bf16"}
gb=${2:-1.5}
prefetch=${PREFETCH:-"0 1024 2048 4096 8192 16384"}
cargo build -q --release -p mipha-kernels --example batch_decode_speed
bin=target/release/examples/batch_decode_speed
export RAYON_NUM_THREADS=${THREADS:-2}
grep -m1 "model name" /proc/cpuinfo || true
echo "threads: $RAYON_NUM_THREADS; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for ty in $types; do
    for p in $prefetch; do
        line=$(MIPHA_TUNING="weight_prefetch=$p" "$bin" "$ty" "$gb" 1 | tail -1)
        echo "$ty weight_prefetch=$p: $line"
    done
done
