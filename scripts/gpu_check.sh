#!/usr/bin/env bash
# GPU validation in one call (issue 8): the full test suite with the CUDA tests, bench.py on GPT-2 124M,
# a real bf16 + torch.compile training run with a resume, and HellaSwag scoring time for 10,042 examples.
#   bash scripts/gpu_check.sh            # from the repo root, on a machine with a CUDA GPU
# Logs and JSON go to $OUT (default gpu_check_out/). Needs ../shared (the test corpora and the GPT-2 BPE
# files) or SHARED=path; a tmp copy of it inside the repo works on machines that only receive the repo.
# Status: written without a GPU at hand; the first session with one runs it and fixes what breaks.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}; mkdir -p "$out"
shared=${SHARED:-../shared}
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$shared/tiktoken_cache} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
step() { echo; echo "== $1"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/device.txt"

step "1. the test suite, CUDA tests included"
$py -m pytest -q tests -rs 2>&1 | tee "$out/pytest.txt" | tail -25 || status=1

step "2. bench.py: GPT-2 124M, B=32, T=1024 (then B=16), eager vs compile, fp32/TF32 vs bf16, SDPA kernels, optimizers"
$py bench.py --preset=gpt2 --steps=30 --warmup=5 --json_out="$out/bench_b32.json" 2>&1 | tee "$out/bench_b32.txt" | tail -20 || status=1
$py bench.py --preset=gpt2 --micro_batch_size=16 --variants=eager,compile --steps=30 --json_out="$out/bench_b16.json" \
    2>&1 | tee "$out/bench_b16.txt" | tail -8 || status=1

step "3. a real bf16 run: Tiny Shakespeare in GPT-2 BPE, compile on, stop at 150, resume to 300"
data=data/gpu_check_shakespeare
$py prepare_wikitext.py --text_file="$shared/data/tinyshakespeare.txt" --tokenizer=gpt2 --out_dir="$data" \
    > "$out/prepare.txt" 2>&1 || status=1
run="--data_dir=$data --out_dir=$out/run --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --micro_batch_size=16
     --total_batch_size=16384 --max_steps=300 --warmup_steps=30 --max_lr=1e-3 --min_lr=1e-4 --eval_interval=50
     --val_steps=4 --hellaswag_interval=0 --checkpoint_interval=100 --sample_tokens=40 --sample_prompt=ROMEO: --log_interval=25"
$py train_gpt2.py $run --stop_step=150 2>&1 | tee "$out/train_a.txt" | grep -v "^{" | tail -12 || status=1
$py train_gpt2.py $run --resume=True 2>&1 | tee "$out/train_b.txt" | grep -v "^{" | tail -12 || status=1
grep -q "resumed from" "$out/train_b.txt" || { echo "! the resume did not happen"; status=1; }

step "4. HellaSwag scoring speed, 124M model, 10,042 synthetic examples in the real schema"
$py bench.py --preset=gpt2 --variants=compile --steps=3 --warmup=2 --hellaswag=True --hellaswag_examples=10042 \
    --json_out="$out/bench_hellaswag.json" 2>&1 | tee "$out/bench_hellaswag.txt" | tail -6 || status=1

echo; echo "gpu_check: $([ $status = 0 ] && echo all steps ran || echo SOME STEPS FAILED), logs in $out/"
exit $status
