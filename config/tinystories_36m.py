"""train_gpt2.py: EXPERIMENTS.md §2's model (width 512, 8 layers, 8 heads, context 256; RMSNorm, RoPE,
SwiGLU) on TinyStories, batch 128 x 256 tokens for 5,000 steps at the log's best LR, 2e-3. In GPT-2 BPE the
tied 50,304 x 512 embedding makes it 51.45M parameters (the log's 36M had a 32K vocabulary). The LR and
batch sweeps and the ablations run this recipe through sweep.py (README: Sweeps).

    python prepare_fineweb.py --dataset=roneneldan/TinyStories --name=None --out_dir=data/tinystories
    python train_gpt2.py config/tinystories_36m.py
"""
data_dir = "data/tinystories"
out_dir = "out/tinystories_36m"
n_layer = 8
n_head = 8
n_embd = 512
block_size = 256
micro_batch_size = 128
total_batch_size = 32768  # 128 x 256
max_lr = 2e-3
min_lr = 2e-4
warmup_steps = 250
max_steps = 5000
eval_interval = 500
hellaswag_interval = 0
checkpoint_interval = 0
