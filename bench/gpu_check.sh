#!/usr/bin/env bash
# Every GPU path once, for whoever is lent a GPU machine (one H100 or H200: about 10 minutes):
#   1. bench/experts_gpu.py: the Triton grouped kernels in bf16, int8, fp8 and int4 at Mixtral 8x7B's
#      sizes against torch's per-expert path, and an NCCL group;
#   2. bench/engine_gpu.py --layers 2: the engine at Mixtral's layer sizes against transformers, decode
#      tokens/s, CUDA-graph capture and replay (tokens equal to eager) against the HBM roofline;
#   3. `expertmesh serve` of a Mixtral-size 2-layer checkpoint answering a request through the CLI:
#      with --workers 2 where there are 3 GPUs (NCCL wants a GPU per rank: the router and two
#      workers), else --workers 0 on the one GPU (the NCCL pairs then wait for a machine with more).
# Prints each step's last line, then one line: gpu_check: <step>=<result> ...
# Without a GPU it says so and exits 0. Usage: bash bench/gpu_check.sh   (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
EM="$PY -m expertmesh"

gpus=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$gpus" = "0" ]; then
    echo "gpu_check: no CUDA GPU here (torch sees none): nothing run"
    exit 0
fi
$PY -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), 'torch', torch.__version__)"
work=$(mktemp -d)
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT
summary=()

# step NAME SECONDS COMMAND...: run it with a deadline, keep its output, note its last line
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    if timeout "$limit" "$@" > "$work/$name.log" 2>&1; then
        summary+=("$name=ok($((SECONDS - start))s)")
    else
        summary+=("$name=FAILED($((SECONDS - start))s)")
    fi
    echo "--- $name: $(tail -n 1 "$work/$name.log")"
}

step experts 240 $PY bench/experts_gpu.py
step engine 240 $PY bench/engine_gpu.py --layers 2

workers=0
[ "$gpus" -ge 3 ] && workers=2
step checkpoint 180 $EM tiny-checkpoint "$work/mixtral2" --layers 2 --hidden 4096 --intermediate 14336 \
    --heads 32 --kv-heads 8 --dtype bfloat16
$EM serve --model "$work/mixtral2" --workers "$workers" --device cuda --dtype bfloat16 --port 0 --no-http \
    --max-seqs 8 > "$work/serve.log" 2>&1 &
server=$!
target=""
for _ in $(seq 240); do
    target=$(sed -n 's/^expertmesh serving .* on \([^ ]*\) (gRPC.*/\1/p' "$work/serve.log" | head -n 1)
    [ -n "$target" ] && break
    kill -0 "$server" 2>/dev/null || break
    sleep 1
done
if [ -n "$target" ]; then
    step generate 120 $EM generate --target "$target" --max-new-tokens 8 --temperature 0 "The capital of France is"
    step info 60 $EM info --target "$target"
else
    summary+=("serve=FAILED(no listening line)")
    echo "--- serve: $(tail -n 3 "$work/serve.log")"
fi
kill "$server" 2>/dev/null
wait "$server" 2>/dev/null
server=""
nccl="nccl_pairs=skipped(${gpus} GPU; needs 3)"
[ "$workers" = "2" ] && nccl="nccl_pairs=serve --workers 2"
echo "gpu_check: ${summary[*]} $nccl"
echo "gpu_check: $(grep -h '=' "$work/experts.log" | tail -n 1) $(grep -h '=' "$work/engine.log" | tail -n 1)"
