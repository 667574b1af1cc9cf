#!/usr/bin/env bash
# Builds, on a machine with no CUDA (this one), everything scripts/gpu-check.sh runs
# on the GPU machine, which has no Rust toolchain:
#   gpu-bin/tests/<name>   the CUDA test binaries (cargo test --no-run, release)
#   gpu-bin/mipha-bench    the bench binary, built with the cuda feature
# gpu-bin/ is git-ignored; carry it to the device machine (run tool: carry
# ["gpu-bin"]) and run `bash scripts/gpu-check.sh` there. See docs/cuda.md.
#
# Environment: GPU_BIN (output folder, default gpu-bin), GPU_PACKAGES (cargo package
# selection, default "-p mipha-kernels -p mipha-runtime -p mipha-tests", the crates
# with CUDA tests -- kernels, backend, the golden pipeline; "--workspace" for
# everything), GPU_TESTS (regex of test targets to copy, default ^cuda), NICE
# (default 19: other work shares this machine), CARGO_TARGET_DIR (honoured).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${GPU_BIN:-gpu-bin}
PATTERN=${GPU_TESTS:-^cuda}
FEATURES=mipha-runtime/cuda,mipha-kernels/cuda
NICE=${NICE:-19}
PACKAGES=${GPU_PACKAGES:--p mipha-kernels -p mipha-runtime -p mipha-tests}
TARGET=${CARGO_TARGET_DIR:-target}

rm -rf "$BIN"
mkdir -p "$BIN/tests"

echo "== cargo test --release --no-run --features $FEATURES"
# shellcheck disable=SC2086
nice -n "$NICE" cargo test --release --locked $PACKAGES --features "$FEATURES" \
    --no-run --message-format=json-render-diagnostics >"$BIN/build.json"

# Every test executable whose target name matches $PATTERN.
python3 - "$BIN" "$PATTERN" <<'PY'
import json, os, re, shutil, sys
out, pattern = sys.argv[1], re.compile(sys.argv[2])
n = 0
with open(os.path.join(out, "build.json")) as f:
    for line in f:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") != "compiler-artifact" or not m.get("executable"):
            continue
        t = m["target"]
        if not m.get("profile", {}).get("test") or not pattern.search(t["name"]):
            continue
        dst = os.path.join(out, "tests", t["name"])
        shutil.copy2(m["executable"], dst)
        n += 1
        print(f"   {t['name']} <- {m['executable']}")
if n == 0:
    sys.exit("no test binary matched " + pattern.pattern)
PY
rm -f "$BIN/build.json"

echo "== mipha-bench"
if nice -n "$NICE" cargo build --release --locked -p mipha-bench --features "$FEATURES" \
    >"$BIN/bench-build.log" 2>&1; then
    cp "$TARGET/release/mipha-bench" "$BIN/"
else
    echo "   mipha-bench did not build with $FEATURES (see $BIN/bench-build.log); the check will skip it"
fi

# Line tables only are kept (panics still name files and lines); the carry is limited.
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$BIN"/tests/* "$BIN"/mipha-bench 2>/dev/null || true
fi
git rev-parse HEAD >"$BIN/commit" 2>/dev/null || true
du -sh "$BIN"
echo "gpu-bin ready: carry it to the GPU machine and run scripts/gpu-check.sh there"
