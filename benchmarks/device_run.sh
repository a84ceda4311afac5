#!/usr/bin/env bash
# One device call (device tool, Hopper GPU) that checks and measures everything the GPU issues ask for, inside a
# deadline, and packs what it wrote into $OUT/results.tgz (the tool brings back at most 8 files).
#
#   track P (not timed, two background jobs): the gpu-marked tests, and benchmarks/memory.py (planned vs measured
#           peak, one process per configuration; its allocator may use 95% of the card);
#   track T (timed, one after the other): benchmarks/e2e.py per model shape, the decode profile, the bf16 kernel
#           rows of benchmarks/kernels.py, the XLA-path baselines, the transformers baselines of the other shapes.
#
# The two tracks share the GPU: P is mostly compilation (CPU), and the timed runs take the best of several reps.
# Usage (repository root, gguf carried as a wheel in .whl/ or .llama/wheels/):  bash benchmarks/device_run.sh [SECONDS] [PARTS]
# PARTS (comma-separated, default all): tests,memory,gptoss,8b,profile,shapes,bf16,xla,torch; and, asked for by
# name only, load (the Qwen3-8B-shape Q4_K_M file written here, then benchmarks/load.py cold and cached with
# every thread's stack dumped every 10 s into load_stacks.txt: where a slow load is, even if cut off) and serving
# (benchmarks/serving.py, synthetic Qwen3-8B and Qwen3-30B-A3B MXFP4 at 1, 4, 16 and 64 sequences) and serveprof (the same at 16 and 64,
# each decode window also profiled) and serve (imp-jax serve then llama-server on the Q4_K_M file, measured by
# benchmarks/serve.py: carry .llama, with server-wheels from scripts/llamacpp_tree.py) and serveimp (imp-jax serve alone
# again, on the compile cache the first process filled) and stepmem (benchmarks/step_memory.py: engine_step's XLA
# memory at two pool sizes, kernels and reference) and cmdbuf
# (benchmarks/command_buffers.py: the MXFP4 decode step and an 8-step loop under XLA's command-buffer settings) and wall
# (benchmarks/load.py's whole `imp-jax generate` beside llama-completion on the Q4_K_M file; builds llama.cpp too) and probe
# (benchmarks/compile_probe.py: the Q4_K_M decode step's kernel compiles, with and without stable names) and tp
# (tests/test_gpu_sharded.py: the kernels per shard under shard_map on a one-GPU mesh) and kgpu (the matmul kernels' GPU
# tests) and q4file (only the Q4_K_M file) and ncu (Nsight Compute's speed-of-light, scheduler and warp-state
# sections of the first Q4_K and Q8_0 decode-matmul launches of benchmarks/kernels.py) and gpue2e (the end-to-end and
# loader GPU tests) and vsprep (waits for the llama.cpp build, then starts vs_llamacpp.py --prepare-only for VS_FILES
# under setsid, nice 19, from a copy of the tree, so it runs on into the next call) and vs (vs_llamacpp.py --files
# VS_FILES, default q4_k_m,q5_k_m,mxfp4) and kernels_ab / e2e_ab (benchmarks/kernels.py's decode rows / e2e.py's Qwen3-8B Q4_K_M, before and after a
# change: carry .baseline, see below). The random_gguf tokenizer
# comes from .llama/ (benchmarks/random_gguf.py tokenizer), so carry it too.
# Seen on an H200 beside the background track: gpt-oss-20b alone ~120 s (build, compiles, pp512, tg b=1 and 8);
# qwen3-8b two quants + torch over 190 s; the kernel GPU tests ~150 s. Seen alone on the card: all 103 gpu-marked
# tests ~600 s (more than one call: split them by file); qwen3-8b MXFP4 pallas + xla + torch 165 s, Q8_0 pallas +
# xla 116 s; qwen3-30b-a3b + qwen3.5-27b pallas 288 s; their XLA paths with gpt-oss-20b and qwen3.5-9b 190 s; the
# torch part (transformers on the four non-dense shapes) 320 s.
set -u
BUDGET=${1:-560}
PARTS=",${2:-tests,memory,gptoss,8b,profile,shapes,bf16,xla,torch},"
START=$(date +%s)
OUT=${OUT:-/tmp/out}
R=/tmp/run
mkdir -p "$R" "$OUT" /tmp/g
# gguf (from .whl/ or scripts/llamacpp_tree.py's .llama/wheels), and the HTTP server's wheels where carried
WHEELS=$(ls .whl/*.whl .llama/wheels/*.whl .llama/server-wheels/*.whl 2>/dev/null)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS \
    || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

want() { [[ $PARTS == *",$1,"* ]]; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
step() {  # step NAME MAX_SECONDS CMD...: run CMD with a timeout inside the deadline, log to $R/NAME.log
    local name=$1 max=$2
    shift 2
    local t=$(($(left) - 15))
    ((t > max)) && t=$max
    if ((t < 20)); then echo "SKIP $name (deadline)" | tee -a "$R/steps.txt"; return; fi
    local t0=$(date +%s)
    timeout "$t" "$@" >"$R/$name.log" 2>&1
    echo "$name rc=$? ${t}s-limit $(($(date +%s) - t0))s" | tee -a "$R/steps.txt"
}
pack() { tar -C "$R" -czf "$OUT/results.tgz" --exclude trace . 2>/dev/null; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$R/gpu.txt" 2>&1
date -u +%FT%TZ >>"$R/gpu.txt"

want tests && XLA_PYTHON_CLIENT_MEM_FRACTION=0.08 step gpu_tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_pallas_qmatmul.py tests/test_pallas_attention.py tests/test_gpu_e2e.py &
want memory && XLA_FLAGS=--xla_gpu_autotune_level=0 step memory 500 python3 benchmarks/memory.py --timeout 170 \
    --configs llama-70b/bf16,qwen3-8b/mxfp4,qwen3.5-27b/mxfp4-packed,qwen3.5-27b/mxfp4-bf16-fallback,qwen3-8b/q8_0 \
    --json "$R/memory.json" &

for q in q4_k_m q8_0; do
    want load && step "write_$q" 60 python3 benchmarks/random_gguf.py write --shape qwen3-8b --quant $q \
        --tokenizer .llama/qwen2.5-tokenizer.gguf --out /tmp/g/$q.gguf
done
want load && step load 300 python3 benchmarks/load.py --models /tmp/g/q4_k_m.gguf,/tmp/g/q8_0.gguf \
    --profile "$R/load_profile.txt" --json "$R/load.json"
want quickload && step write_q4_k_m 60 python3 benchmarks/random_gguf.py write --shape qwen3-8b --quant q4_k_m \
    --tokenizer .llama/qwen2.5-tokenizer.gguf --out /tmp/g/q4_k_m.gguf
want quickload && step load 150 python3 benchmarks/load.py --models /tmp/g/q4_k_m.gguf --no-wall \
    --profile "$R/load_profile.txt" --json "$R/load.json"
want q4file && [[ ! -f /tmp/g/q4_k_m.gguf ]] && step write_q4_k_m 60 python3 benchmarks/random_gguf.py write \
    --shape qwen3-8b --quant q4_k_m --tokenizer .llama/qwen2.5-tokenizer.gguf --out /tmp/g/q4_k_m.gguf
want ncu && step ncu 150 ncu --clock-control none -k regex:qmatmul -c 6 --section SpeedOfLight --section SchedulerStats \
    --section WarpStateStats --section Occupancy --section LaunchStats python3 benchmarks/kernels.py --only matmul --m 1 \
    --formats q4_k,q8_0 --models qwen3-8b --wall-clock --out "$R/ncu_kernels"
want gpue2e && XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 step gpu_e2e 240 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_gpu_e2e.py tests/test_gpu_load.py
VS_FILES=${VS_FILES:-q4_k_m,q5_k_m,mxfp4}
if want vsprep; then  # the files of vs_llamacpp.py, made in the background from a copy of the tree (the next call replaces it)
    step llama_build "$(($(left) - 20))" bash benchmarks/device_llamacpp.sh wait "$(($(left) - 25))"
    rm -rf /tmp/vsrepo && cp -r . /tmp/vsrepo
    (cd /tmp/vsrepo && setsid nice -n 19 python3 benchmarks/vs_llamacpp.py --prepare-only --files "$VS_FILES" \
        </dev/null >/tmp/vsprep.log 2>&1 &)
    echo "vsprep started" | tee -a "$R/steps.txt"
fi
want vs && step vs "$(($(left) - 20))" python3 benchmarks/vs_llamacpp.py --files "$VS_FILES" --out "$R/vs.json"
want decode && step decode 150 python3 benchmarks/e2e.py --shapes qwen3-8b --quants bf16,q4_k_m --pp 512 \
    --batches 1 --out "$R/decode.json"
want serving && step serving 400 python3 benchmarks/serving.py --models qwen3-8b:mxfp4,qwen3-30b-a3b:mxfp4 \
    --concurrency 1,4,16,64 --decode-steps 8 --json "$R/serving.json"
want serveprof && step serveprof 300 python3 benchmarks/serving.py --models qwen3-8b:mxfp4 --concurrency 16,64 \
    --decode-steps 8 --profile 16,64 --json "$R/serveprof.json"
if want serve || want serveimp || want wall; then  # both need the llama.cpp build (carry .llama: its tree, the wheels, the tokenizer)
    [[ -f /tmp/g/q4_k_m.gguf ]] || step write_q4_k_m 60 python3 benchmarks/random_gguf.py write --shape qwen3-8b \
        --quant q4_k_m --tokenizer .llama/qwen2.5-tokenizer.gguf --out /tmp/g/q4_k_m.gguf
    [[ -f /tmp/llama-build.rc ]] || pgrep -f "ninja -C /tmp/llama-build" >/dev/null || bash benchmarks/device_llamacpp.sh start
fi
SERVE_ARGS=(--concurrency 1,16,64 --requests 64 --time-limit 40)
# imp-jax serve (while llama.cpp builds), then llama-server, on the Q4_K_M file
want serve && ONLY=imp-jax step serve_imp 300 bash benchmarks/serve_vs_llamacpp.sh /tmp/g/q4_k_m.gguf \
    /tmp/llama-build/bin/llama-server "$R/serve" "${SERVE_ARGS[@]}"
# serveimp: imp-jax's half alone, again (a second process: the compile cache the first filled)
want serveimp && ONLY=imp-jax step serve_imp2 300 bash benchmarks/serve_vs_llamacpp.sh /tmp/g/q4_k_m.gguf \
    /tmp/llama-build/bin/llama-server "$R/serve2" "${SERVE_ARGS[@]}"
want serve || want wall && step llama_build 450 bash benchmarks/device_llamacpp.sh wait 440
want serve && ONLY=llama-server step serve_llama 150 bash benchmarks/serve_vs_llamacpp.sh /tmp/g/q4_k_m.gguf \
    /tmp/llama-build/bin/llama-server "$R/serve" "${SERVE_ARGS[@]}"
# the whole `imp-jax generate -n 32` in a new process, cold and cached compile cache, beside llama-completion
want wall && step wall 240 python3 benchmarks/load.py --models /tmp/g/q4_k_m.gguf \
    --llama-completion /tmp/llama-build/bin/llama-completion --json "$R/wall.json"
# before/after a kernel change in one call: the previous commit's pallas/ and imp_jax/ carried in .baseline/
# (`git archive REV pallas imp_jax | tar -x -C .baseline`, ignored), timed by this tree's scripts
want kgpu && step kernel_gpu_tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_pallas_qmatmul.py \
    -k "(test_kernel_gpu and 4096-4096) or (test_expert_kernel_gpu and (Q4_K or Q5_K or Q6_K or IQ4)) or bf16"
for tree in before:.baseline mid:.mid after:.; do  # .mid (optional): a commit between the two
    [[ -d ${tree#*:} ]] && want kernels_ab && PYTHONPATH=/tmp/site:${tree#*:} step "kernels_${tree%%:*}" 200 python3 \
        benchmarks/kernels.py --only matmul --m 1 --formats q4_k,q5_k,q6_k,q8_0,iq4_xs --models qwen3-8b \
        --out "$R/kernels_${tree%%:*}"
done
for tree in after:. before:.baseline; do
    want e2e_ab && PYTHONPATH=/tmp/site:${tree#*:} step "e2e_${tree%%:*}" 170 python3 benchmarks/e2e.py \
        --shapes qwen3-8b --quants q4_k_m,q5_k_m --pp 512 --batches 1 --out "$R/e2e_${tree%%:*}.json"
done
want stepmem && step stepmem 200 python3 benchmarks/step_memory.py --shape qwen3-8b --quant mxfp4 --pages 8192 \
    --dump "$R/hlo"
want tp && XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 step gpu_sharded 200 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_gpu_sharded.py
want cmdbuf && step cmdbuf 240 python3 benchmarks/command_buffers.py --shape qwen3-8b --quant mxfp4 \
    --json "$R/cmdbuf.json"
want probe && step probe_q4_k_m_repeat 150 python3 benchmarks/compile_probe.py --quant q4_k_m --repeat-names \
    --json "$R/probe.json"
want probe && step probe_q4_k_m 120 python3 benchmarks/compile_probe.py --quant q4_k_m --json "$R/probe.json"
want q4file || want stepmem || want ncu || want gpue2e || want vsprep || want vs || want load || want quickload || want serving || want serveprof || want serve || want serveimp || want wall || want cmdbuf || want probe \
    || want decode || want tp || want kgpu || want kernels_ab || want e2e_ab && pack
want gptoss && step e2e_gptoss 150 python3 benchmarks/e2e.py --shapes gpt-oss-20b --quants mxfp4 --pp 512 --batches 1,8 \
    --out "$R/e2e_gptoss.json"
want 8b && step e2e_8b 190 python3 benchmarks/e2e.py --shapes qwen3-8b --quants mxfp4,q8_0 --pp 512,4096 --batches 1,8 \
    --torch --out "$R/e2e_8b.json"
want profile && step profile 80 python3 benchmarks/profile_decode.py --shape qwen3-8b --quant mxfp4 --steps 32 \
    --trace-dir "$R/trace" --json "$R/profile.json"
pack
want shapes && step e2e_shapes 170 python3 benchmarks/e2e.py --shapes qwen3.5-9b,qwen3-30b-a3b,qwen3.5-27b --quants mxfp4 \
    --pp 512 --batches 1,8 --out "$R/e2e_shapes.json"
want bf16 && step kernels_bf16 70 python3 benchmarks/kernels.py --only bf16 --m 1,16,512 --out "$R"
pack
want xla && step e2e_xla 120 python3 benchmarks/e2e.py --shapes qwen3-8b,gpt-oss-20b --quants mxfp4 --pp 512 --batches 1 \
    --paths xla --out "$R/e2e_xla.json"
want torch && step e2e_torch 500 python3 benchmarks/e2e.py --shapes qwen3.5-9b,qwen3-30b-a3b,gpt-oss-20b,qwen3.5-27b \
    --paths none --torch --pp 512 --batches 1,8 --out "$R/e2e_torch.json"

while [ -n "$(jobs -pr)" ] && (($(left) > 10)); do sleep 2; done
pkill -f "pytest -q -m gpu" 2>/dev/null
pkill -f benchmarks/memory.py 2>/dev/null
pack
tar -C "$R" -czf "$OUT/trace.tgz" trace 2>/dev/null
echo "=== steps"; cat "$R/steps.txt"
want probe && { echo "=== probe"; cat "$R/probe.json"; }
want ncu && { echo "=== ncu"; grep -E "qmatmul|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Issued Ipc|Issue Slots Busy|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Shared Memory Config|Grid Size|Block Size" "$R/ncu.log" | head -80; tail -3 "$R/ncu.log"; }
want gpue2e && { echo "=== gpu e2e"; tail -6 "$R/gpu_e2e.log"; }
want vsprep && { echo "=== vsprep"; tail -3 /tmp/vsprep.log; }
want vs && { echo "=== vs"; grep -h "^|\|copy bandwidth\|Error\|failed" "$R/vs.log"; }
want load || want quickload && { echo "=== load"; tail -8 "$R/load.log"; }
want wall && { echo "=== wall"; tail -5 "$R/wall.log"; }
want decode && { echo "=== decode"; grep -h "engine\|copy bandwidth" "$R/decode.log"; tail -3 "$R/decode.log"; }
want serving && { echo "=== serving"; tail -14 "$R/serving.log"; }
want serveprof && { echo "=== serving profile"; grep -v "^INFO\|^W" "$R/serveprof.log" | tail -60; }
want cmdbuf && { echo "=== command buffers"; grep "^|" "$R/cmdbuf.log"; }
want serve && { echo "=== serve"; grep -h "^|\|^##" "$R/serve_imp.log" "$R/serve_llama.log" | head -24
    grep -h "compiled the\|KV pages\|workspace\|sequences that fit\|available\|Error\|error" "$R/serve/imp-jax-serve.log" | head -12
    cat "$R/serve/imp-jax-metrics.txt"; }
want serveimp && { echo "=== serve, imp-jax again"; grep -h "^|\|^##" "$R/serve_imp2.log" | head -12
    grep -h "compiled the\|Error\|error" "$R/serve2/imp-jax-serve.log" | head -6; cat "$R/serve2/imp-jax-metrics.txt"; }
want stepmem && { echo "=== step memory"; grep -h "^|\|Error" "$R/stepmem.log"; tail -3 "$R/stepmem.log"; }
want tp && { echo "=== sharded"; tail -5 "$R/gpu_sharded.log"; }
want kgpu && { echo "=== kernel gpu tests"; tail -8 "$R/kernel_gpu_tests.log"; }
want kernels_ab && for t in before mid after; do echo "=== kernels $t"; grep -h "matmul\|FAILED\|HBM" "$R/kernels_$t.log" | cut -c1-230; done
want e2e_ab && for t in before after; do echo "=== e2e $t"; grep -h "^| imp-jax\|copy bandwidth\|Error" "$R/e2e_$t.log"; done
echo "=== gpu tests"; tail -5 "$R/gpu_tests.log"
echo "=== memory"; tail -9 "$R/memory.log"
echo "=== e2e"; grep -h "^| imp-jax\|^| torch" "$R"/e2e_*.log
echo "=== profile"; head -30 "$R/profile.log"
echo "=== bf16 kernel"; grep -h "^| bf16" "$R/kernels_bf16.log"
