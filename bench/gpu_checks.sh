#!/bin/bash
# GPU checks for moekit (one H200): the GPU tests, then the bf16 benchmarks. Each step is time-boxed.
# Run on a GPU machine from the repository root: OUT=/tmp/out bench/gpu_checks.sh (writes OUT/*.json)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() { local t=$1 name=$2; shift 2; echo "=== $name"; s=$(date +%s); timeout $t "$@" > $OUT/$name.json 2> $OUT/$name.err; rc=$?; echo "rc=$rc $(( $(date +%s) - s ))s"; tail -c 5000 $OUT/$name.json; tail -4 $OUT/$name.err; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
echo "=== gpu tests"; timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_moe.py tests/test_infer_engine.py tests/test_infer_graphs.py tests/test_train_loop.py tests/test_plan_hardware.py 2>&1 | tail -25
step 200 decode python3 bench/decode.py --device cuda --dtypes bf16,int8 --concurrency 1,8,32 --tokens 64
step 60 moe_layer python3 bench/moe_layer.py --device cuda --dtypes bf16 --tokens 16384 --repeats 10
step 90 train_step python3 bench/train_step.py --batch-tokens 65536 --repeats 3 --gemm-n 8192 --profile 12
step 150 train_step_compiled python3 bench/train_step.py --batch-tokens 65536 --repeats 3 --gemm-n 8192 --dtypes bf16 --compile
