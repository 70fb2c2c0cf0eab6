"""Train a GPT on token shards: one CPU core to eight GPUs, with exact resume.

    python train_gpt2.py                                     # GPT-2 124M on FineWeb-Edu, Muon (EXPERIMENTS.md §1)
    python train_gpt2.py config/gpt2_124m_adamw.py           # §1 exactly as it was run (AdamW)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # the same on 8 GPUs, data-parallel
    python train_gpt2.py --resume=True                       # continue the run in out/ exactly where it stopped
    python train_gpt2.py config/shakespeare_char.py          # a char-level toy on a laptop CPU (README)

Settings: the constants below (the defaults are §1's model, data and schedule), then config files
(config/*.py: `name = value` lines, read and never run), then --name=value; --help lists them all.
The run's folder, resume, checkpoints, the NaN watch, signals and the log are training.Run's.
"""
import dataclasses
import math
import os
import sys

import torch

import data
import hellaswag
import training
import utils
from model import GPT, MLPS, NORM_POSS, NORMS, POS_EMBS, SIZES, GPTConfig

# -----------------------------------------------------------------------------
# settings (all overridable with config files and --name=value)
# data and output: folders are relative to the repo folder, wherever you run from
data_dir = "data/fineweb10B"  # folder of *_train_*.bin / *_val_*.bin shards (prepare_fineweb.py)
out_dir = "out"               # checkpoints, log.jsonl, loss.png; one run per folder
shuffle = True                # shuffle windows across all shards, anew each epoch from the seed
allow_data_change = False     # resume although the train shards differ from the checkpoint's
# model: every field of model.GPTConfig is a setting (--n_layer=6, --rope_base=5e5, ...), with
# GPTConfig's default (the modern GPT-2 124M) unless set here
globals().update(utils.fields_of(GPTConfig))
vocab_size = 0                # 0 = meta.json's rounded up to a multiple of 64 (GPT-2: 50304); init_from's
init_from = ""                # "" = random init; gpt2 | gpt2-medium | ... | an HF GPT-2 folder | a .pt (weights)
# batch
micro_batch_size = 32         # sequences per forward pass per process (B)
total_batch_size = 524288     # tokens per optimizer step, all processes and micro-steps together
# optimization
optimizer = "muon"            # muon | adamw (Muon for the hidden matrices, AdamW for the rest; adamw = §1 as run)
max_lr = 1.8e-3               # peak LR of AdamW and (RMS-matched) Muon
min_lr = 1.8e-4               # LR at the last step
warmup_steps = 285            # linear warmup, steps
max_steps = 38146             # ~20B tokens = 2 epochs of FineWeb-Edu 10BT
lr_schedule = "cosine"        # cosine | wsd (warmup-stable-decay) | constant
decay_steps = 0               # wsd only: length of the final linear decay, steps
flop_budget = None            # FLOPs; if set, max_steps = budget / (FLOPs/token x total_batch_size)
weight_decay = 0.1            # on 2-D+ parameters only
beta1 = 0.9                   # AdamW
beta2 = 0.95                  # AdamW
grad_clip = 1.0               # max global grad norm; 0 = off
muon_split_qkv = False        # Muon orthogonalises q, k, v as 3 matrices, not one (modded-nanogpt)
# evaluation, logging, checkpoints (intervals in steps; 0 = never)
eval_interval = 250           # val loss (and a sample) every this many steps and after the last
val_steps = 20                # val batches of micro_batch_size x block_size per process
hellaswag_interval = 250      # HellaSwag acc_norm (GPT-2 BPE data only), also after the last step
hellaswag_file = None         # None = hellaswag.py's cache (downloaded once); a file is read as given
hellaswag_limit = 0           # 0 = all 10,042 examples
sample_tokens = 32            # tokens sampled at each eval (0 = no samples)
sample_prompt = "Hello, I'm a language model,"
log_interval = 10             # steps between log lines
checkpoint_interval = 5000    # steps between checkpoints (and one after the last step)
keep_checkpoints = 3          # newest checkpoints kept in out_dir (0 = all)
resume = False                # continue from the newest checkpoint in out_dir, with its settings
stop_step = -1                # checkpoint and stop before this step, as if interrupted (-1 = never)
wandb_project = None          # log to Weights & Biases under this project (needs pip install wandb)
plot_only = False             # only redraw out_dir/loss.png from out_dir/log.jsonl, then exit
# system
device = ""                   # "" = cuda, then mps, then cpu
dtype = ""                    # "" = bf16 autocast on GPUs with native bf16, else float16 + GradScaler; CPU float32
compile = True                # torch.compile the training model (CUDA only)
seed = 1337

CHOICES = dict(pos_emb=POS_EMBS, mlp=MLPS, norm=NORMS, norm_pos=NORM_POSS, optimizer=("muon", "adamw"),
               lr_schedule=training.LR_SCHEDULES, dtype=utils.DTYPES)
# what the command line may change when resuming (any other change is refused)
RESUME_CAN_CHANGE = ("data_dir", "micro_batch_size", "max_lr", "min_lr", "warmup_steps",
                     "max_steps", "lr_schedule", "decay_steps", "flop_budget", "grad_clip",
                     "eval_interval", "val_steps", "hellaswag_interval", "hellaswag_file",
                     "hellaswag_limit", "sample_tokens", "sample_prompt", "log_interval",
                     "checkpoint_interval", "keep_checkpoints", "wandb_project",
                     "device", "dtype", "compile")
GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256}  # llm.c's shards have no meta.json


def check_settings():
    """Each setting's range, before any work: exit 2 naming the setting."""
    s = globals()
    for name in ("micro_batch_size", "block_size", "total_batch_size", "max_steps", "val_steps"):
        utils.require(s[name] >= 1, f"--{name} must be at least 1, got {s[name]}")
    for name in ("vocab_size", "warmup_steps", "decay_steps", "eval_interval", "hellaswag_interval",
                 "hellaswag_limit", "sample_tokens", "log_interval", "checkpoint_interval",
                 "keep_checkpoints", "seed"):
        utils.require(s[name] >= 0, f"--{name} must be 0 or more, got {s[name]}")
    for name in ("max_lr", "min_lr", "weight_decay", "grad_clip"):
        utils.require(math.isfinite(s[name]) and s[name] >= 0,
                      f"--{name} must be a finite number >= 0, got {s[name]}")
    utils.require(max_lr > 0, f"--max_lr must be above 0, got {max_lr}")
    for name in ("beta1", "beta2"):
        utils.require(0 <= s[name] < 1, f"--{name} must be in [0, 1), got {s[name]}")
    utils.require(flop_budget is None or (isinstance(flop_budget, (int, float))
                                          and math.isfinite(flop_budget) and flop_budget > 0),
                  f"--flop_budget must be a positive number of FLOPs (or None), got {flop_budget!r}")
    utils.require(stop_step >= -1, f"--stop_step must be a step or -1 (never), got {stop_step}")


# -----------------------------------------------------------------------------
# evaluation: val loss, a sample


def evaluate(model, val_loader, autocast, dev):
    """Mean val loss over val_steps batches from the split's start, averaged over ranks."""
    model.eval()
    val_loader.reset()
    total = torch.zeros((), device=dev)
    with torch.no_grad():
        for _ in range(val_steps):
            x, y = val_loader.next_batch()
            with autocast:
                _, loss = model(x.to(dev), y.to(dev))
            total += loss.detach()
    model.train()
    return utils.all_reduce_sum(total).item() / (val_steps * val_loader.world_size)


def sample(raw_model, meta, autocast, dev):
    """sample_prompt and sample_tokens sampled after it (top-k 50, temperature 1), as text."""
    generator = torch.Generator(device=dev).manual_seed(seed)
    idx = torch.tensor([data.encode(sample_prompt, meta)], dtype=torch.long, device=dev)
    raw_model.eval()
    with autocast:
        out = raw_model.generate(idx, sample_tokens, temperature=1.0, top_k=50,
                                 generator=generator, n_vocab=meta["vocab_size"])
    raw_model.train()
    return data.decode(out[0].tolist(), meta)


def can_sample(meta, print0):
    """Whether samples can be decoded (a tiktoken vocabulary needs its BPE files)."""
    if not sample_tokens or meta.get("itos") is not None:
        return bool(sample_tokens)
    try:
        data.tiktoken_encoding(meta["tokenizer"])
        return True
    except SystemExit as e:
        print0(f"warning: no samples: {str(e).removeprefix('error: ')}")
        return False


# -----------------------------------------------------------------------------


def main(argv):
    utils.apply_overrides(globals(), argv, CHOICES)
    if plot_only:
        log = os.path.join(utils.in_repo(out_dir), "log.jsonl")
        utils.require(os.path.exists(log), f"--plot_only needs {log}: point --out_dir at a run")
        print(utils.plot_log(log, os.path.join(utils.in_repo(out_dir), "loss.png"))
              or "matplotlib is not installed")
        return
    check_settings()
    # the out_dir: locked, then resumed (with the checkpoint's settings) or started afresh
    run = training.Run(globals(), argv, RESUME_CAN_CHANGE, check_settings)
    print0 = run.print0

    # ---- processes, device, precision ------------------------------------------------------------
    rank, local_rank, world_size, dev = utils.setup_distributed(utils.pick_device(device))
    device_type = dev.split(":")[0]
    precision = utils.pick_dtype(dtype, device_type)
    autocast = utils.autocast_context(device_type, precision)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls

    # ---- data, batch -----------------------------------------------------------------------------
    data_path = utils.in_repo(data_dir)
    meta = data.read_meta(data_path)
    start_from = initial_weights(meta or GPT2_META) if init_from and not run.start_step else None
    vocab = vocab_size or (start_from[0].vocab_size if start_from else data.model_vocab_size(meta))
    meta = meta or GPT2_META
    utils.require(meta["vocab_size"] <= vocab, f"--vocab_size {vocab} is below the data's "
                                               f"vocabulary ({meta['vocab_size']} in {data_path})")
    try:  # the model settings, GPTConfig's fields, as one object
        model_config = GPTConfig(**{**{f.name: globals()[f.name]
                                       for f in dataclasses.fields(GPTConfig)}, "vocab_size": vocab})
    except ValueError as e:
        utils.bad_setting(str(e))
    B, T = micro_batch_size, model_config.block_size
    utils.require(total_batch_size % (B * T * world_size) == 0,
                  f"--total_batch_size {total_batch_size} is not a multiple of micro_batch_size {B} "
                  f"x block_size {T} x world_size {world_size} = {B * T * world_size}")
    accum_steps = total_batch_size // (B * T * world_size)
    try:
        train_loader = data.WindowLoader(data_path, "train", B, T, rank, world_size,
                                         shuffle=shuffle, seed=seed, vocab_size=vocab)
        val_loader = data.WindowLoader(data_path, "val", B, T, rank, world_size, vocab_size=vocab)
    except data.ShardError as e:
        raise SystemExit(f"error: {e}\n  prepare data with prepare_fineweb.py or "
                         f"prepare_wikitext.py, then pass its folder as --data_dir") from None

    # ---- model and optimizers ----------------------------------------------------------------------
    torch.manual_seed(seed)  # the same initial weights on every rank
    raw_model = GPT(model_config).to(dev)  # saved, sampled, scored: never compiled or wrapped
    if start_from:  # --init_from: another model's weights, this run's step 0
        raw_model.load_state_dict(fits_weights(model_config, *start_from))
    steps = max_steps
    if flop_budget:
        steps = int(flop_budget // (raw_model.flops_per_token() * total_batch_size))
        utils.require(steps >= 1, f"--flop_budget {flop_budget:g} buys no step of "
                                  f"{total_batch_size} tokens")
    optimizers = raw_model.configure_optimizers(optimizer, weight_decay, max_lr, (beta1, beta2),
                                                1e-8, device_type, muon_split_qkv)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "float16")
    compiled = compile and device_type == "cuda"
    settings = dict(utils.settings_of(globals()), vocab_size=vocab, max_steps=steps)  # as run
    c, n_params = model_config, raw_model.num_params()
    run.begin(settings, model=raw_model, model_config=model_config, optimizers=optimizers,
              scaler=scaler, loader=train_loader, meta=meta, device=dev, compiled=compiled,
              details=dict(dtype=precision, grad_accum_steps=accum_steps), header=[
                  f"{utils.run_header(dev)['device']} | torch {torch.__version__} | world "
                  f"{world_size} | {precision} | {n_params / 1e6:.2f}M parameters | {optimizer}",
                  f"model: {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context "
                  f"{c.block_size}, vocab {c.vocab_size} ({c.pos_emb}, {c.mlp}, {c.norm}"
                  f"{', tied' * c.tie_embeddings}){f', from {init_from}' if init_from else ''}",
                  f"{total_batch_size:,} tokens per step = {B} x {T} x "
                  f"{world_size} processes x {accum_steps} accumulation steps; steps "
                  f"{run.start_step}..{steps - 1} ({total_batch_size * steps:,} tokens in all)"])
    model = training.wrap(raw_model, compiled, world_size, dev)
    hellaswag_set = hellaswag.for_training(meta, hellaswag_file, hellaswag_limit, local_rank,
                                           world_size, dev, print0) if hellaswag_interval else None
    sampling = can_sample(meta, print0) and run.master

    # ---- the loop: evaluate, step, log, checkpoint --------------------------------------------------
    for step in range(run.start_step, steps + 1):
        last_step = step == steps  # after the last update: evaluate the weights that are saved
        if not last_step and run.stopping(step):  # --stop_step, SIGTERM, Ctrl-C
            break
        if eval_interval and (step % eval_interval == 0 or last_step):
            with run.paused():  # not training time
                val_loss = evaluate(model, val_loader, autocast, dev)
                print0(f"step {step:6d} | val loss {val_loss:.4f}")
                run.log.write(step=step, val_loss=val_loss)
                if sampling:
                    text = sample(raw_model, meta, autocast, dev)
                    print0(f"step {step:6d} | sample:\n{data.printable(text)}")
                    run.log.write(step=step, sample=text)
        if hellaswag_set and (step % hellaswag_interval == 0 or last_step):
            with run.paused():
                res = hellaswag.evaluate(raw_model, *hellaswag_set, dev, autocast_ctx=autocast,
                                         rank=rank, world_size=world_size)
                print0(f"step {step:6d} | hellaswag acc_norm {res['acc_norm']:.4f} "
                       f"({res['correct_norm']}/{res['total']}, {res['style']} style)")
                run.log.write(step=step, hellaswag_acc=res["acc"], hellaswag_acc_norm=res["acc_norm"])
        if last_step:
            break

        lr_factor = training.lr_factor(step, settings)
        loss, grad_norm = training.train_step(model, optimizers, train_loader.next_batch, lr_factor,
                                              accum_steps=accum_steps, scaler=scaler,
                                              autocast=autocast, device=dev, grad_clip=grad_clip)
        # the NaN watch (float16: an overflowed gradient is a step GradScaler skips, not a divergence)
        run.after_step(step, loss, *([] if scaler.is_enabled() else [grad_norm]))
        if log_interval and (step % log_interval == 0 or step == steps - 1):
            run.log_step(step, loss, grad_norm, max_lr * lr_factor, total_batch_size,
                         mfu=lambda rate: raw_model.estimate_mfu(rate / world_size, dev))
        if checkpoint_interval and (step + 1) % checkpoint_interval == 0:
            run.save(step + 1)
    run.end(step)


def initial_weights(meta):
    """(GPTConfig, state dict) of init_from: GPT-2's weights (by name or a folder) or a checkpoint's.
    The vocabulary stays theirs: untrained padding rows would take probability from every token."""
    if init_from.endswith(".pt"):
        ckpt = utils.load_checkpoint(init_from)
        return GPTConfig(**ckpt["model_config"]), ckpt["model"]
    utils.require(not os.path.isfile(init_from), f"--init_from={init_from}: a checkpoint is a .pt file")
    utils.require(init_from not in SIZES or meta["tokenizer"] == "gpt2",
                  f"--init_from={init_from} is a GPT-2 BPE model, and --data_dir={data_dir} holds "
                  f"{meta['tokenizer']} tokens")
    try:
        weights = GPT.from_pretrained(init_from)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: --init_from={init_from}: {' '.join(str(e).split())[:300]}") from None
    return weights.config, weights.state_dict()


def fits_weights(config, theirs, state_dict):
    """state_dict for `config`, the weights' model but for dropout and a shorter context; else exit 2."""
    wrong = [f"--{k}={getattr(config, k)!r} (the weights: {v!r})" for k, v in
             dataclasses.asdict(theirs).items() if k not in ("block_size", "dropout")
             and getattr(config, k) != v]
    if config.block_size > theirs.block_size:
        wrong.append(f"--block_size={config.block_size} (the weights: at most {theirs.block_size})")
    utils.require(not wrong, f"--init_from={init_from} needs the model of its weights: "
                             + ", ".join(wrong))
    if "transformer.wpe.weight" in state_dict:
        state_dict["transformer.wpe.weight"] = state_dict["transformer.wpe.weight"][:config.block_size]
    return state_dict


if __name__ == "__main__":
    main(sys.argv[1:])
