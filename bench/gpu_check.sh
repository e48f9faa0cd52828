#!/usr/bin/env bash
# The GPU check (issue 13): figure 6 and a 2-trial CUDA sweep on a fresh GPU machine, in under 8 minutes.
#   bench/gpu_check.sh --fetch-wheels   # here, online, once: the wheels the GPU machine lacks -> $WHEELS
#   bench/gpu_check.sh                  # there (make bench-gpu): venv + offline install + figure 6 + sweep
#   bench/gpu_check.sh --dry-run        # CPU, tiny sizes, this checkout's venv, no install (the CI test)
# Results: $RESULTS (default bench/results/gpu, dry run bench/results/gpu-dry): latest.{md,json} (figure 6),
# gpu_sweep.json and gpu_check.log; copied to $OUT too when that is set (the device tool brings $OUT back).
# The GPU machine has torch and torchvision (python3) but no network: the venv sees its site-packages and the
# rest comes from $WHEELS (carry it: it is under .cache/, which git ignores).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  "") ;;
  *) echo "gpu_check.sh: unknown option '$1'; allowed: --dry-run, --fetch-wheels" >&2; exit 2 ;;
esac
WHEELS=${WHEELS:-.cache/masksweep/gpu-wheels}
VENV=${GPU_VENV:-/tmp/masksweep-gpu-venv}
CACHE=${GPU_CACHE:-/tmp/masksweep-gpu-cache}   # synthetic data: outside the tree, so it never travels back
if [ "$MODE" = dry ]; then RESULTS=${RESULTS:-$(mktemp -d)}; SCALE=10; else RESULTS=${RESULTS:-bench/results/gpu}; SCALE=1; fi
LOCAL_PY=${PYTHON:-.venv/bin/python}

if [ "$MODE" = fetch ]; then
  exec "$LOCAL_PY" -m bench.gpu_check wheels "$WHEELS"
fi

mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }
# Each step has its own limit, so one that hangs still leaves the others' results (8 minutes in all).
# A dry run on a shared CPU may take far longer than the GPU machine: its limits are 10x.
step() { local limit=$(( $1 * SCALE )); shift; say "$*"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; }
finish() {
  local status=$?
  if [ -n "${OUT:-}" ]; then cp -f "$RESULTS"/latest.md "$RESULTS"/latest.json "$RESULTS"/gpu_sweep.json "$LOG" "$OUT"/ 2>/dev/null || true; fi
  say "done, exit status $status; results in $RESULTS"
}
trap finish EXIT

if [ "$MODE" = dry ]; then
  PY=$LOCAL_PY
  say "dry run: no install; would install $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels from $WHEELS into $VENV"
  BENCH=(--smoke --device cpu --force-gpu-figure --threads 1)
  SWEEP=(--dry-run)
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { say "no wheels in $WHEELS: run 'bench/gpu_check.sh --fetch-wheels' where pip is online and carry $WHEELS"; exit 1; }
  # That machine's python3 is itself a venv (/opt/torch/.venv), so --system-site-packages would not see its
  # torch: the new venv reaches python3's site-packages through a .pth file instead (after its own), and is
  # made without pip (no ensurepip needed); python3's own pip installs into it with --python.
  step 60 python3 -m venv --without-pip "$VENV"
  PY=$VENV/bin/python
  python3 -c 'import site; print("\n".join(site.getsitepackages()))' > "$("$PY" -c 'import site; print(site.getsitepackages()[0])')/device_site.pth"
  PIP=(python3 -m pip --python "$PY" install -q --no-index --no-deps --disable-pip-version-check)
  # --no-deps: the wheels are the closure minus what the machine has (bench/gpu_check.py says why), and the
  # machine's torch/numpy stay as they are; the import check right after names anything missing.
  step 120 "${PIP[@]}" --no-compile "$WHEELS"/*.whl
  step 120 "${PIP[@]}" --no-build-isolation -e .
  step 120 "$PY" -m bench.gpu_check imports
  BENCH=(--device cuda --threads 8)
  SWEEP=()
fi
export PYTHONUNBUFFERED=1
# Figure 6 and the sweep both run even if the other fails; the exit status says whether both passed.
status=0
step 300 "$PY" -m bench --only 6 --out "$RESULTS" --cache-dir "$CACHE" "${BENCH[@]}" || status=1
step 240 "$PY" -m bench.gpu_check sweep "$RESULTS" "${SWEEP[@]}" || status=1
exit $status
