"""train_lstm.py: EXPERIMENTS.md §5's baseline, the context-vector LM on word-level WikiText-2 (1,000 words +
<unk> + <eos>): embedding 256, hidden 512, context 256, 6 layers, tied; 2,048 streams of 64 tokens, Adam at
4e-4 -> 4e-5, fp16 with a gradient scaler (a GPU), 800 steps (~50 epochs), early stopping after 15
evaluations without a better val loss. On a CPU add --dtype=float32.

    python prepare_wikitext.py --tokenizer=word --vocab_words=1000
    python train_lstm.py config/lstm_context_vector_word.py
"""
data_dir = "data/wikitext-2-raw-v1_word"
out_dir = "out/lstm_context_vector"
model = "context_vector"
n_embd = 256
n_hidden = 512
context_dim = 256
n_layer = 6
tie_embeddings = True
block_size = 64
micro_batch_size = 2048
optimizer = "adam"
weight_decay = 0.0
max_lr = 4e-4
min_lr = 4e-5
max_steps = 800
eval_interval = 16
patience = 15
dtype = "float16"
