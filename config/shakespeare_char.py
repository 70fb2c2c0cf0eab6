"""train_gpt2.py: Tiny Shakespeare at character level on a laptop CPU, nanoGPT's CPU recipe size, with
this repo's modern GPT and Muon (README: CPU quick start). About 3 minutes on 2 cores; val loss 1.58-1.59.

    python prepare_wikitext.py --tokenizer=char --out_dir=data/shakespeare_char \
        --text_file=https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
    python train_gpt2.py config/shakespeare_char.py
"""
data_dir = "data/shakespeare_char"
out_dir = "out/shakespeare_cpu"
device = "cpu"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
micro_batch_size = 12
total_batch_size = 768  # 12 x 64: no accumulation
max_steps = 2000
max_lr = 3e-3
min_lr = 3e-4
warmup_steps = 100
eval_interval = 500
val_steps = 145  # the whole val split: 145 batches of 12 x 64 tokens
hellaswag_interval = 0  # HellaSwag needs GPT-2 BPE tokens
checkpoint_interval = 0  # one checkpoint, after the last step
sample_tokens = 200
sample_prompt = "ROMEO:"
log_interval = 100
