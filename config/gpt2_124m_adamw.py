"""train_gpt2.py: EXPERIMENTS.md §1 exactly as it was run: the modern GPT-2 124M on FineWeb-Edu 10BT with
fused AdamW (betas 0.9, 0.95, weight decay 0.1 on 2-D tensors), 1.8e-3 -> 1.8e-4 cosine after 285 warmup
steps, 38,146 steps of 524,288 tokens. The original run: val loss 2.99, HellaSwag 32%.

    python prepare_fineweb.py && python train_gpt2.py config/gpt2_124m_adamw.py
    torchrun --standalone --nproc_per_node=8 train_gpt2.py config/gpt2_124m_adamw.py
"""
data_dir = "data/fineweb10B"
out_dir = "out/gpt2_124m_adamw"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
micro_batch_size = 32
total_batch_size = 524288
optimizer = "adamw"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
max_lr = 1.8e-3
min_lr = 1.8e-4
warmup_steps = 285
max_steps = 38146
eval_interval = 250
val_steps = 20
hellaswag_interval = 250
checkpoint_interval = 5000
