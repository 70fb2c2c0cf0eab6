#!/usr/bin/env bash
# GPU validation in one call (about 5 minutes on an H100/H200): the test suite with the CUDA tests, bench.py
# at GPT-2 124M (B=32, T=1024, compiled, bf16) with the profile, a real bf16 compiled training run stopped and
# resumed, and HellaSwag scoring speed on 10,042 examples.
#   bash scripts/gpu_check.sh            # from the repo root, on a machine with a CUDA GPU
# Logs and JSON go to $OUT (default gpu_check_out/). SHARED=path names a folder with data/tinyshakespeare.txt and
# the GPT-2 BPE files in tiktoken_cache/ (default ../shared); online, tiktoken downloads its files itself.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}; mkdir -p "$out"
shared=${SHARED:-../shared}
[ -d "$shared/tiktoken_cache" ] && export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$shared/tiktoken_cache}
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
step() { echo; echo "== $1"; }
# before anything slow: on a machine without CUDA the 124M steps would run on the CPU for minutes
$py -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
    || { echo "gpu_check: no CUDA GPU that torch can use here: run it on a machine with one" >&2; exit 1; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/device.txt"

step "1. the test suite, CUDA tests included"
$py -m pytest -q -x tests/test_cuda.py tests/test_model.py -rs 2>&1 | tee "$out/pytest.txt" | tail -8 || status=1

step "2. bench.py at 124M: modern + Muon (the default), modern + AdamW, the GPT-2 classic layout + AdamW; profile"
$py bench.py --preset=gpt2 --variants=base,adamw,classic+adamw --steps=20 --warmup=5 --profile=True \
    --json_out="$out/bench.json" 2>&1 | tee "$out/bench.txt" | tail -30 || status=1

step "3. a real bf16 compiled run: Tiny Shakespeare in GPT-2 BPE, stop at 150, resume to 300"
data=data/gpu_check_shakespeare
$py prepare_wikitext.py --text_file="$shared/data/tinyshakespeare.txt" --tokenizer=gpt2 --out_dir="$data" \
    > "$out/prepare.txt" 2>&1 || status=1
run="--data_dir=$data --out_dir=$out/run --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --micro_batch_size=16
     --total_batch_size=16384 --max_steps=300 --warmup_steps=30 --max_lr=1e-3 --min_lr=1e-4 --eval_interval=50
     --val_steps=4 --hellaswag_interval=0 --checkpoint_interval=100 --sample_tokens=40 --sample_prompt=ROMEO: --log_interval=25"
$py train_gpt2.py $run --stop_step=150 2>&1 | tee "$out/train_a.txt" | tail -8 || status=1
$py train_gpt2.py --out_dir="$out/run" --resume=True 2>&1 | tee "$out/train_b.txt" | tail -8 || status=1
grep -q "resumed from" "$out/train_b.txt" || { echo "! the resume did not happen"; status=1; }

step "4. HellaSwag scoring speed, 124M model, 10,042 synthetic examples in the real schema"
$py bench.py --preset=gpt2 --variants=base --steps=2 --warmup=1 --hellaswag=True --hellaswag_examples=10042 \
    --json_out="$out/bench_hellaswag.json" 2>&1 | tee "$out/bench_hellaswag.txt" | tail -4 || status=1

echo; echo "gpu_check: $([ $status = 0 ] && echo all steps ran || echo SOME STEPS FAILED), logs in $out/"
exit $status
