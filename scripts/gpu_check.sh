#!/usr/bin/env bash
# scripts/gpu_check.sh: prefopt's first minutes on a GPU, in one command, from a fresh checkout (docs/bench.md, "GPU
# check"). Installs what the check needs next to the machine's torch (never another torch: every pip call is
# constrained to the installed version), builds the C++ and CUDA extensions, then runs bench/gpu_check.py: the kernel
# tests on CUDA tensors, the reference case and `prefopt bench --heads` (table and autotuned tiles), and writes
# gpu_check.json and gpu_check.md under --out. The whole run aims at 8 minutes; each step has its own limit.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: scripts/gpu_check.sh [--out DIR] [--budget-s SECONDS] [--skip-install] [--with-peers] [--dry-run | --cpu-smoke]

  --out DIR          folder for gpu_check.json, gpu_check.md, install.log and the steps' logs
                     (default: gpu-check-<date>-<time> in the checkout)
  --budget-s N       seconds for the whole check, install and build included (default 480)
  --skip-install     use the environment as it is (no pip, no build)
  --with-peers       also pip install liger-kernel and trl (for the reference case's comparisons), if they resolve
                     against the installed torch
  --dry-run          no install, no GPU: write the plan (every step "planned") to DIR
  --cpu-smoke        no install, no GPU: tiny CPU versions of the steps, to check the plumbing
Environment: PYTHON (default python3), MAX_JOBS (default: all cores) for the extension build.
EOF
}

OUT="" BUDGET=480 INSTALL=1 PEERS=0 MODE=gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --budget-s) [ $# -ge 2 ] || { echo "gpu_check.sh: --budget-s needs seconds" >&2; exit 2; }; BUDGET="$2"; shift 2 ;;
    --budget-s=*) BUDGET="${1#--budget-s=}"; shift ;;
    --skip-install) INSTALL=0; shift ;;
    --with-peers) PEERS=1; shift ;;
    --dry-run) [ "$MODE" = gpu ] || { echo "gpu_check.sh: --dry-run and --cpu-smoke exclude each other" >&2; exit 2; }
               MODE=dry-run; shift ;;
    --cpu-smoke) [ "$MODE" = gpu ] || { echo "gpu_check.sh: --dry-run and --cpu-smoke exclude each other" >&2; exit 2; }
                 MODE=cpu-smoke; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$BUDGET" in
  ''|*[!0-9]*) echo "gpu_check.sh: --budget-s must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
START=$(date +%s)
[ -n "$OUT" ] || OUT="gpu-check-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"

read -r TORCH HAS_CUDA < <("$PY" -c 'import torch; print(torch.__version__, int(torch.cuda.is_available()))' \
                            2>/dev/null)
if [ -z "${TORCH:-}" ]; then
  echo "gpu_check.sh: torch does not import with $PY: install the machine's torch first (this script never installs" \
       "or changes torch)" >&2
  exit 2
fi
if [ "$MODE" = gpu ] && [ "$HAS_CUDA" != 1 ]; then
  echo "gpu_check.sh: torch $TORCH sees no CUDA device; --dry-run writes the plan, --cpu-smoke checks the plumbing" >&2
  exit 2
fi

INSTALL_JSON="$OUT/install.json"
if [ "$MODE" = gpu ] && [ "$INSTALL" = 1 ]; then
  LOG="$OUT/install.log"
  echo "torch==$TORCH" > "$OUT/constraints.txt"  # any resolution that would move torch fails instead
  PIP=("$PY" -m pip install --disable-pip-version-check -c "$OUT/constraints.txt")
  t0=$(date +%s)
  echo "gpu_check.sh: installing the check's dependencies next to torch $TORCH (log: $LOG)" >&2
  "${PIP[@]}" ninja setuptools wheel pytest psutil numpy pyyaml safetensors tqdm >> "$LOG" 2>&1
  PIP_RC=$?
  if ! "$PY" -c 'import triton' >> "$LOG" 2>&1; then  # torch's own triton pin, through torch's metadata
    "${PIP[@]}" "torch==$TORCH" >> "$LOG" 2>&1 || PIP_RC=$?
  fi
  PEERS_RC=""
  if [ "$PEERS" = 1 ]; then
    "${PIP[@]}" liger-kernel "trl>=0.19" >> "$LOG" 2>&1
    PEERS_RC=$?
  fi
  t1=$(date +%s)
  echo "gpu_check.sh: building prefopt with its CUDA extension (MAX_JOBS=${MAX_JOBS:-$(nproc)})" >&2
  PREFOPT_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PIP[@]}" --no-build-isolation --no-deps -e . >> "$LOG" 2>&1
  BUILD_RC=$?
  t2=$(date +%s)
  AFTER="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  if [ "$AFTER" != "$TORCH" ]; then
    echo "gpu_check.sh: torch changed from $TORCH to $AFTER during the install: stopping (see $LOG)" >&2
    exit 3
  fi
  "$PY" - "$INSTALL_JSON" "$TORCH" "$PIP_RC" "$BUILD_RC" "$((t1 - t0))" "$((t2 - t1))" "$PEERS_RC" <<'EOF'
import json, sys
path, torch, pip_rc, build_rc, pip_s, build_s, peers_rc = sys.argv[1:]
try:
    import prefopt._C_cuda  # noqa: F401
    cuda_ext = "built"
except Exception as err:
    cuda_ext = f"missing: {type(err).__name__}: {err}".splitlines()[0]
json.dump(dict(torch=torch, torch_unchanged=True, pip_rc=int(pip_rc), pip_s=int(pip_s), build_rc=int(build_rc),
               build_s=int(build_s), cuda_extension=cuda_ext, peers_rc=int(peers_rc) if peers_rc else None),
          open(path, "w"), indent=1)
EOF
  [ "$BUILD_RC" = 0 ] || echo "gpu_check.sh: the build failed (rc $BUILD_RC, see $LOG); the check runs anyway" >&2
fi

LEFT=$((BUDGET - ($(date +%s) - START) - 15))  # 15 s to write the report
[ "$LEFT" -gt 30 ] || LEFT=30
ARGS=(--out "$OUT" --budget-s "$LEFT")
[ -f "$INSTALL_JSON" ] && ARGS+=(--install-json "$INSTALL_JSON")
[ "$MODE" = dry-run ] && ARGS+=(--dry-run)
[ "$MODE" = cpu-smoke ] && ARGS+=(--cpu-smoke)
"$PY" -m bench.gpu_check "${ARGS[@]}"
RC=$?
echo "gpu_check.sh: $OUT/gpu_check.md and gpu_check.json ($(($(date +%s) - START)) s in all)" >&2
exit $RC
