#!/usr/bin/env bash
# canary-audit: the GPU check, on ONE CUDA GPU, in under 8 minutes, with PyPI as the only network it needs.
#
#   bash benchmarks/gpu_check.sh                  # from the repository root; results in ./gpu_check_out
#   cp gpu_check_out/gpu.json benchmarks/gpu.json # the figures, once a real GPU has produced them
#   GPU_CHECK_DRYRUN=1 GPU_CHECK_PYTHON=.venv/bin/python GPU_CHECK_MODEL=tiny-llama bash benchmarks/gpu_check.sh
#                                                 # the dry run: every step it can on the CPU (tests/test_gpu_check.py)
#
# Steps, each under its own timeout inside a DEADLINE (470 s); a failing step is recorded and the script goes on:
#   machine     nvidia-smi, python
#   install     a venv with CUDA torch (reuses the system's if it is CUDA torch >= 2.6, else PyPI's torch==$TORCH_SPEC,
#               a CUDA build) and `-e .`; versions; what choose_device resolves `auto` to for LoRA and full
#               (expected on an H100/H200: bf16-mixed, i.e. fp32 weights and bf16 autocast)
#   tiny        tiny/lora_cpu and tiny/full_cpu on the GPU (auto precision); run status, train.json precision,
#               the recorded scoring precision (fp32)
#   smollm2     the default audit, smollm2/lora_cpu, on the GPU, then `audit gate`; counts exact walks that needed a
#               second walk or ended `unstable` (the bf16 walk-vs-threshold gap, issue 14 item 1)
#   compare     benchmarks/gpu_compare.py on the smollm2 run's weights: CPU fp32 vs CUDA fp32 (must agree within the
#               tolerances it states) and CUDA bf16 against both; merge drift; timing (candidates/s, an exhaustive
#               10^6 space extrapolated from $GPU_CHECK_NAIVE candidates, walks, teacher-forced tokens/s) and memory
#   fp32        control: smollm2/lora_cpu with training.precision=fp32 (exposure per tier beside the mixed run's)
#   fsdp        informational: accelerate launch with recipes/accelerate/fsdp.yaml, 1 process, tiny/full_cpu
#               (multi-GPU FSDP / ZeRO-3 cannot be exercised on one GPU)
# GPU_CHECK_STEPS="tiny compare" runs a subset; the dry run defaults to "tiny compare".
set -uo pipefail
START=$(date +%s)
export REPO=${REPO:-$(pwd)}
[[ -f "$REPO/pyproject.toml" && -d "$REPO/audit" ]] || { echo "error: run from the canary-audit repository root (or set REPO)"; exit 2; }
export OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DRY=${GPU_CHECK_DRYRUN:-0}
export GPU_CHECK_DRYRUN=$DRY
VENV=${VENV:-${TMPDIR:-/tmp}/gpucheck-venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the version the CPU test suite runs, so CPU and CUDA differ only in device
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then PY=$(command -v "$GPU_CHECK_PYTHON" || echo "$GPU_CHECK_PYTHON"); else PY="$VENV/bin/python"; fi
export PY
export CANARY_AUDIT_CACHE=${CANARY_AUDIT_CACHE:-${TMPDIR:-/tmp}/gpucheck-cache}  # built models stay out of $OUT
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} MLFLOW_DISABLE_TELEMETRY=true HF_HUB_DISABLE_TELEMETRY=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=${DEADLINE:-470}
if [[ $DRY == 1 ]]; then STEPS=${GPU_CHECK_STEPS:-tiny compare}; else STEPS=${GPU_CHECK_STEPS:-install tiny smollm2 compare fp32 fsdp}; fi
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$SUMMARY"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
# step NAME LIMIT_S CMD...: CMD (a program or an exported function) under a timeout; rc and the output's tail to summary
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(elapsed) ))
  if (( left < 15 )); then log "SKIP $name (out of time)"; return 99; fi
  (( limit > left )) && limit=$left
  log "== $name (limit ${limit}s)"
  timeout "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "   $name rc=$rc$([[ $rc == 124 ]] && echo ' TIMEOUT')"
  grep -v -e "Loading weights" -e "Warning" -e "warn(" -e "it/s]" -e "^PASS" -e "^FAIL" "$OUT/$name.log" | tail -n 16 | sed 's/^/     | /' | tee -a "$SUMMARY"
  return $rc
}

do_install() {
  set -e
  if python3 -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if torch.cuda.is_available() and v >= (2, 6) else 1)' 2>/dev/null; then
    echo "reusing the system CUDA torch"; python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install -q --progress-bar off -e "$REPO"
  else
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --progress-bar off "$TORCH_SPEC" -e "$REPO"
  fi
}

versions() {
  "$PY" - <<'EOF'
import os
import torch, transformers, trl, peft, accelerate
from transformers.utils import is_torch_available
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| trl", trl.__version__,
      "| peft", peft.__version__, "| accelerate", accelerate.__version__)
assert is_torch_available(), "transformers disabled torch (it needs torch >= 2.6)"
if os.environ.get("GPU_CHECK_DRYRUN") != "1":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"cc {p.major}.{p.minor}",
          "native bf16", torch.cuda.is_bf16_supported(including_emulation=False), "| TF32 matmul", torch.backends.cuda.matmul.allow_tf32)
from audit.schema import TrainingSection
from audit.train.sft import choose_device
print("choose_device auto: lora", choose_device(TrainingSection()), "| full", choose_device(TrainingSection(method="full")))
EOF
}

# run_and_check RECIPE OUTROOT [overrides...]: audit run, then status, training precision, scoring precision, walks
run_and_check() {
  local recipe=$1 root=$2; shift 2
  "$PY" -m audit.cli run "$recipe" --no-tracking --quiet "output.root=$root" "$@"
  local rc=$?
  "$PY" - "$root" <<'EOF'
import glob, json, sys
for d in sorted(glob.glob(sys.argv[1] + "/*/")):
    st = json.load(open(d + "run.json"))
    tr = json.load(open(d + "train.json")) if glob.glob(d + "train.json") else {}
    rep = json.load(open(d + "report.json")) if glob.glob(d + "report.json") else {}
    rows = [json.loads(x) for x in open(d + "scores.jsonl")] if glob.glob(d + "scores.jsonl") else []
    walks = {}
    for r in rows:
        walks[r.get("exact_status")] = walks.get(r.get("exact_status"), 0) + 1
    print("RUN", d, "status", st.get("status"), "| error", (st.get("error") or "")[:400])
    print("    train: device", tr.get("device"), "precision", tr.get("precision"), "steps", tr.get("steps"),
          "final_loss", tr.get("final_loss"), "wall_s", tr.get("wall_s"))
    print("    scoring.precision", rep.get("recipe", {}).get("scoring", {}).get("precision"), "| exact walks", walks,
          "| timings", st.get("timings_s"))
    for t in rep.get("tiers", []):
        print("    tier", t["repetitions"], "exposure", t.get("exposure_mean"))
EOF
  return $rc
}
export -f do_install versions run_and_check

# ---------------------------------------------------------------------------------------------------- machine
log "repo $REPO (git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')), out $OUT, steps: $STEPS, dry run: $DRY"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
else
  log "no nvidia-smi on this machine"
fi
python3 --version 2>&1 | tee -a "$SUMMARY"

# ---------------------------------------------------------------------------------------------------- install
if want install && [[ -z "${GPU_CHECK_PYTHON:-}" ]]; then
  step install 240 do_install || { log "install failed: stopping (see $OUT/install.log)"; exit 1; }
fi
step versions 60 versions || { log "the environment cannot run the audit: stopping (see $OUT/versions.log)"; exit 1; }

# ---------------------------------------------------------------------------------------------------- tiny runs
if want tiny; then
  step tiny_lora 90 run_and_check tiny/lora_cpu "$OUT/runs_tiny_lora"
  [[ $DRY == 1 ]] || step tiny_full 90 run_and_check tiny/full_cpu "$OUT/runs_tiny_full"
fi

# ---------------------------------------------------------------------------------------------------- smollm2 LoRA
if want smollm2; then
  step smollm2_lora 150 run_and_check smollm2/lora_cpu "$OUT/runs_smollm2"
  RUN=$(ls -d "$OUT"/runs_smollm2/*/ 2>/dev/null | head -1)
  [[ -n "$RUN" && -f "$RUN/report.json" ]] && step gate 30 "$PY" -m audit.cli gate "$RUN"
fi

# ---------------------------------------------------------------------------------------------------- compare + timing
if want compare; then
  RUN=$(ls -d "$OUT"/runs_smollm2/*/ 2>/dev/null | head -1)
  [[ -z "$RUN" && $DRY == 1 ]] && RUN=$(ls -d "$OUT"/runs_tiny_lora/*/ 2>/dev/null | head -1)  # the dry run's weights
  step compare 200 "$PY" "$REPO/benchmarks/gpu_compare.py" "$OUT" "${RUN:-}"
  grep -h -e "^PASS" -e "^FAIL" "$OUT/compare.log" 2>/dev/null | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------------------------------------------- fp32 control
if want fp32; then
  step smollm2_lora_fp32 100 run_and_check smollm2/lora_cpu "$OUT/runs_smollm2_fp32" training.precision=fp32
fi

# ---------------------------------------------------------------------------------------------------- FSDP, 1 process
if want fsdp; then
  step fsdp_1proc 60 "$PY" -m accelerate.commands.launch --config_file "$REPO/recipes/accelerate/fsdp.yaml" --num_processes 1 \
    -m audit.cli run tiny/full_cpu --no-tracking --quiet "output.root=$OUT/runs_fsdp1"
fi

log "done in $(elapsed)s; details in $OUT/compare.json, figures in $OUT/gpu.json, logs in $OUT/*.log"
