"""train_lstm.py: EXPERIMENTS.md §4, the nested-learning LSTM on WikiText-2 characters (train_lstm.py's
defaults, written out): levels updated every 1, 16 and 256 steps at LR 3e-4 / C_k, surprise weights 0.05
and 0.01, 64 persistent streams x 512 tokens, 5,000 steps. 1.23M parameters.

    python prepare_wikitext.py --tokenizer=char && python train_lstm.py config/lstm_nested_char.py
"""
data_dir = "data/wikitext-2-raw-v1_char"
out_dir = "out_lstm"
model = "nested_lstm"
n_layer = 2
n_embd = 128
n_hidden = 256
chunk_sizes = "1,16,256"
ffn_hidden = 192
surprise_weights = "0.05,0.01"
micro_batch_size = 64
block_size = 512
max_steps = 5000
warmup_steps = 100
max_lr = 3e-4
min_lr = 3e-5
eval_interval = 250
checkpoint_interval = 2000
