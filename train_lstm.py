"""Train the recurrent models (lstm, nested_lstm, context_vector) with persistent hidden states.

    python prepare_wikitext.py --tokenizer=char && python train_lstm.py     # §4 nested LSTM, char level
    python prepare_wikitext.py --tokenizer=word --vocab_words=1000
    python train_lstm.py config/lstm_context_vector_word.py                   # §5 baseline (a GPU: fp16)
    python train_lstm.py --out_dir=out_lstm --resume=True [--max_steps=10000]  # go on with the run's settings
    torchrun --standalone --nproc_per_node=2 train_lstm.py ...               # DDP: each rank its own streams

Each batch row is one contiguous stream through the split (data.StreamLoader); the hidden states
carry over from batch to batch, detached (truncated BPTT over block_size tokens), each rank its own
streams. Checkpoints hold every rank's states, the loader position and the slow levels' partial
gradient sums, so a resumed run continues exactly. nested_lstm: level k has its own optimizer; its
gradients are summed every step and it steps when (step + 1) % C_k == 0, at max_lr / C_k x the
schedule's factor, its chunk's summed gradient clipped at grad_clip x C_k. The run's folder, resume,
checkpoints, signals and log are training.Run's.
"""
import math
import sys

import torch

import data
import training
import utils
from model import RECURRENT_MODELS, LSTMConfig, build_recurrent

# -----------------------------------------------------------------------------
# settings (all overridable with config files and --name=value)
# data and output: folders are relative to the repo folder, wherever you run from
data_dir = "data/wikitext-2-raw-v1_char"  # shards + meta.json (prepare_wikitext.py --tokenizer=char)
out_dir = "out_lstm"         # log.jsonl, checkpoints and loss.png
device = ""                  # "" = cuda, then mps, then cpu
dtype = ""                   # "" = bf16 on GPUs with native bf16, float16 on older ones, bf16 on MPS, float32 on CPU
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
lr_schedule = "cosine"       # cosine | wsd | constant (training.lr_factor)
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
CHOICES = dict(model=tuple(RECURRENT_MODELS), lr_schedule=training.LR_SCHEDULES,
               optimizer=("adamw", "adam"), dtype=utils.DTYPES)
# the smallest value of each numeric setting (check_settings)
MINIMUM = dict(micro_batch_size=1, block_size=1, max_steps=1, eval_interval=1, log_interval=1,
               n_layer=1, n_embd=1, n_hidden=1, ffn_hidden=1, context_dim=1, warmup_steps=0,
               decay_steps=0, val_steps=0, checkpoint_interval=0, keep_checkpoints=0, patience=0,
               seed=0, stop_step=-1, min_lr=0, weight_decay=0, grad_clip=0)
# what the command line may change when resuming (any other change is refused): not the streams
# (micro_batch_size, block_size), the model, the data, the LRs or the seed; max_steps may change,
# which stretches the schedule (the run says how the LR moves)
RESUME_CAN_CHANGE = ("max_steps", "eval_interval", "val_steps", "log_interval",
                     "checkpoint_interval", "keep_checkpoints", "patience", "device", "dtype",
                     "compile")


def check_settings():
    """Before any work: exit 2 naming the setting."""
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
    """(chunk_sizes, surprise_weights) as tuples: one level but for nested_lstm."""
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


# -----------------------------------------------------------------------------
# optimizers, slow levels, states, evaluation


def make_optimizer(params, lr):
    """AdamW (or Adam: weight decay as an L2 term) whose groups train at `lr` x the schedule."""
    decay = [p for p in params if p.dim() >= 2]  # weights decay; biases, norms and gains do not
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "initial_lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "initial_lr": lr}]
    adam = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    return adam(groups, lr=lr, betas=(beta1, beta2), fused=all(p.is_cuda for p in params))


def add_to_chunk_sums(slow_levels, sums, fast_norm, skip_overflow):
    """Add the slow levels' gradients to their chunk sums and clear them; returns fast_norm plus their
    norm, on the device. skip_overflow (float16): a step GradScaler skips adds nothing either."""
    grads = [p.grad for params in slow_levels for p in params if p.grad is not None]
    norm = (fast_norm + torch.nn.utils.get_total_norm(grads)) if grads else fast_norm
    keep = torch.isfinite(norm) if skip_overflow else None
    for params, bufs in zip(slow_levels, sums, strict=True):
        for p, a in zip(params, bufs, strict=True):
            if p.grad is not None:
                a.add_(p.grad if keep is None else torch.where(keep, p.grad, 0.0))
            p.grad = None
    return norm


def step_slow_levels(step, levels, chunks, optimizers, sums, lr_factor):
    """Level k >= 2 steps after each chunk of C_k steps on its summed gradient (clip: grad_clip C_k)."""
    for k in range(1, len(levels)):
        if (step + 1) % chunks[k] == 0:
            for p, a in zip(levels[k], sums[k - 1], strict=True):
                p.grad = a
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(levels[k], grad_clip * chunks[k])
            training.set_lr([optimizers[k]], lr_factor)
            optimizers[k].step()
            optimizers[k].zero_grad(set_to_none=True)
            for a in sums[k - 1]:
                a.zero_()


def own_state(state, sums, best_val, bad_evals):
    """A checkpoint's own state: every rank's hidden states ((L, B x world, H), rows in stream
    order), the slow levels' partial sums, early stopping's record. Every rank takes part."""
    return dict(state=[torch.cat(utils.all_gather_objects(s.detach().cpu()), 1) for s in state],
                slow_grads=[[a.cpu() for a in bufs] for bufs in sums],
                best_val=best_val, bad_evals=bad_evals)


@torch.no_grad()
def val_metrics(raw_net, loader, device, autocast, reset_token):
    """(loss, accuracy) over the val split in order from zero states, every rank its own streams."""
    raw_net.eval()
    loader.reset()
    steps = loader.windows if val_steps == 0 else min(val_steps, loader.windows)
    state = raw_net.init_state(loader.B, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, tokens
    for _ in range(steps):
        x, y, _ = loader.next_batch()
        x, y = x.to(device), y.to(device)
        if not carry_state:
            state = raw_net.init_state(loader.B, device)
        with autocast:
            logits, loss, state, _ = raw_net(x, y, state=state, reset_token=reset_token)
        sums[0] += loss.double() * y.numel()
        sums[1] += (logits.argmax(-1) == y).sum()
        sums[2] += y.numel()
    utils.all_reduce_sum(sums)
    raw_net.train()
    loss_sum, correct, count = sums.tolist()
    return loss_sum / count, correct / count


# -----------------------------------------------------------------------------


def main(argv):
    utils.apply_overrides(globals(), argv, CHOICES)
    check_settings()
    # the out_dir: locked, then resumed (with the checkpoint's settings) or started afresh
    run = training.Run(globals(), argv, RESUME_CAN_CHANGE, check_settings)
    print0 = run.print0

    # ---- processes, device, precision ------------------------------------------------------------
    rank, local_rank, world_size, dev = utils.setup_distributed(utils.pick_device(device))
    device_type = dev.split(":")[0]
    precision = utils.pick_dtype(dtype, device_type)
    autocast = utils.autocast_context(device_type, precision)
    B, T = micro_batch_size, block_size

    # ---- data and model --------------------------------------------------------------------------
    data_path = utils.in_repo(data_dir)
    meta = data.read_meta(data_path)
    if meta is None:
        raise SystemExit(f"error: {data_path}/meta.json: no such file; "
                         f"run prepare_wikitext.py first or set --data_dir")
    eot = eot_token if eot_token is not None else meta.get("eot")
    utils.require(eot is not None or not reset_on_eot,
                  "--reset_on_eot needs an EOT id: meta.json has no 'eot', set --eot_token")
    reset_token = int(eot) if reset_on_eot else None
    chunks, weights = parse_levels()
    model_config = LSTMConfig(model=model, vocab_size=meta["vocab_size"], n_embd=n_embd,
                              n_hidden=n_hidden, n_layer=n_layer, dropout=dropout,
                              tie_embeddings=tie_embeddings, chunk_sizes=chunks,
                              ffn_hidden=ffn_hidden, surprise_weights=weights,
                              context_dim=context_dim)
    utils.require(not (precision == "float16" and device_type == "cpu" and model != "context_vector"),
                  "--dtype=float16 on CPU: oneDNN has no float16 LSTM; use bfloat16 or float32")
    torch.manual_seed(seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    try:
        raw_net = build_recurrent(model_config).to(dev)  # saved and evaluated: never wrapped
    except ValueError as e:  # model.py's messages start with the setting's name
        utils.bad_setting(f"--{e}")
    try:
        train_loader = data.StreamLoader(data_path, "train", B, T, rank, world_size,
                                         model_config.vocab_size)
        val_loader = data.StreamLoader(data_path, "val", B, T, rank, world_size,
                                       model_config.vocab_size)
    except data.ShardError as e:
        raise SystemExit(f"error: {e}") from None
    if run.ckpt is not None:  # checked before the run's folder is touched
        rows = run.ckpt["state"][0].size(1)
        utils.require(rows == B * world_size, f"{run.ckpt_path} holds {rows} streams, this run has "
                                              f"{B * world_size} (micro_batch_size x world_size): "
                                              f"resume with as many processes")

    # ---- optimizers: one per level, level k at max_lr / C_k --------------------------------------
    levels = raw_net.level_params()
    optimizers = [make_optimizer(params, max_lr / c) for params, c in zip(levels, chunks, strict=True)]
    sums = [[torch.zeros_like(p) for p in params] for params in levels[1:]]  # slow levels' chunks
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "float16")
    state, best_val, bad_evals = raw_net.init_state(B, dev), float("inf"), 0
    tokens_per_step = B * T * world_size
    ckpt = run.begin(utils.settings_of(globals()), model=raw_net, model_config=model_config,
                     optimizers=optimizers, scaler=scaler, loader=train_loader, meta=meta,
                     device=dev, compiled=compile, details=dict(dtype=precision), header=[
                         f"{model}: {raw_net.num_params():,} parameters | {tokens_per_step:,} tokens "
                         f"per step ({world_size} x {B} streams x {T} tokens) | {max_steps:,} steps "
                         f"| {precision} on {dev}"])
    if ckpt is not None:
        for bufs, saved in zip(sums, ckpt["slow_grads"], strict=True):
            for a, s in zip(bufs, saved, strict=True):
                a.copy_(s)
        state = tuple(s[:, rank * B:(rank + 1) * B].to(dev) for s in ckpt["state"])  # my rows
        best_val, bad_evals = float(ckpt["best_val"]), int(ckpt["bad_evals"])
        del ckpt
    net = training.wrap(raw_net, compile, world_size, dev)

    # ---- the loop: evaluate, step, log, checkpoint --------------------------------------------------
    note = None
    for step in range(run.start_step, max_steps + 1):
        last_step = step == max_steps  # after the last update: evaluate the weights that are saved
        if not last_step and run.stopping(step):  # --stop_step, SIGTERM, Ctrl-C
            break
        if step % eval_interval == 0 or last_step:
            with run.paused():  # not training time
                val_loss, val_acc = val_metrics(raw_net, val_loader, dev, autocast, reset_token)
            record = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)), "val_acc": val_acc}
            if meta.get("tokenizer", "").startswith("char"):
                record["val_bpc"] = val_loss / math.log(2)  # one token = one character
            run.log.write(step=step, **record)
            print0(f"step {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in record.items()))
            best_val, bad_evals = (val_loss, 0) if val_loss < best_val else (best_val, bad_evals + 1)
            if patience and bad_evals >= patience and not last_step:
                run.log.write(event="early_stop", step=step, best_val_loss=best_val, patience=patience)
                note = (f"early stop at step {step}: no better val loss in {patience} evals "
                        f"(best {best_val:.4f})")
                break
        if last_step:
            break

        x, y, restarted = train_loader.next_batch()
        x, y = x.to(dev), y.to(dev)
        if restarted or not carry_state:
            state = raw_net.init_state(B, dev)
        with autocast:
            _, loss, state, aux = net(x, y, state=state, reset_token=reset_token)
        state = tuple(s.detach() for s in state)  # truncated BPTT: the graph ends at the batch
        scaler.scale(loss + sum(w * aux[k] for k, w in raw_net.aux_weights.items())).backward()
        for opt in optimizers:
            scaler.unscale_(opt)  # a no-op unless float16
        # level 1 clips this step's gradient and steps (GradScaler skips it on inf/nan in float16);
        # the slow levels add this step's gradient to their chunk's sum, and step at its end
        grad_norm = training.clip_grads(levels[0], grad_clip)
        norm_all = add_to_chunk_sums(levels[1:], sums, grad_norm, skip_overflow=scaler.is_enabled())
        lr_factor = training.lr_factor(step, run.settings)
        training.set_lr(optimizers[:1], lr_factor)
        scaler.step(optimizers[0])
        optimizers[0].zero_grad(set_to_none=True)
        step_slow_levels(step, levels, chunks, optimizers, sums, lr_factor)
        scaler.update()
        # the NaN watch (float16: an overflowed gradient is GradScaler's to skip, not a divergence)
        run.after_step(step, loss, *([] if scaler.is_enabled() else [norm_all]))
        if step % log_interval == 0 or step == max_steps - 1:  # the loss and aux averaged over ranks
            run.log_step(step, loss, grad_norm, max_lr * lr_factor, tokens_per_step,
                         **{k: aux[k] for k in sorted(aux)})
        if checkpoint_interval > 0 and (step + 1) % checkpoint_interval == 0:
            run.save(step + 1, **own_state(state, sums, best_val, bad_evals))
    run.end(step, note, **own_state(state, sums, best_val, bad_evals))


if __name__ == "__main__":
    main(sys.argv[1:])
