#!/usr/bin/env bash
# Usage: peer_tests/run.sh MODE [extra pytest args...]
#   MODE: plain (transformers.Trainer) | none | sam | msam | rwsam  (RWSAMTrainer with RWSAMConfig(sam_mode=MODE))
# Runs transformers' own Trainer tests (tests/trainer/test_trainer.py and test_trainer_checkpointing.py, copied into
# peer_tests/transformers_tests/ as README.md says) offline on the CPU; writes peer_tests/results/MODE/junit.xml etc.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODE="${1:?usage: run.sh MODE [pytest args]  (MODE: plain|none|sam|msam|rwsam)}"; shift
PY="${RWSAM_PEER_PYTHON:-$HERE/../.venv/bin/python}"
if [[ "$MODE" == plain ]]; then unset RWSAM_PEER_MODE; else export RWSAM_PEER_MODE="$MODE"; fi
OUT="${RWSAM_PEER_OUT:-$HERE/results/$MODE}"; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export WANDB_DISABLED=true WANDB_MODE=disabled DISABLE_MLFLOW_INTEGRATION=TRUE
export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
export HF_HOME="$HERE/.hf_home"  # isolated: nothing cached elsewhere changes outcomes between modes
cd "$HERE"
start=$(date +%s)
"$PY" -m pytest transformers_tests/tests/trainer/test_trainer.py transformers_tests/tests/trainer/test_trainer_checkpointing.py \
  -q -rA --timeout=300 --junitxml="$OUT/junit.xml" -o junit_family=xunit1 "$@" 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
echo "mode=$MODE rc=$rc seconds=$(( $(date +%s) - start ))" | tee "$OUT/runtime.txt"
exit $rc
