"""train_gpt2.py: EXPERIMENTS.md §3's final run alone (GPT-tiny: width 256, 8 layers, 8 heads, sequence 64,
1,024 sequences per step as 256 x 4 accumulation, 12,590 steps, 5e-3 -> 5e-4 after 10% warmup). The search
that chose it is sweep.py --mode=random (README: Sweeps).

    python train_gpt2.py config/gpt_tiny.py
"""
data_dir = "data/tinystories"
out_dir = "out/gpt_tiny"
n_layer = 8
n_head = 8
n_embd = 256
block_size = 64
micro_batch_size = 256
total_batch_size = 65536  # 1,024 sequences of 64 tokens
max_lr = 5e-3
min_lr = 5e-4
warmup_steps = 1259
max_steps = 12590
hellaswag_interval = 0
