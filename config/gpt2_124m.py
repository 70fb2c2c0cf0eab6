"""train_gpt2.py: EXPERIMENTS.md §1's model, data and schedule with Muon: the script's own defaults,
written out so a fork can see and edit the whole recipe in one place.

    python prepare_fineweb.py && python train_gpt2.py config/gpt2_124m.py
    torchrun --standalone --nproc_per_node=8 train_gpt2.py config/gpt2_124m.py
"""
data_dir = "data/fineweb10B"
out_dir = "out"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
micro_batch_size = 32
total_batch_size = 524288  # 2**19 tokens per step: 16 accumulation steps on one GPU, 2 on eight
optimizer = "muon"
max_lr = 1.8e-3
min_lr = 1.8e-4
warmup_steps = 285
max_steps = 38146  # ~20B tokens, two epochs of FineWeb-Edu 10BT
eval_interval = 250
hellaswag_interval = 250
checkpoint_interval = 5000
