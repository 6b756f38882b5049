#!/usr/bin/env bash
# The GPU benchmarks in one short run (one lent GPU: about 15 minutes in all, machine start included).
# Each script prints its numbers; the output is also written to $OUT/<name>.log when OUT is set.
#   bash bench/gpu_suite.sh            # the stage-6 graph (with its CPU comparison), then the others
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOGS=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
run() {  # name, seconds, script and flags: one script's failure or time-out does not stop the others
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$PY" "$@" 2>&1 | tee "$LOGS/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}
run graph 150 bench/graph_throughput.py --check
run generate 45 bench/generate_throughput.py
run topk 120 bench/topk_throughput.py
run transcoders 120 bench/transcoder_throughput.py
run train 100 bench/train_throughput.py
