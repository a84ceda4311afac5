#!/usr/bin/env bash
# Build llama.cpp (CUDA, sm_90) on the GPU machine from the carried tree .llama/src (scripts/llamacpp_tree.py).
# `start` copies the tree to /tmp (outside the working tree, which the next call replaces) and runs the build (nice 19,
# so timed work beside it keeps its cores)
# under setsid, logging to /tmp/llama-build.log, so it survives between calls; it takes about 7 minutes.
# `wait [SECONDS]` waits up to SECONDS (default 540) for it and reports; `status` reports at once.
# Binaries: /tmp/llama-build/bin/{llama-bench,llama-quantize,llama-completion,llama-server}.
set -euo pipefail
SRC=/tmp/llama-src BUILD=/tmp/llama-build LOG=/tmp/llama-build.log RC=/tmp/llama-build.rc

report() {
  if [[ -f $RC ]]; then
    echo "llama.cpp build finished: rc=$(cat $RC)"; ls $BUILD/bin 2>/dev/null | tr '\n' ' '; echo
  else
    echo "llama.cpp build running: $(grep -o '^\[[0-9]*/[0-9]*\]' $LOG | tail -1)"
  fi
  tail -n 3 $LOG
}

case "${1:-status}" in
  start)
    rm -rf $SRC $BUILD $RC && cp -r .llama/src $SRC
    setsid nice -n 19 bash -c "{ cmake -S $SRC -B $BUILD -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
      -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF && ninja -C $BUILD -j 14 llama-bench llama-quantize \
      llama-completion llama-server; } >$LOG 2>&1; echo \$? >$RC" </dev/null >/dev/null 2>&1 &
    echo "llama.cpp build started, log $LOG" ;;
  wait)
    for _ in $(seq "${2:-540}"); do [[ -f $RC ]] && break; sleep 1; done
    report; [[ -f $RC && $(cat $RC) == 0 ]] ;;
  status) report ;;
  *) echo "usage: $0 start|wait [SECONDS]|status" >&2; exit 2 ;;
esac
