"""Train the recurrent models (lstm, nested_lstm, context_vector) with persistent hidden states.

    python prepare_wikitext.py --tokenizer=char && python train_lstm.py     # §4 nested LSTM, char level
    python prepare_wikitext.py --tokenizer=word --vocab_words=1000
    python train_lstm.py --model=context_vector --data_dir=data/wikitext-2-raw-v1_word --n_embd=256 --n_hidden=512 \
        --context_dim=256 --n_layer=6 --tie_embeddings=True --block_size=64 --micro_batch_size=2048 \
        --optimizer=adam --weight_decay=0 --max_lr=4e-4 --min_lr=4e-5 --max_steps=800 --eval_interval=16 \
        --patience=15 --dtype=float16     # §5 baseline on a GPU: ~16 steps per epoch, 50 epochs, patience 15
    torchrun --standalone --nproc_per_node=2 train_lstm.py ...               # DDP: each rank its own streams

Data: each batch row is one contiguous stream through the split (all shards concatenated); the hidden
states carry over from batch to batch, detached (truncated BPTT over block_size tokens). The B * world
streams split the tokens into equal segments: stream s starts at token s * (n // (B * world)) and rank r
owns streams r*B .. r*B + B - 1, so its states never leave its device. Every stream advances block_size
tokens per step in lockstep; when the segments are used up all streams restart at their segment start
and the states are zeroed (the text no longer continues). Checkpoints hold every rank's states (gathered
on rank 0, rows in global stream order), the loader position and the slow levels' partially accumulated
gradients, so a resumed run continues exactly (same losses on CPU).

nested_lstm: level k has its own optimizer; its gradients are summed into a buffer every step and it
steps only when (step + 1) % C_k == 0, at lr_at(step) / C_k. Grad clipping is per level: level 1 clips
each step's gradient at grad_clip; a slow level clips its chunk's summed gradient at grad_clip * C_k
(= its mean gradient at grad_clip).
"""
import dataclasses
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import ShardError, list_shards, read_meta, read_shard
from model import LSTMConfig, build_recurrent
from train_gpt2 import LR_SCHEDULES, get_lr as lr_at
from utils import (DTYPES, JsonlLog, all_reduce_sum, apply_overrides, autocast_context, diverged_at,
                   finish_distributed, latest_checkpoint, load_checkpoint, pick_device, pick_dtype,
                   plot_log, run_header, save_checkpoint, setup_distributed, track_nonfinite, truncate_log)

_here = os.path.dirname(os.path.abspath(__file__))

# data and output
# data and output; relative paths are relative to this file's folder, not the current one
data_dir = "data/wikitext-2-raw-v1_char"  # shards + meta.json (prepare_wikitext.py --tokenizer=char)
out_dir = "out_lstm"         # log.jsonl, checkpoints and loss.png
device = ""                  # "" = cuda, then mps, then cpu
dtype = ""                   # "" = bfloat16 on GPUs that have it, float16 on older GPUs, float32 on CPU
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
max_lr = 3e-4                # level 1 LR; slow level k uses max_lr / C_k (§4: 3e-4, 1.875e-5, 1.17e-6)
min_lr = 3e-5                # LR at the last step
lr_schedule = "cosine"       # cosine | wsd | constant (utils.lr_at)
weight_decay = 0.01          # on 2-D weights only
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0              # max grad norm per level (0 = off); see the module docstring
optimizer = "adamw"          # adamw | adam (adam: weight_decay is an L2 term)
carry_state = True           # False: zero the states at every batch (the ablation persistence is tested against)
reset_on_eot = False         # zero a row's state before each EOT input token (per token, exactly)
eot_token = None             # None = meta.json's "eot"
# evaluation, logging, checkpoints
eval_interval = 250          # steps between val evaluations (and at the end)
val_steps = 0                # val batches per eval (0 = the whole val split, in order)
log_interval = 10            # steps between train log lines
checkpoint_interval = 2000   # steps between checkpoints (and at the end); 0 = only at the end
keep_checkpoints = 3         # newest checkpoints kept (0 = all)
resume = False               # continue from the newest checkpoint in out_dir
stop_step = -1               # stop with a checkpoint before this step, as if interrupted (-1 = never)
patience = 0                 # stop after this many evals without a better val loss (0 = off)

_EXIT_DIVERGED = 3           # exit status of a run stopped by a NaN/inf loss (as train_gpt2.py)


# -----------------------------------------------------------------------------
# the stream loader


class StreamLoader:
    """micro_batch_size contiguous streams per rank through one split; see the module docstring.

    next_batch() -> (x, y, restarted): int64 (B, T) inputs and targets on the CPU, and whether the streams
    just restarted at their segment starts (the caller zeroes the states). The state is one int.
    """

    def __init__(self, data_dir, split, B, T, rank=0, world_size=1, vocab_size=None):
        self.paths = list_shards(data_dir, split)
        lengths = [len(read_shard(p)) for p in self.paths]  # validates every header up front
        self.shard_start = np.cumsum([0] + lengths)
        self.B, self.T, self.vocab_size, self.split = B, T, vocab_size, split
        n_streams = B * world_size
        self.seg_len = int(self.shard_start[-1]) // n_streams
        self.windows = (self.seg_len - 1) // T  # windows of T+1 tokens per segment (targets shift by one)
        if self.windows < 1:
            raise ShardError(f"{split} split in {data_dir!r} has {int(self.shard_start[-1])} tokens: too few for "
                             f"{n_streams} streams (micro_batch_size {B} x world_size {world_size}) of "
                             f"block_size {T} + 1 tokens")
        self.starts = [s * self.seg_len for s in range(rank * B, (rank + 1) * B)]
        self.window = 0  # next window of every stream

    def state_dict(self):
        return {"window": self.window, "seg_len": self.seg_len}

    def load_state_dict(self, state):
        if int(state["seg_len"]) != self.seg_len:
            raise SystemExit(f"error: the checkpoint's streams are {state['seg_len']} tokens long, these are "
                             f"{self.seg_len}: the data or micro_batch_size x world_size changed")
        self.window = int(state["window"])

    def _read(self, tokens, pos, length):
        """length tokens from global position pos, across shard boundaries."""
        out = []
        while length > 0:
            s = int(np.searchsorted(self.shard_start, pos, side="right")) - 1
            if s not in tokens:  # fresh memmaps per batch keep resident memory flat
                tokens[s] = read_shard(self.paths[s])
            local = pos - int(self.shard_start[s])
            piece = tokens[s][local:local + length]
            out.append(piece)
            pos, length = pos + len(piece), length - len(piece)
        return np.concatenate(out)

    def next_batch(self):
        restarted = self.window == self.windows
        if restarted:
            self.window = 0
        buf = np.empty((self.B, self.T + 1), dtype=np.int64)  # widened before it becomes a tensor
        tokens = {}
        for row, start in enumerate(self.starts):
            buf[row] = self._read(tokens, start + self.window * self.T, self.T + 1)
        self.window += 1
        if self.vocab_size is not None and buf.max() >= self.vocab_size:
            raise ShardError(f"token id {int(buf.max())} in the {self.split} shards is not below vocab_size "
                             f"{self.vocab_size} (meta.json)")
        batch = torch.from_numpy(buf)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), restarted


# -----------------------------------------------------------------------------
# helpers


def resolve(path):
    return path if os.path.isabs(path) else os.path.join(_here, path)


def parse_tuple(name, text, cast):
    try:
        return tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"error: --{name} wants comma-separated numbers, got {text!r}") from None


def make_optimizer(params, kind, lr, weight_decay, betas, device_type):
    decay = [p for p in params if p.dim() >= 2]  # weights decay; biases, norms and gains do not
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, fused=device_type == "cuda")
    raise SystemExit(f"error: --optimizer must be adamw or adam, got {kind!r}")


def gather_rows(t, world_size):
    """(L, B, H) on each rank -> (L, B * world, H) on the CPU, rows in global stream order."""
    if world_size == 1:
        return t.detach().cpu()
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 1).cpu()


@torch.no_grad()
def evaluate(raw_model, data_dir, B, T, rank, world_size, vocab_size, device, device_type, ptdtype,
             val_steps, reset_token, carry):
    """Statefully over the val split in order, from fresh zero states; every rank its own streams."""
    raw_model.eval()
    loader = StreamLoader(data_dir, "val", B, T, rank, world_size, vocab_size)
    steps = loader.windows if val_steps <= 0 else min(val_steps, loader.windows)
    state = raw_model.init_state(B, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, tokens
    for _ in range(steps):
        x, y, _ = loader.next_batch()
        x, y = x.to(device), y.to(device)
        if not carry:
            state = raw_model.init_state(B, device)
        with autocast_context(device_type, ptdtype):
            logits, loss, state, _ = raw_model(x, y, state=state, reset_token=reset_token)
        sums[0] += loss.double() * y.numel()
        sums[1] += (logits.argmax(-1) == y).sum()
        sums[2] += y.numel()
    all_reduce_sum(sums)
    raw_model.train()
    loss_sum, correct, count = sums.tolist()
    return loss_sum / count, correct / count


# -----------------------------------------------------------------------------


def main():
    settings = apply_overrides(globals(), sys.argv[1:], {"dtype": DTYPES})
    chunks = parse_tuple("chunk_sizes", chunk_sizes, int) if model == "nested_lstm" else (1,)
    weights = parse_tuple("surprise_weights", surprise_weights, float)
    for name in ("micro_batch_size", "block_size", "max_steps", "eval_interval", "log_interval"):
        if settings[name] < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {settings[name]}")
    if lr_schedule not in LR_SCHEDULES:
        raise SystemExit(f"error: --lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if optimizer not in ("adamw", "adam"):
        raise SystemExit(f"error: --optimizer must be adamw or adam, got {optimizer!r}")
    if not chunks or chunks[0] != 1 or min(chunks) < 1:
        raise SystemExit(f"error: --chunk_sizes must start with 1 and be positive, got {chunk_sizes!r}")
    if model == "nested_lstm" and len(weights) != len(chunks) - 1:
        raise SystemExit(f"error: --surprise_weights needs {len(chunks) - 1} values (one per slow level), "
                         f"got {surprise_weights!r}")

    data_path, out = resolve(data_dir), resolve(out_dir)
    rank, local_rank, world_size, dev = setup_distributed(pick_device(device))
    ddp = world_size > 1
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)
    device_type = "cuda" if dev.startswith("cuda") else dev.split(":")[0]
    ptdtype = pick_dtype(dtype, device_type)
    if ptdtype == "float16" and device_type == "cpu" and model != "context_vector":
        raise SystemExit("error: --dtype=float16 on CPU: oneDNN has no float16 LSTM; use bfloat16 or float32")
    torch.manual_seed(seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    B, T = micro_batch_size, block_size

    meta = read_meta(data_path)
    if meta is None or "vocab_size" not in meta:
        raise SystemExit(f"error: no meta.json with a vocab_size in {data_path!r}: run prepare_wikitext.py "
                         f"first or set --data_dir")
    vocab_size = int(meta["vocab_size"])
    char_level = str(meta.get("tokenizer", "")).startswith("char")
    eot = eot_token if eot_token is not None else meta.get("eot")
    if reset_on_eot and eot is None:
        raise SystemExit("error: --reset_on_eot needs an EOT id: meta.json has no 'eot', set --eot_token")
    reset_token = int(eot) if reset_on_eot else None

    try:
        cfg = LSTMConfig(model=model, vocab_size=vocab_size, n_embd=n_embd, n_hidden=n_hidden, n_layer=n_layer,
                         dropout=dropout, tie_embeddings=tie_embeddings, chunk_sizes=chunks, ffn_hidden=ffn_hidden,
                         surprise_weights=weights if model == "nested_lstm" else (), context_dim=context_dim)
        raw_model = build_recurrent(cfg).to(dev)
        loader = StreamLoader(data_path, "train", B, T, rank, world_size, vocab_size)
        StreamLoader(data_path, "val", B, T, rank, world_size, vocab_size)  # fail now, not at the first eval
    except (ValueError, ShardError) as e:  # ShardError is a ValueError
        raise SystemExit(f"error: {e}") from None
    levels = raw_model.level_params()
    optimizers = [make_optimizer(p, optimizer, max_lr / c, weight_decay, (beta1, beta2), device_type)
                  for p, c in zip(levels, chunks)]
    accum = [[torch.zeros_like(p) for p in params] for params in levels[1:]]  # slow levels' summed grads
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == "float16")
    state = raw_model.init_state(B, dev)
    step0, best_val, bad_evals = 0, float("inf"), 0

    ckpt_path = latest_checkpoint(out) if resume else None
    if resume and ckpt_path is None:
        print0(f"resume: no checkpoint in {out}, starting from scratch")
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        if ckpt["model_config"] != dataclasses.asdict(cfg):
            raise SystemExit(f"error: {ckpt_path} was trained with model settings {ckpt['model_config']}, "
                             f"these are {dataclasses.asdict(cfg)}")
        raw_model.load_state_dict(ckpt["model"])
        for opt, sd in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(sd)
        for bufs, saved in zip(accum, ckpt["slow_grads"]):
            for a, s in zip(bufs, saved):
                a.copy_(s)
        loader.load_state_dict(ckpt["loader"])
        rows = ckpt["state"][0].size(1)
        if rows != B * world_size:
            raise SystemExit(f"error: {ckpt_path} holds {rows} streams, this run has {B * world_size} "
                             f"(micro_batch_size x world_size)")
        state = tuple(s[:, rank * B:(rank + 1) * B].to(dev) for s in ckpt["state"])  # this rank's rows
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device_type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        step0, best_val, bad_evals = int(ckpt["step"]), float(ckpt["best_val"]), int(ckpt["bad_evals"])
        del ckpt

    train_model = torch.compile(raw_model) if compile else raw_model
    if ddp:
        train_model = DDP(train_model, device_ids=[local_rank] if device_type == "cuda" else None)
    log = JsonlLog(os.path.join(out, "log.jsonl"), enabled=master)
    if ckpt_path and master:  # events logged after the checkpoint was taken will be logged again
        truncate_log(log.path, step0)
    n_params = raw_model.num_params()
    log.write(event="start", step=step0, settings=settings, **run_header(dev), params=n_params,
              world_size=world_size, dtype=ptdtype, resumed_from=ckpt_path)
    print0(f"{model}: {n_params:,} params | {B} x {world_size} streams of {loader.seg_len:,} tokens | "
           f"block_size {T} | {ptdtype} | {dev}" + (f" | resumed from {ckpt_path}" if ckpt_path else ""))

    def checkpoint(done):
        """Checkpoint taken before step `done` runs: resuming starts there."""
        gathered = [gather_rows(s, world_size) for s in state]  # every rank takes part
        if master:
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
            payload = dict(model=raw_model.state_dict(), model_config=dataclasses.asdict(cfg),
                           optimizers=[o.state_dict() for o in optimizers], step=done, settings=settings,
                           loader=loader.state_dict(), rng=rng, state=gathered,
                           slow_grads=[[a.cpu() for a in bufs] for bufs in accum],
                           scaler=scaler.state_dict(), best_val=best_val, bad_evals=bad_evals)
            path = save_checkpoint(out, done, payload, keep=keep_checkpoints)
            print(f"step {done:6d} | saved {path}")

    def run_eval(at_step):
        """Val metrics after at_step steps; returns whether early stopping says stop."""
        nonlocal best_val, bad_evals
        val_loss, val_acc = evaluate(raw_model, data_path, B, T, rank, world_size, vocab_size, dev, device_type,
                                     ptdtype, val_steps, reset_token, carry_state)
        record = {"step": at_step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)), "val_acc": val_acc}
        if char_level:
            record["val_bpc"] = val_loss / math.log(2)  # one token = one character
        if master:
            log.write(**record)
            print(f"step {at_step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
        if val_loss < best_val:
            best_val, bad_evals = val_loss, 0
            return False
        bad_evals += 1
        return patience > 0 and bad_evals >= patience

    t_last, steps_since_log = time.perf_counter(), 0
    first_bad_step = torch.full((), -1, device=dev)  # first step whose loss was not finite, kept on the device
    finished = True
    for step in range(step0, max_steps):
        if step == stop_step:
            checkpoint(step)
            print0(f"stopped before step {step} (--stop_step); resume with --resume=True")
            finished = False
            break
        if step % eval_interval == 0 and run_eval(step):
            checkpoint(step)
            log.write(event="early_stop", step=step, best_val_loss=best_val, patience=patience)
            print0(f"early stop at step {step}: no better val loss in {patience} evals (best {best_val:.4f})")
            finished = False
            break

        x, y, restarted = loader.next_batch()
        x, y = x.to(dev), y.to(dev)
        if restarted or not carry_state:
            state = raw_model.init_state(B, dev)
        lr = lr_at(step, max_lr, min_lr, warmup_steps, max_steps, lr_schedule)
        with autocast_context(device_type, ptdtype):
            _, loss, state, aux = train_model(x, y, state=state, reset_token=reset_token)
        state = tuple(s.detach() for s in state)  # truncated BPTT: the graph ends at the batch boundary
        assert all(s.device == x.device for s in state), "states must stay on this rank's device"
        total = loss + sum(w * aux[k] for k, w in raw_model.aux_weights.items())
        scaler.scale(total).backward()
        for opt in optimizers:
            scaler.unscale_(opt)  # a no-op unless float16
        # level 1: clip this step's gradient, step every step (GradScaler skips it on inf/nan in float16)
        grad_norm = torch.nn.utils.clip_grad_norm_(levels[0], grad_clip if grad_clip > 0 else float("inf"))
        for g in optimizers[0].param_groups:
            g["lr"] = lr
        # float16 only: an overflowed step (skipped by GradScaler) must not enter the slow levels' sums
        finite = not scaler.is_enabled() or (bool(torch.isfinite(grad_norm)) and all(
            bool(torch.isfinite(p.grad).all()) for params in levels[1:] for p in params if p.grad is not None))
        # slow levels: add this step's gradient to the chunk's sum, step at the end of the chunk
        for params, bufs in zip(levels[1:], accum):
            for p, a in zip(params, bufs):
                if p.grad is not None and finite:
                    a.add_(p.grad)
                p.grad = None
        scaler.step(optimizers[0])
        optimizers[0].zero_grad(set_to_none=True)
        for k in range(1, len(levels)):
            if (step + 1) % chunks[k] == 0:
                for p, a in zip(levels[k], accum[k - 1]):
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
        steps_since_log += 1

        # no host sync on ordinary steps: the NaN check stays on the device until a log line or a
        # checkpoint needs it, so a checkpoint is never written from weights that already diverged
        first_bad_step = track_nonfinite(first_bad_step, loss, step)
        save_now = step == max_steps - 1 or (checkpoint_interval > 0 and (step + 1) % checkpoint_interval == 0)
        log_now = step % log_interval == 0 or step == max_steps - 1
        bad_step = diverged_at(first_bad_step, step) if log_now or save_now else None
        if bad_step is not None:
            last = latest_checkpoint(out)
            log.write(event="diverged", step=bad_step)
            print(f"error: train loss is NaN or inf at step {bad_step} (rank {rank}); stopping. The last good "
                  f"checkpoint is {last or 'none (no checkpoint was written yet)'}, left intact.", file=sys.stderr)
            finish_distributed()
            sys.exit(_EXIT_DIVERGED)
        if log_now:  # the loss and aux losses averaged over ranks
            names = sorted(aux)
            stats = torch.stack([loss.detach().float()] + [aux[k].detach().float() for k in names])
            stats = (all_reduce_sum(stats) / world_size).tolist()
            dt = (time.perf_counter() - t_last) / steps_since_log
            record = {"step": step, "train_loss": stats[0], "lr": lr, "grad_norm": float(grad_norm),
                      "ms_per_step": dt * 1000, "tokens_per_sec": B * T * world_size / dt,
                      **dict(zip(names, stats[1:]))}
            log.write(**record)
            extra = "".join(f" | {k} {v:.4f}" for k, v in zip(names, stats[1:]))
            print0(f"step {step:6d} | loss {stats[0]:.4f} | lr {lr:.2e} | norm {float(grad_norm):.3f} | "
                   f"{dt * 1000:.1f} ms/step | {record['tokens_per_sec']:,.0f} tok/s{extra}")
            t_last, steps_since_log = time.perf_counter(), 0
        if save_now:
            if step == max_steps - 1:
                run_eval(max_steps)  # the final model's metrics (before the final checkpoint: best_val in it)
            checkpoint(step + 1)

    if master and finished:
        png = plot_log(log.path, os.path.join(out, "loss.png"), keys=("train_loss", "val_loss"))
        print0(f"log: {log.path}" + (f", plot: {png}" if png else ""))
    finish_distributed()


if __name__ == "__main__":
    main()
