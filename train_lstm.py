"""Train the recurrent models (lstm, nested_lstm, context_vector) with persistent hidden states.

    python prepare_wikitext.py --tokenizer=char && python train_lstm.py     # §4 nested LSTM, char level
    python prepare_wikitext.py --tokenizer=word --vocab_words=1000
    python train_lstm.py --model=context_vector --data_dir=data/wikitext-2-raw-v1_word \
        --n_embd=256 --n_hidden=512 --context_dim=256 --n_layer=6 --tie_embeddings=True \
        --block_size=64 --micro_batch_size=2048 --optimizer=adam --weight_decay=0 \
        --max_lr=4e-4 --min_lr=4e-5 --max_steps=800 --eval_interval=16 --patience=15 \
        --dtype=float16     # §5 baseline on a GPU: ~16 steps per epoch, 50 epochs, patience 15
    python train_lstm.py --out_dir=out_lstm --resume=True [--max_steps=10000]  # go on with the run's settings
    torchrun --standalone --nproc_per_node=2 train_lstm.py ...               # DDP: each rank its own streams

Data (data.StreamLoader): each batch row is one contiguous stream through the split; the hidden
states carry over from batch to batch, detached (truncated BPTT over block_size tokens). Rank r owns
streams r*B .. r*B + B - 1, so its states never leave its device; when the streams run out they
restart at their segment starts and the states are zeroed (the text no longer continues).
Checkpoints hold every rank's states (gathered on rank 0, rows in global stream order), the loader
position and the slow levels' partially accumulated gradients, so a resumed run continues exactly
(same losses on CPU). A resumed run takes its settings from its checkpoint: the command line may
change only those in RESUME_CAN_CHANGE.

nested_lstm: level k has its own optimizer; its gradients are summed into a buffer every step and it
steps only when (step + 1) % C_k == 0, at get_lr(step) / C_k. Grad clipping is per level: level 1
clips each step's gradient at grad_clip; a slow level clips its chunk's summed gradient at
grad_clip * C_k (= its mean gradient at grad_clip).
"""
import dataclasses
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import train_gpt2
import utils
from model import RECURRENT_MODELS, LSTMConfig, build_recurrent

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings (all overridable with --name=value)
# data and output; relative paths are relative to this file's folder, not the current one
data_dir = "data/wikitext-2-raw-v1_char"  # shards + meta.json (prepare_wikitext.py --tokenizer=char)
out_dir = "out_lstm"         # log.jsonl, checkpoints and loss.png
device = ""                  # "" = cuda, then mps, then cpu
dtype = ""                   # "" = bfloat16 on GPUs with it, float16 on older GPUs, float32 on CPU
compile = False              # torch.compile the model (the context_vector loop compiles slowly)
seed = 1337
# model (§4 defaults: char level, 1.23M params)
model = "nested_lstm"        # lstm | nested_lstm | context_vector
n_layer = 2                  # LSTM layers / context layers
n_embd = 128                 # token embedding width
n_hidden = 256               # LSTM width / context_vector hidden width
dropout = 0.0
tie_embeddings = False       # needs n_embd == n_hidden (lstm) or == context_dim (context_vector)
chunk_sizes = "1,16,256"     # nested_lstm: update period of each level in steps; the number of levels
ffn_hidden = 192             # nested_lstm: hidden width of each slow level's FFN
surprise_weights = "0.05,0.01"  # nested_lstm: loss weight of each slow level's surprise head
context_dim = 256            # context_vector: width of the carried context vector
# batch: micro_batch_size streams per rank, each advancing block_size tokens per step
micro_batch_size = 64        # rows = streams per rank
block_size = 512             # tokens per row per step = the truncated-BPTT length
# optimisation
max_steps = 5000             # optimizer steps (level 1)
warmup_steps = 100           # linear warmup, in steps
max_lr = 3e-4                # level 1 LR; slow level k: max_lr / C_k (§4: 3e-4, 1.875e-5, 1.17e-6)
min_lr = 3e-5                # LR at the last step
lr_schedule = "cosine"       # cosine | wsd | constant (train_gpt2.get_lr)
decay_steps = 0              # wsd only: length of the final linear decay, steps
weight_decay = 0.01          # on 2-D weights only
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0              # max grad norm per level (0 = off); see the module docstring
optimizer = "adamw"          # adamw | adam (adam: weight_decay is an L2 term)
carry_state = True           # False: zero the states every batch (the no-persistence ablation)
reset_on_eot = False         # zero a row's state before each EOT input token (per token, exactly)
eot_token = None             # None = meta.json's "eot"
# evaluation, logging, checkpoints (intervals in steps)
eval_interval = 250          # steps between val evaluations (and at the end)
val_steps = 0                # val batches per eval (0 = the whole val split, in order)
log_interval = 10            # steps between train log lines
checkpoint_interval = 2000   # steps between checkpoints (and at the end); 0 = only at the end
keep_checkpoints = 3         # newest checkpoints kept (0 = all)
resume = False               # continue from the newest checkpoint in out_dir, with its settings
stop_step = -1               # checkpoint and stop before this step, as if interrupted (-1 = never)
patience = 0                 # stop after this many evals without a better val loss (0 = off)

# checked when the command line is read
CHOICES = dict(model=tuple(RECURRENT_MODELS), lr_schedule=train_gpt2.LR_SCHEDULES,
               optimizer=("adamw", "adam"), dtype=utils.DTYPES)
# the smallest value of each numeric setting (check_settings)
MINIMUM = dict(micro_batch_size=1, block_size=1, max_steps=1, eval_interval=1, log_interval=1,
               n_layer=1, n_embd=1, n_hidden=1, ffn_hidden=1, context_dim=1, warmup_steps=0,
               decay_steps=0, val_steps=0, checkpoint_interval=0, keep_checkpoints=0, patience=0,
               seed=0, stop_step=-1, min_lr=0, weight_decay=0, grad_clip=0)
# a resumed run takes every setting from its checkpoint except these, which belong to each command
PER_RUN = ("out_dir", "resume", "stop_step")
# what the command line may change when resuming: not the streams (micro_batch_size, block_size),
# the model, the data, the LR schedule's shape or the seed
RESUME_CAN_CHANGE = PER_RUN + ("max_steps", "eval_interval", "val_steps", "log_interval",
                               "checkpoint_interval", "keep_checkpoints", "patience", "device",
                               "dtype", "compile")
# get_lr's, in order
LR_SETTINGS = ("max_lr", "min_lr", "warmup_steps", "max_steps", "lr_schedule", "decay_steps")
# steps run before the time estimate: the first ones are slow (allocation, compile)
ESTIMATE_AFTER = 5


# -----------------------------------------------------------------------------
# settings: checks, the slow levels, the LR


def resolve(path):
    return path if os.path.isabs(path) else os.path.join(HERE, path)


def check_settings():
    """Ranges and combinations of the settings, before any work: exit 2 naming the setting."""
    for name, low in MINIMUM.items():
        value = globals()[name]
        utils.require(math.isfinite(value) and value >= low,
                      f"--{name} must be at least {low}, got {value}")
    utils.require(math.isfinite(max_lr) and max_lr > 0,
                  f"--max_lr must be a positive number, got {max_lr}")
    for name in ("dropout", "beta1", "beta2"):
        value = globals()[name]
        utils.require(0 <= value < 1, f"--{name} must be at least 0 and below 1, got {value}")
    utils.require(eot_token is None or (type(eot_token) is int and eot_token >= 0),
                  f"--eot_token must be a token id (an integer >= 0) or None, got {eot_token!r}")
    parse_levels()


def parse_levels():
    """(chunk_sizes, surprise_weights) as tuples: nested_lstm's levels;
    one level for the other models."""
    if model != "nested_lstm":
        return (1,), ()
    try:
        chunks = tuple(int(v) for v in chunk_sizes.split(",") if v.strip())
        weights = tuple(float(v) for v in surprise_weights.split(",") if v.strip())
    except ValueError:
        utils.bad_setting(f"--chunk_sizes and --surprise_weights want comma-separated numbers, got "
                          f"{chunk_sizes!r} and {surprise_weights!r}")
    utils.require(chunks and chunks[0] == 1 and min(chunks) >= 1,
                  f"--chunk_sizes must start with 1 (level 1 steps every step), each >= 1, "
                  f"got {chunk_sizes!r}")
    utils.require(len(weights) == len(chunks) - 1
                  and all(math.isfinite(w) and w >= 0 for w in weights),
                  f"--surprise_weights needs {len(chunks) - 1} numbers >= 0 (one per slow level of "
                  f"--chunk_sizes={chunk_sizes}), got {surprise_weights!r}")
    return chunks, weights


def make_config(vocab_size):
    chunks, weights = parse_levels()
    return LSTMConfig(model=model, vocab_size=vocab_size, n_embd=n_embd, n_hidden=n_hidden,
                      n_layer=n_layer, dropout=dropout, tie_embeddings=tie_embeddings,
                      chunk_sizes=chunks, ffn_hidden=ffn_hidden, surprise_weights=weights,
                      context_dim=context_dim)


def lr_at(step, s):
    """Level 1's LR at `step` under the settings dict s (train_gpt2.py's schedule)."""
    return train_gpt2.get_lr(step, *(s[k] for k in LR_SETTINGS))


def resumed_settings(settings, ckpt_path, ckpt, argv):
    """The settings of a run resumed from ckpt: the checkpoint's, with the changes the command line
    may make (RESUME_CAN_CHANGE; any other exits 2).
    Returns (settings, a message saying what changed)."""
    saved, step = ckpt["settings"], int(ckpt["step"])
    given = utils.given_settings(argv) | set(PER_RUN)
    merged, changed = utils.resume_settings(settings, saved, given, RESUME_CAN_CHANGE)
    def describe(names):
        return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items() if k in names)
    changes = describe(set(RESUME_CAN_CHANGE) - set(PER_RUN))
    message = (f"resumed from {ckpt_path} at step {step} with its settings"
               + (f"; {changes}" if changes else ""))
    old_lr, new_lr = lr_at(step, {**merged, **saved}), lr_at(step, merged)
    if old_lr != new_lr:
        message += (f"\n{describe(LR_SETTINGS)} moves the LR at step {step} "
                    f"from {old_lr:.3e} to {new_lr:.3e}")
    return merged, message


def format_duration(seconds):
    s = round(seconds)
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# -----------------------------------------------------------------------------
# optimizers, slow levels, states, evaluation


def make_optimizer(params, kind, lr, weight_decay, betas, device_type):
    decay = [p for p in params if p.dim() >= 2]  # weights decay; biases, norms and gains do not
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    adam = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return adam(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def add_to_chunk_sums(slow_levels, sums, fast_norm, skip_overflow):
    """Add this step's gradients of the slow levels to their chunk sums, then clear them. Returns
    level 1's gradient norm (fast_norm) plus the slow levels' norm, a device tensor that is finite
    exactly when every gradient is: no host sync. skip_overflow (float16): a step whose gradients
    overflowed, which GradScaler skips for level 1, adds nothing to the sums either; one check on
    the device decides for all of them."""
    grads = [p.grad for params in slow_levels for p in params if p.grad is not None]
    norm = (fast_norm + torch.nn.utils.get_total_norm(grads)) if grads else fast_norm
    keep = torch.isfinite(norm) if skip_overflow else None
    for params, bufs in zip(slow_levels, sums, strict=True):
        for p, a in zip(params, bufs, strict=True):
            if p.grad is not None:
                a.add_(p.grad if keep is None else torch.where(keep, p.grad, 0.0))
            p.grad = None
    return norm


def gather_rows(t, world_size):
    """(L, B, H) on each rank -> (L, B * world, H) on the CPU, rows in global stream order."""
    if world_size == 1:
        return t.detach().cpu()
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 1).cpu()


@torch.no_grad()
def val_metrics(raw_model, loader, val_steps, device, autocast, reset_token, carry):
    """(loss, accuracy) over the val split in order, from fresh zero states;
    every rank its own streams."""
    raw_model.eval()
    loader.reset()
    steps = loader.windows if val_steps == 0 else min(val_steps, loader.windows)
    state = raw_model.init_state(loader.B, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, tokens
    for _ in range(steps):
        x, y, _ = loader.next_batch()
        x, y = x.to(device), y.to(device)
        if not carry:
            state = raw_model.init_state(loader.B, device)
        with autocast:
            logits, loss, state, _ = raw_model(x, y, state=state, reset_token=reset_token)
        sums[0] += loss.double() * y.numel()
        sums[1] += (logits.argmax(-1) == y).sum()
        sums[2] += y.numel()
    utils.all_reduce_sum(sums)
    raw_model.train()
    loss_sum, correct, count = sums.tolist()
    return loss_sum / count, correct / count


# -----------------------------------------------------------------------------


def main(argv):
    settings = utils.apply_overrides(globals(), argv, CHOICES)
    check_settings()

    # ---- out_dir: one run at a time; a resumed run goes on with its checkpoint's settings --------
    out = resolve(out_dir)
    master = os.environ.get("RANK", "0") == "0"  # torchrun's rank 0, or the only process
    print0 = print if master else (lambda *a, **k: None)
    lock = utils.lock_folder(out, "training run") if master else None  # held until the run ends
    ckpt_path, ckpt = utils.load_latest_checkpoint(out, print0) if resume else (None, None)
    if resume and ckpt is None:
        print0(f"resume: no checkpoint in {out}, starting from scratch")
    start_step = 0
    if ckpt is not None:
        start_step = int(ckpt["step"])
        settings, message = resumed_settings(settings, ckpt_path, ckpt, argv)
        globals().update(settings)  # before anything below derives from them
        check_settings()
        print0(message)

    # ---- processes, device, precision ------------------------------------------------------------
    rank, local_rank, world_size, dev = utils.setup_distributed(utils.pick_device(device))
    device_type = dev.split(":")[0]
    precision = utils.pick_dtype(dtype, device_type)
    autocast = utils.autocast_context(device_type, precision)
    torch.manual_seed(seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    B, T = micro_batch_size, block_size

    # ---- data and model --------------------------------------------------------------------------
    data_path = resolve(data_dir)
    meta = data.read_meta(data_path)
    if meta is None:
        raise SystemExit(f"error: {data_path}/meta.json: no such file; "
                         f"run prepare_wikitext.py first or set --data_dir")
    char_level = meta.get("tokenizer", "").startswith("char")
    eot = eot_token if eot_token is not None else meta.get("eot")
    utils.require(eot is not None or not reset_on_eot,
                  "--reset_on_eot needs an EOT id: meta.json has no 'eot', set --eot_token")
    reset_token = int(eot) if reset_on_eot else None
    model_config = make_config(meta["vocab_size"])
    utils.require(not (precision == "float16" and device_type == "cpu"
                       and model_config.model != "context_vector"),
                  "--dtype=float16 on CPU: oneDNN has no float16 LSTM; use bfloat16 or float32")
    try:
        # saved and evaluated: never compiled or wrapped
        raw_model = build_recurrent(model_config).to(dev)
    except ValueError as e:  # model.py's messages start with the setting's name
        utils.bad_setting(f"--{e}")
    try:
        train_loader = data.StreamLoader(data_path, "train", B, T, rank, world_size,
                                         model_config.vocab_size)
        val_loader = data.StreamLoader(data_path, "val", B, T, rank, world_size,
                                       model_config.vocab_size)
    except data.ShardError as e:
        raise SystemExit(f"error: {e}") from None
    levels = raw_model.level_params()
    chunks = model_config.chunk_sizes
    optimizers = [make_optimizer(p, optimizer, max_lr / c, weight_decay, (beta1, beta2), device_type)
                  for p, c in zip(levels, chunks, strict=True)]
    # slow levels' summed grads
    accum = [[torch.zeros_like(p) for p in params] for params in levels[1:]]
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "float16")
    state = raw_model.init_state(B, dev)
    best_val, bad_evals = float("inf"), 0

    # ---- resume ----------------------------------------------------------------------------------
    if ckpt is not None:
        if ckpt["model_config"] != dataclasses.asdict(model_config):
            raise SystemExit(f"error: {ckpt_path} was trained with model {ckpt['model_config']}, "
                             f"these settings and {data_path}/meta.json give "
                             f"{dataclasses.asdict(model_config)}")
        rows = ckpt["state"][0].size(1)
        if rows != B * world_size:
            raise SystemExit(f"error: {ckpt_path} holds {rows} streams, "
                             f"this run has {B * world_size} "
                             f"(micro_batch_size x world_size): resume with as many processes")
        raw_model.load_state_dict(ckpt["model"])
        for opt, sd in zip(optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(sd)
        for bufs, saved in zip(accum, ckpt["slow_grads"], strict=True):
            for a, s in zip(bufs, saved, strict=True):
                a.copy_(s)
        train_loader.load_state_dict(ckpt["loader"])
        # this rank's rows
        state = tuple(s[:, rank * B:(rank + 1) * B].to(dev) for s in ckpt["state"])
        if ckpt["scaler"]:  # empty unless the checkpoint was trained in float16
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device_type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        best_val, bad_evals = float(ckpt["best_val"]), int(ckpt["bad_evals"])
        del ckpt

    model = torch.compile(raw_model) if compile else raw_model
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    # ---- logging ---------------------------------------------------------------------------------
    log = utils.JsonlLog(os.path.join(out, "log.jsonl"), enabled=master)
    if ckpt_path and master:  # events logged after the checkpoint was taken will be logged again
        utils.truncate_log(log.path, start_step)
    n_params = raw_model.num_params()
    tokens_per_step = B * T * world_size
    log.write(event="start", step=start_step, settings=settings, **utils.run_header(dev),
              params=n_params, world_size=world_size, dtype=precision, resumed_from=ckpt_path)
    print0(f"{model_config.model}: {n_params:,} parameters | "
           f"{tokens_per_step:,} tokens per step ({world_size} x {B} streams x {T} tokens) | "
           f"{max_steps:,} steps | {precision} on {dev}")
    if start_step >= max_steps:
        print0(f"nothing to do: the run already reached max_steps {max_steps} "
               f"(raise --max_steps to go on)")

    def stop_if_diverged(step, check_weights=False):
        """Exit 3 if a loss or gradient so far was NaN/inf, or (check_weights) a weight is now.
        Checked before every checkpoint, so none is ever written from weights that diverged:
        the newest one is good."""
        bad_step, what = utils.diverged_at(first_bad_step, step), "the loss or a gradient"
        if bad_step is None and check_weights and not utils.all_finite(raw_model.parameters()):
            bad_step, what = step, "a weight"
        if bad_step is None:
            return
        log.write(event="diverged", step=bad_step)
        print0(f"error: {what} is NaN or inf at step {bad_step}; stopping. "
               f"The last good checkpoint is "
               f"{last_ckpt or 'none (no checkpoint was written yet)'}, left intact.",
               file=sys.stderr)
        utils.finish_distributed()
        sys.exit(utils.EXIT_DIVERGED)

    def save(step):
        """Checkpoint taken before `step` runs: resuming starts there."""
        nonlocal last_ckpt, saved_step
        if step == saved_step:
            # written already: a checkpoint interval ended where --stop_step stops
            return
        stop_if_diverged(step, check_weights=True)
        gathered = [gather_rows(s, world_size) for s in state]  # every rank takes part
        if master:
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
            payload = dict(model=raw_model.state_dict(),
                           model_config=dataclasses.asdict(model_config),
                           optimizers=[o.state_dict() for o in optimizers], step=step,
                           settings=settings, loader=train_loader.state_dict(), rng=rng,
                           state=gathered, slow_grads=[[a.cpu() for a in bufs] for bufs in accum],
                           scaler=scaler.state_dict(), best_val=best_val, bad_evals=bad_evals)
            last_ckpt = utils.save_checkpoint(out, step, payload, keep=keep_checkpoints)
            print(f"step {step:6d} | saved {last_ckpt}")
        saved_step = step

    def evaluate(step):
        """Val metrics after `step` steps, logged; returns whether early stopping says stop."""
        nonlocal best_val, bad_evals
        val_loss, val_acc = val_metrics(raw_model, val_loader, val_steps, dev, autocast,
                                        reset_token, carry_state)
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)),
                  "val_acc": val_acc}
        if char_level:
            record["val_bpc"] = val_loss / math.log(2)  # one token = one character
        log.write(**record)
        print0(f"step {step:6d} | "
               + " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
        if val_loss < best_val:
            best_val, bad_evals = val_loss, 0
            return False
        bad_evals += 1
        return patience > 0 and bad_evals >= patience

    # ---- the loop --------------------------------------------------------------------------------
    # the newest checkpoint known to be good: resumed from or written by this run
    last_ckpt = ckpt_path
    saved_step = start_step if ckpt_path else None
    # first step with a NaN/inf loss or gradient, on the device
    first_bad_step = torch.full((), -1, device=dev)
    t_last, steps_since_log, estimated, finished = time.perf_counter(), 0, False, True
    for step in range(start_step, max_steps):
        last_step = step == max_steps - 1
        if step == stop_step:
            save(step)
            print0(f"stopped before step {step} (--stop_step); "
                   f"resume with --resume=True --out_dir={out_dir}")
            finished = False
            break
        if step % eval_interval == 0:
            t_eval = time.perf_counter()
            stop = evaluate(step)
            t_last += time.perf_counter() - t_eval  # ms/step and the estimate count training only
            if stop:
                save(step)
                log.write(event="early_stop", step=step, best_val_loss=best_val, patience=patience)
                print0(f"early stop at step {step}: no better val loss in {patience} evals "
                       f"(best {best_val:.4f})")
                finished = False
                break

        x, y, restarted = train_loader.next_batch()
        x, y = x.to(dev), y.to(dev)
        if restarted or not carry_state:
            state = raw_model.init_state(B, dev)
        lr = lr_at(step, settings)
        with autocast:
            _, loss, state, aux = model(x, y, state=state, reset_token=reset_token)
        # truncated BPTT: the graph ends at the batch boundary
        state = tuple(s.detach() for s in state)
        assert all(s.device == x.device for s in state), "states must stay on this rank's device"
        total = loss + sum(w * aux[k] for k, w in raw_model.aux_weights.items())
        scaler.scale(total).backward()
        for opt in optimizers:
            scaler.unscale_(opt)  # a no-op unless float16
        # level 1: clip this step's gradient, step every step
        # (GradScaler skips it on inf/nan in float16)
        grad_norm = utils.clip_grads(levels[0], grad_clip)
        # slow levels: add this step's gradient to the chunk's sum, step at the end of the chunk
        norm_all = add_to_chunk_sums(levels[1:], accum, grad_norm,
                                     skip_overflow=scaler.is_enabled())
        for g in optimizers[0].param_groups:
            g["lr"] = lr
        scaler.step(optimizers[0])
        optimizers[0].zero_grad(set_to_none=True)
        for k in range(1, len(levels)):
            if (step + 1) % chunks[k] == 0:
                for p, a in zip(levels[k], accum[k - 1], strict=True):
                    p.grad = a
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(levels[k], grad_clip * chunks[k])
                for g in optimizers[k].param_groups:
                    g["lr"] = lr / chunks[k]
                optimizers[k].step()
                optimizers[k].zero_grad(set_to_none=True)
                for a in accum[k - 1]:
                    a.zero_()
        scaler.update()
        # no host sync on ordinary steps: the NaN check stays on the device until a log line or a
        # checkpoint needs it. In float16 an overflowed gradient is GradScaler's to skip,
        # not a divergence.
        first_bad_step = utils.track_nonfinite(first_bad_step, loss, step)
        if not scaler.is_enabled():
            first_bad_step = utils.track_nonfinite(first_bad_step, norm_all, step)
        steps_since_log += 1

        if step % log_interval == 0 or last_step:  # the loss and aux losses averaged over ranks
            stop_if_diverged(step)
            names = sorted(aux)
            stats = torch.stack([loss.detach().float()] + [aux[k].detach().float() for k in names])
            stats = (utils.all_reduce_sum(stats) / world_size).tolist()
            dt = (time.perf_counter() - t_last) / steps_since_log
            record = {"step": step, "train_loss": stats[0], "lr": lr, "grad_norm": grad_norm.item(),
                      "ms_per_step": dt * 1000, "tokens_per_sec": tokens_per_step / dt,
                      **dict(zip(names, stats[1:], strict=True))}
            log.write(**record)
            extra = "".join(f" | {k} {v:.4f}" for k, v in zip(names, stats[1:], strict=True))
            print0(f"step {step:6d} | loss {stats[0]:.4f} | lr {lr:.2e} | "
                   f"norm {record['grad_norm']:.3f} | "
                   f"{dt * 1000:.1f} ms/step | {record['tokens_per_sec']:,.0f} tok/s{extra}")
            if not estimated and step - start_step >= ESTIMATE_AFTER:
                print0(f"est. {format_duration(dt * (max_steps - start_step))} "
                       f"for {max_steps - start_step:,} steps at {dt:.2f} s/step")
                estimated = True
            t_last, steps_since_log = time.perf_counter(), 0
        if last_step:
            # the final model's metrics (before the final checkpoint: best_val in it)
            evaluate(max_steps)
        if last_step or (checkpoint_interval > 0 and (step + 1) % checkpoint_interval == 0):
            save(step + 1)

    if master and finished:
        png = utils.plot_log(log.path, os.path.join(out, "loss.png"),
                             keys=("train_loss", "val_loss"))
        print0(f"log: {log.path}" + (f", plot: {png}" if png else ""))
    utils.finish_distributed()
    if lock is not None:
        lock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
