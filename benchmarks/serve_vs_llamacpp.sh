#!/usr/bin/env bash
# imp-jax serve and llama-server on the same GGUF, one after the other in one call, each measured by
# benchmarks/serve.py (concurrency 1, 4, 16, 64). They run in turn, not together: JAX takes most of the GPU's memory.
# Usage: bash benchmarks/serve_vs_llamacpp.sh MODEL.gguf LLAMA_SERVER OUTDIR [serve.py arguments ...]
#   e.g. bash benchmarks/serve_vs_llamacpp.sh /tmp/vs-llamacpp/qwen3-8b-q4_k_m.gguf /tmp/llama-build/bin/llama-server $OUT
# PARALLEL (default 64) sequences decode together in both servers, each with CTX (default 4096) tokens of context.
# ONLY=imp-jax or ONLY=llama-server runs one of the two (imp-jax's half needs no llama.cpp build).
set -euo pipefail
GGUF=$1 LLAMA=$2 OUT=$3
shift 3
PARALLEL=${PARALLEL:-64} CTX=${CTX:-4096} ONLY=${ONLY:-both}
mkdir -p "$OUT"

wait_health() {  # PORT PID LOG
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$3"; return 1; }
    sleep 1
  done
  return 1
}

if [[ $ONLY != llama-server ]]; then
python -m imp_jax.cli serve --model "$GGUF" --port 8000 --model-name bench --max-context "$CTX" \
  --parallel "$PARALLEL" >"$OUT/imp-jax-serve.log" 2>&1 &
PID=$!
wait_health 8000 $PID "$OUT/imp-jax-serve.log"
python benchmarks/serve.py --url http://127.0.0.1:8000/v1 --label imp-jax --json "$OUT/serve-imp-jax.json" "$@"
curl -s http://127.0.0.1:8000/metrics | grep -E "^imp_jax_(steps|kv_pages_total)" >"$OUT/imp-jax-metrics.txt" || true
kill $PID && wait $PID || true
fi

[[ $ONLY == imp-jax ]] && exit 0
"$LLAMA" -m "$GGUF" --port 8080 --alias bench -ngl 99 -fa on -np "$PARALLEL" -c $((CTX * PARALLEL)) --no-webui \
  >"$OUT/llama-server.log" 2>&1 &
PID=$!
wait_health 8080 $PID "$OUT/llama-server.log"
python benchmarks/serve.py --url http://127.0.0.1:8080/v1 --label llama-server --json "$OUT/serve-llama-server.json" "$@"
kill $PID && wait $PID || true
