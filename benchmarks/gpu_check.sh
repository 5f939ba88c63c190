#!/usr/bin/env bash
# The GPU check, in one call (under 8 minutes): the CUDA-marked tests (pytest -m cuda) and a
# FashionMNIST-shaped epoch (60,000 synthetic uint8 1x28x28 images, the two-conv CNN, batch 256,
# bf16 autocast) of the PyTorch tutorial loop (Dataset + DataLoader) against optiflow with the data
# resident on the GPU (benchmarks/bench_train.py variants A B C D, C/D: defaults / --compile
# --channels-last).  Targets on an H100/H200: optiflow's epoch <= 1.0 s and >= 5x the tutorial's.
#
#   benchmarks/gpu_check.sh [--dry-run] [RESULT_FILE]     # RESULT_FILE defaults to $OUT/gpu_check.txt
#
# Installs nothing: it looks for a python with torch + CUDA and optiflow importable (.venv/bin/python,
# python3, python; or those GPU_CHECK_PYTHONS names); without one it says so in the result file and exits 0.  --dry-run skips every
# CUDA part (a quick check of the script itself on a CPU machine; tests/test_gpu_check.py runs it).
set -u

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
RESULT="${1:-${OUT:-.}/gpu_check.txt}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
mkdir -p "$(dirname "$RESULT")"
: > "$RESULT"

say() { echo "$*" | tee -a "$RESULT"; }

say "optiflow GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"

PYTHON=""
CUDA=0
for candidate in ${GPU_CHECK_PYTHONS:-"$ROOT/.venv/bin/python" python3 python}; do
    command -v "$candidate" > /dev/null 2>&1 || continue
    found=$("$candidate" -c 'import torch, optiflow; print(int(torch.cuda.is_available()))' 2> /dev/null) || continue
    PYTHON="$candidate"
    CUDA="$found"
    [ "$CUDA" = "1" ] && break
done

if [ -z "$PYTHON" ]; then
    say "SKIPPED: no python here has torch and optiflow importable (install with: pip install -e '.[dev]')"
    exit 0
fi
say "python: $PYTHON ($("$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"
if [ "$DRY_RUN" = "1" ]; then
    "$PYTHON" benchmarks/bench_train.py --help > /dev/null || { say "FAILED: benchmarks/bench_train.py --help"; exit 1; }
    say "dry run: CUDA tests and the GPU epoch skipped (cuda available: $CUDA)"
    exit 0
fi
if [ "$CUDA" != "1" ]; then
    say "SKIPPED: torch here sees no CUDA device"
    exit 0
fi
"$PYTHON" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB")' \
    | tee -a "$RESULT"
export GIT_PYTHON_REFRESH=quiet

say ""
say "== CUDA tests (pytest -m cuda)"
timeout 150 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tail -n 15 | tee -a "$RESULT"
say "pytest exit status: ${PIPESTATUS[0]}"

say ""
say "== FashionMNIST-shaped epoch, 60,000 images, batch 256, bf16: tutorial loop vs optiflow"
timeout 330 "$PYTHON" benchmarks/bench_train.py --device cuda --amp --images 60000 --rounds 2 --batch-sizes 256 \
    --variants ABCD 2>&1 | tee "$RESULT.bench" | tee -a "$RESULT"
say "bench exit status: ${PIPESTATUS[0]}"
# epoch seconds from the medians table (variant, median samples/s), and the ratio against the tutorial loop
awk '$1 ~ /^[ABCD]$/ && $2 ~ /^[0-9]+$/ { rate[$1] = $2 }
     END { for (k in rate) printf "epoch seconds %s: %.3f%s\n", k, 60000 / rate[k],
                                   ("A" in rate) ? sprintf("  (%.1fx the tutorial loop)", rate[k] / rate["A"]) : "" }' \
    "$RESULT.bench" | sort | tee -a "$RESULT"
rm -f "$RESULT.bench"
say "targets: D (or C) epoch <= 1.0 s and >= 5x A"
exit 0
