#!/usr/bin/env bash
# Everything a lent GPU should tell us, in ONE run that fits in 8 minutes on one H100/H200:
#   1. the CUDA tests: tests/kernels (native Triton kernels, paged prefill/decode, CUDA graphs) and the bf16
#      engine-vs-PEFT test (tests/engine/test_cuda_equivalence.py);
#   2. bench/lora_kernels.py: bandwidth efficiency, vs gather-bmm, mixed vs padded ranks, paged decode vs SDPA;
#   3. bench/engine_gpu.py: engine decode tok/s at Llama-3-8B shapes, 0/1/8/64 distinct adapters vs base-only,
#      eager vs CUDA graphs.
# Every section has its own time limit, so the run ends in time whatever happens; a section cut short keeps the
# rows it wrote. Tables and logs go to $OUT (the device tool brings that folder back; at most 8 files), by default
# a new temporary folder. The summary is $OUT/gpu_check.md; the exit status is non-zero if any section failed.
#
#   bench/gpu_check.sh            # on the GPU machine, from the repository root or anywhere
#   bench/gpu_check.sh --smoke    # CPU: tiny shapes, Triton interpreter, about a minute (CI runs this)
#
# Packages: needs torch, triton, numpy, tokenizers, safetensors (+ transformers, peft for the tests) and pytest +
# hypothesis. Missing ones are installed offline from a carried `.whl/` folder at the repository root, filled on a
# machine with PyPI access by:  pip download --only-binary=:all: -d .whl pytest hypothesis
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$(mktemp -d -t gpu_check.XXXX)}"
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_check.md"

# --- Python: the repo's venv when it has loraplex, else python3 with the folders mapped to `loraplex.*` -------------
PY="${PYTHON:-}"
if [[ -z "$PY" && -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c "import loraplex.kernels" 2>/dev/null; then
  PY="$ROOT/.venv/bin/python"
fi
if [[ -z "$PY" ]]; then
  PY=python3
  SHIM="$(mktemp -d)"
  mkdir -p "$SHIM/loraplex"
  for pkg in engine registry kernels services; do ln -s "$ROOT/$pkg" "$SHIM/loraplex/$pkg"; done
  export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # `tests.*` helpers
missing=()
for module in pytest hypothesis; do "$PY" -c "import $module" 2>/dev/null || missing+=("$module"); done
if (( ${#missing[@]} )) && [[ -d "$ROOT/.whl" ]]; then
  "$PY" -m pip install --quiet --no-index --find-links "$ROOT/.whl" "${missing[@]}" || true
fi

if (( SMOKE )); then
  export TRITON_INTERPRET=1
  TESTS=(tests/kernels/test_triton_prefill_attention.py -k "bad_inputs or agrees")
  LORA_ARGS=(--smoke)
  ENGINE_ARGS=(--smoke)
  LIMITS=(120 120 120)
else
  TESTS=(tests/kernels tests/engine/test_cuda_equivalence.py)
  LORA_ARGS=(--batches 16 64 256 --reps 10 --loop-max 16)
  ENGINE_ARGS=(--steps 24)
  LIMITS=(170 150 140)
fi

status=0
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  "$PY" - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"- {dev}; python {platform.python_version()}, torch {torch.__version__}, triton {tv}")
EOF
} >"$SUMMARY" 2>&1

section() {  # name, limit (s), log file, command...
  local name="$1" limit="$2" log="$3"
  shift 3
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  case $rc in
    0) echo "- $name: ok (${took} s)" ;;
    124|137) echo "- $name: TIMED OUT after ${limit} s (rows written so far are kept)"; status=1 ;;
    *) echo "- $name: FAILED with status $rc (${took} s); see $(basename "$log")"; status=1 ;;
  esac >>"$SUMMARY"
}

section "CUDA tests (${TESTS[*]})" "${LIMITS[0]}" "$OUT/tests.log" \
  "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
section "bench/lora_kernels.py ${LORA_ARGS[*]}" "${LIMITS[1]}" "$OUT/lora_kernels.log" \
  "$PY" bench/lora_kernels.py "${LORA_ARGS[@]}" --json "$OUT/lora_kernels.json" --md "$OUT/lora_kernels.md"
section "bench/engine_gpu.py ${ENGINE_ARGS[*]}" "${LIMITS[2]}" "$OUT/engine_gpu.log" \
  "$PY" bench/engine_gpu.py "${ENGINE_ARGS[@]}" --out "$OUT/engine_gpu.md"

{
  echo
  echo "## Tests"
  echo
  echo '```'
  tail -n 15 "$OUT/tests.log"
  echo '```'
  for table in lora_kernels engine_gpu; do
    echo
    if [[ -f "$OUT/$table.md" ]]; then cat "$OUT/$table.md"; else echo "($table: no table written; see $table.log)"; fi
  done
} >>"$SUMMARY"
rm -f "$OUT/engine_gpu.md"  # folded into the summary: keeps $OUT within the 8 files the device tool returns
cat "$SUMMARY"
echo "(written to $OUT)"
exit $status
