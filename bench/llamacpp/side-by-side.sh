#!/usr/bin/env bash
# One side-by-side run of mipha-bench and llama.cpp's llama-bench on this machine, 2 threads, as
# recorded in bench/RESULTS.md. Run from the repository root on an idle machine:
#   LLAMA_BENCH=path/to/llama-bench GGUF_DIR=dir/with/phi2-{q4_0,q8_0,f16,bf16}.gguf \
#     OUT=runs bench/llamacpp/side-by-side.sh
# (GGUF files: bench/llamacpp/make-gguf.py, then llama-quantize phi2-f16.gguf phi2-q4_0.gguf Q4_0,
# and the same for Q8_0 and BF16.)
set -uo pipefail
: "${LLAMA_BENCH:?set LLAMA_BENCH to llama-bench}" "${GGUF_DIR:?set GGUF_DIR}"
OUT=${OUT:-runs}
mkdir -p "$OUT"
cargo build -q --release -p mipha-bench
ours() {
    ./target/release/mipha-bench --quant "$1" --threads 2 --reps 2 --prompt 512 --decode-ctx 16,1024 \
        --streams 0 --image-streams 0 --json-out "$OUT/ours-$2.jsonl" >"$OUT/ours-$2.txt" 2>&1
}
date -u +%FT%TZ >"$OUT/start"
ours q4_0,q8_0 int8
for q in q4_0 q8_0 f16; do
    "$LLAMA_BENCH" -m "$GGUF_DIR/phi2-$q.gguf" -t 2 -r 2 -p 512 -n 0 -o jsonl >"$OUT/llama-$q-pp.jsonl"
    "$LLAMA_BENCH" -m "$GGUF_DIR/phi2-$q.gguf" -t 2 -r 2 -p 0 -n 128 -d 0,1024 -o jsonl >"$OUT/llama-$q-tg.jsonl"
done
# llama.cpp's BF16 is slow where the CPU lacks AVX512_BF16: a short run
"$LLAMA_BENCH" -m "$GGUF_DIR/phi2-bf16.gguf" -t 2 -r 1 -p 64 -n 16 -o jsonl >"$OUT/llama-bf16.jsonl"
ours f16,bf16 float
date -u +%FT%TZ >"$OUT/end"
