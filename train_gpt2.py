"""Train a GPT on token shards: one CPU core to eight GPUs, with exact resume.

    python train_gpt2.py                                     # GPT-2 124M on FineWeb-Edu, Muon (EXPERIMENTS.md §1)
    python train_gpt2.py --optimizer=adamw                   # §1 exactly as it was run (AdamW)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # the same on 8 GPUs, data-parallel
    python train_gpt2.py --resume=True                       # continue the run in out/ exactly where it stopped
    python train_gpt2.py --device=cpu --n_layer=4 ...        # a toy on a laptop (README: CPU quick start)

Every setting below can be overridden with --name=value; the defaults are §1's model, data and schedule.
"""
import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import hellaswag
import utils
from model import GPT, MLPS, NORM_POSS, NORMS, POS_EMBS, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings (all overridable with --name=value)
# data and output; relative paths are relative to this file's folder, not the current one
data_dir = "data/fineweb10B"  # folder of *_train_*.bin / *_val_*.bin shards (prepare_fineweb.py)
out_dir = "out"               # checkpoints, log.jsonl, loss.png; one run at a time per folder
shuffle = True                # shuffle windows across all shards, anew each epoch from the seed
# model (model.py's GPTConfig): the modern GPT-2 124M
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024             # context length T, tokens
vocab_size = 0                # 0 = meta.json's vocab rounded up to a multiple of 64 (GPT-2: 50304)
pos_emb = "rope"              # rope | learned | none
mlp = "swiglu"                # swiglu | gelu | silu | relu2
norm = "rmsnorm"              # rmsnorm | layernorm | none
norm_pos = "pre"              # pre | post
qk_norm = False               # RMSNorm on each head's q and k
tie_embeddings = True         # the head's weight is the token embedding
bias = False                  # biases in the linear layers and LayerNorm
dropout = 0.0
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
eval_interval = 250           # val loss (and a sample) every this many steps and at the last step
val_steps = 20                # val batches of micro_batch_size x block_size per process
hellaswag_interval = 250      # HellaSwag acc_norm (GPT-2 BPE data only)
hellaswag_file = None         # None = hellaswag.py's cache (downloaded once); evaluated if present
hellaswag_limit = 0           # 0 = all 10,042 examples
sample_tokens = 32            # tokens sampled at each eval (0 = no samples)
sample_prompt = "Hello, I'm a language model,"
log_interval = 10             # steps between log lines
checkpoint_interval = 5000    # steps between checkpoints (and one at the last step)
keep_checkpoints = 3          # newest checkpoints kept in out_dir (0 = all)
resume = False                # continue from the newest checkpoint in out_dir, with its settings
stop_step = -1                # checkpoint and stop before this step, as if interrupted (-1 = never)
wandb_project = None          # log to Weights & Biases under this project (needs pip install wandb)
plot_only = False             # only redraw out_dir/loss.png from out_dir/log.jsonl, then exit
# system
device = ""                   # "" = cuda, then mps, then cpu
dtype = ""                    # "" = bfloat16 autocast on GPUs (float16 + GradScaler without bf16), float32 on CPU
compile = True                # torch.compile the training model (CUDA only)
seed = 1337

LR_SCHEDULES = ("cosine", "wsd", "constant")
CHOICES = dict(pos_emb=POS_EMBS, mlp=MLPS, norm=NORMS, norm_pos=NORM_POSS,
               optimizer=("muon", "adamw"), lr_schedule=LR_SCHEDULES, dtype=utils.DTYPES)
MODEL_FIELDS = [f.name for f in dataclasses.fields(GPTConfig) if f.name in globals()]
# a resumed run takes its settings from its checkpoint, but for these,
# which belong to each invocation...
PER_RUN = ("out_dir", "resume", "stop_step", "plot_only")
# ...and these, which its command line may change (any other change is refused)
RESUME_CAN_CHANGE = ("data_dir", "micro_batch_size", "max_lr", "min_lr", "warmup_steps",
                     "max_steps", "lr_schedule", "decay_steps", "flop_budget", "grad_clip",
                     "eval_interval", "val_steps", "hellaswag_interval", "hellaswag_file",
                     "hellaswag_limit", "sample_tokens", "sample_prompt", "log_interval",
                     "checkpoint_interval", "keep_checkpoints", "wandb_project",
                     "device", "dtype", "compile")


def check_settings():
    """Each setting's range, before any work: exit 2 naming the setting."""
    for name in ("micro_batch_size", "block_size", "total_batch_size", "max_steps", "val_steps"):
        utils.require(globals()[name] >= 1, f"--{name} must be at least 1, got {globals()[name]}")
    for name in ("vocab_size", "warmup_steps", "decay_steps", "eval_interval", "hellaswag_interval",
                 "hellaswag_limit", "sample_tokens", "log_interval", "checkpoint_interval",
                 "keep_checkpoints", "seed"):
        utils.require(globals()[name] >= 0, f"--{name} must be 0 or more, got {globals()[name]}")
    for name in ("max_lr", "min_lr", "weight_decay", "grad_clip"):
        value = globals()[name]
        utils.require(math.isfinite(value) and value >= 0,
                      f"--{name} must be a finite number >= 0, got {value}")
    utils.require(max_lr > 0, f"--max_lr must be above 0, got {max_lr}")
    for name in ("beta1", "beta2"):
        utils.require(0 <= globals()[name] < 1,
                      f"--{name} must be in [0, 1), got {globals()[name]}")
    utils.require(flop_budget is None or (isinstance(flop_budget, (int, float))
                                          and math.isfinite(flop_budget) and flop_budget > 0),
                  f"--flop_budget must be a positive number of FLOPs (or None), "
                  f"got {flop_budget!r}")
    utils.require(stop_step >= -1, f"--stop_step must be a step or -1 (never), got {stop_step}")


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps, schedule="cosine", decay_steps=0):
    """Learning rate at `step` (0-based). Warmup reaches max_lr at step warmup_steps - 1.

    cosine: lr_min + (cos(pi * (t - a) / (b - a)) + 1) * (lr_max - lr_min) / 2 for a <= t <= b,
            with a = warmup_steps, b = max_steps - 1 (the last step trains at exactly min_lr).
    wsd:    max_lr until the last decay_steps steps, then linear decay to min_lr at the last step.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    last = max_steps - 1
    if schedule == "cosine":
        if last <= warmup_steps:
            return max_lr
        progress = min(1.0, (step - warmup_steps) / (last - warmup_steps))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    if schedule == "wsd":
        decay_start = last - decay_steps
        if step <= decay_start or decay_steps <= 0:
            return max_lr
        return max_lr + (min_lr - max_lr) * min(1.0, (step - decay_start) / decay_steps)
    return max_lr  # constant


def train_step(model, raw_model, optimizers, scaler, next_batch, grad_accum_steps, lr, autocast,
               dev, clip):
    """One optimizer step of grad_accum_steps micro-steps (bench.py times this same function).

    Gradients are synced across processes only on the last micro-step. Returns (loss, grad_norm) as
    device tensors, the loss being the mean over micro-steps: no host sync here, the caller decides
    when a figure is worth one. The norm is computed even with clipping off: the NaN check watches
    it.
    """
    step_loss = torch.zeros((), device=dev)
    for micro_step in range(grad_accum_steps):
        x, y = next_batch()
        if dev.startswith("cuda"):
            x = x.pin_memory().to(dev, non_blocking=True)
            y = y.pin_memory().to(dev, non_blocking=True)
        else:
            x, y = x.to(dev), y.to(dev)
        # no_sync around forward *and* backward: DDP decides in the forward whether to reduce
        sync = not isinstance(model, DDP) or micro_step == grad_accum_steps - 1
        with nullcontext() if sync else model.no_sync():
            with autocast:
                _, loss = model(x, y)
            # a constant scale, so the sum is the mean over micro-steps
            loss = loss / grad_accum_steps
            step_loss += loss.detach()
            scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.unscale_(opt)  # a no-op unless float16
    grad_norm = utils.clip_grads(raw_model.parameters(), clip)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def evaluate(model, val_loader, val_steps, autocast, dev):
    """Mean val loss over val_steps batches from the start of the val split, on every rank,
    summed over ranks."""
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


def sample(raw_model, meta, prompt, n_tokens, autocast, dev, seed):
    """The prompt and n_tokens sampled after it (top-k 50, temperature 1), as text."""
    generator = torch.Generator(device=dev).manual_seed(seed)
    idx = torch.tensor([data.encode(prompt, meta)], dtype=torch.long, device=dev)
    raw_model.eval()
    with autocast:
        out = raw_model.generate(idx, n_tokens, temperature=1.0, top_k=50, generator=generator,
                                 n_vocab=meta["vocab_size"])
    raw_model.train()
    return data.decode(out[0].tolist(), meta)


def resolve(path):
    return path if os.path.isabs(path) else os.path.join(HERE, path)


def duration(seconds):
    hours, minutes = divmod(round(seconds / 60), 60)
    return (f"{hours}h{minutes:02d}m" if hours
            else f"{seconds:.0f} s" if seconds < 120 else f"{minutes} min")


# -----------------------------------------------------------------------------


def main(argv):
    utils.apply_overrides(globals(), argv, CHOICES)
    out = resolve(out_dir)
    log_path = os.path.join(out, "log.jsonl")
    if plot_only:
        if not os.path.exists(log_path):
            raise SystemExit(f"error: --plot_only needs {log_path}: "
                             f"point --out_dir at a run's folder")
        png = utils.plot_log(log_path, os.path.join(out, "loss.png"))
        print(png or "matplotlib is not installed")
        return
    check_settings()

    # ---- processes, the out_dir lock, resume ----------------------------------------------------
    rank, local_rank, world_size, dev = utils.setup_distributed(utils.pick_device(device))
    device_type, master = dev.split(":")[0], rank == 0
    print0 = print if master else (lambda *a, **k: None)
    lock = utils.lock_folder(out, "training run") if master else None  # noqa: F841 (held until exit)
    ckpt_path, ckpt = utils.load_latest_checkpoint(out, print0) if resume else (None, None)
    if resume and ckpt is None:
        print0(f"resume: no checkpoint in {out}, starting from scratch")
    if ckpt is not None:  # the run's own settings, but for what the command line may change
        saved = {k: v for k, v in ckpt["settings"].items() if k not in PER_RUN}
        given = utils.given_settings(argv)
        model_changes = {k: (saved[k], globals()[k]) for k in MODEL_FIELDS
                         if k in given and k in saved and saved[k] != globals()[k]}
        utils.require(not model_changes,
                      f"{ckpt_path} was trained with a different model config "
                      f"(field: checkpoint, now): {model_changes}; a resumed run keeps its model")
        merged, changed = utils.resume_settings(utils.settings_of(globals()), saved, given,
                                                RESUME_CAN_CHANGE)
        globals().update(merged)
        changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())

    # ---- device, precision, data, derived settings -----------------------------------------------
    precision = utils.pick_dtype(dtype, device_type)
    autocast = utils.autocast_context(device_type, precision)
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    tokens_per_micro_step = micro_batch_size * block_size * world_size
    utils.require(total_batch_size % tokens_per_micro_step == 0,
                  f"--total_batch_size {total_batch_size} is not a multiple of "
                  f"micro_batch_size {micro_batch_size} x block_size {block_size} "
                  f"x world_size {world_size} = {tokens_per_micro_step}")
    grad_accum_steps = total_batch_size // tokens_per_micro_step
    data_path = resolve(data_dir)
    try:
        meta = data.read_meta(data_path)
        vocab = vocab_size or data.model_vocab_size(meta)
        utils.require(not meta or meta["vocab_size"] <= vocab,
                      f"--vocab_size {vocab} is below the data's vocabulary "
                      f"({meta and meta['vocab_size']} in {data_path}/meta.json)")
        train_loader = data.WindowLoader(data_path, "train", micro_batch_size, block_size,
                                         rank, world_size, shuffle=shuffle, seed=seed,
                                         vocab_size=vocab)
        val_loader = data.WindowLoader(data_path, "val", micro_batch_size, block_size,
                                       rank, world_size, vocab_size=vocab)
    except data.ShardError as e:
        raise SystemExit(f"error: {e}\n  prepare data with prepare_fineweb.py or "
                         f"prepare_wikitext.py, then pass its folder as --data_dir") from None
    # llm.c's shards: GPT-2 BPE
    meta = meta or {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256}
    try:
        model_config = GPTConfig(**{**{k: globals()[k] for k in MODEL_FIELDS}, "vocab_size": vocab})
    except ValueError as e:
        utils.bad_setting(str(e))

    # ---- model and optimizers ----------------------------------------------------------------
    # saved, sampled and HellaSwag-scored: never compiled or wrapped
    raw_model = GPT(model_config).to(dev)
    steps = max_steps
    if flop_budget:
        steps = int(flop_budget // (raw_model.flops_per_token() * total_batch_size))
        utils.require(steps >= 1,
                      f"--flop_budget {flop_budget:g} buys no step of {total_batch_size} tokens")
    if ckpt is not None:
        # the LR a resumed run trains its first step at, under the old and the new settings
        at, saved = ckpt["step"], ckpt["settings"]
        print0(f"resumed from {ckpt_path} at step {at} with its settings"
               + (f"; {changes}" if changes else ""))
        lr_then = get_lr(at, saved["max_lr"], saved["min_lr"], saved["warmup_steps"],
                         saved["max_steps"], saved["lr_schedule"], saved["decay_steps"])
        lr_now = get_lr(at, max_lr, min_lr, warmup_steps, steps, lr_schedule, decay_steps)
        if not math.isclose(lr_then, lr_now, rel_tol=1e-9):
            print0(f"{changes} moves the LR at step {at} from {lr_then:.3e} to {lr_now:.3e}")
    if warmup_steps >= steps and lr_schedule != "constant":
        print0(f"warning: warmup_steps {warmup_steps} >= max_steps {steps}: the LR never decays")
    optimizers = raw_model.configure_optimizers(optimizer, weight_decay, max_lr, (beta1, beta2),
                                                1e-8, device_type, muon_split_qkv)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "float16")
    start_step = 0
    if ckpt is not None:
        if ckpt["model_config"] != dataclasses.asdict(model_config):
            # e.g. a different data vocabulary
            diff = {k: (ckpt["model_config"].get(k), v)
                    for k, v in dataclasses.asdict(model_config).items()
                    if ckpt["model_config"].get(k) != v}
            raise SystemExit(f"error: {ckpt_path} was trained with a different model config "
                             f"(field: checkpoint, now): {diff}")
        raw_model.load_state_dict(ckpt["model"])
        for opt, opt_state in zip(optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        scaler.load_state_dict(ckpt["scaler"])
        train_loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device_type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        start_step = ckpt["step"]
        if master:  # events logged after the checkpoint was taken will be logged again
            utils.truncate_log(log_path, start_step)
        del ckpt
    model = torch.compile(raw_model) if compile and device_type == "cuda" else raw_model
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    # ---- the run describes itself ---------------------------------------------------------------
    settings = dict(utils.settings_of(globals()), vocab_size=vocab, max_steps=steps)  # as run
    wandb_run = None
    if wandb_project and master:
        try:
            import wandb
        except ImportError:
            utils.bad_setting("--wandb_project is set but wandb is not installed "
                              "(pip install wandb)")
        wandb_run = wandb.init(project=wandb_project, config=settings, resume="allow")
    log = utils.JsonlLog(log_path, enabled=master, wandb_run=wandb_run)
    header, n_params = utils.run_header(dev), raw_model.num_params()
    log.write(event="start", step=start_step, settings=settings, **header, params=n_params,
              grad_accum_steps=grad_accum_steps, world_size=world_size, dtype=precision)
    print0(f"{header['device']} | torch {header['torch']} | world {world_size} | {precision} | "
           f"{n_params / 1e6:.2f}M parameters | {optimizer}")
    print0(f"{total_batch_size:,} tokens per step = "
           f"{micro_batch_size} x {block_size} x {world_size} processes x "
           f"{grad_accum_steps} accumulation steps; steps {start_step}..{steps - 1} "
           f"({total_batch_size * steps:,} tokens in all)")

    # ---- HellaSwag and samples (on raw_model, so compile stays on for training) ------------------
    hellaswag_examples, hellaswag_enc = None, None
    if hellaswag_interval and meta.get("tokenizer") != "gpt2":
        print0(f"HellaSwag: skipped, it needs GPT-2 BPE tokens and {data_path} holds "
               f"{meta['tokenizer']} tokens")
    elif hellaswag_interval:
        path = hellaswag_file or hellaswag.default_path()  # a file you name is read as given
        try:
            hellaswag_enc = data.tiktoken_encoding("gpt2")
            if master and not hellaswag_file:
                hellaswag.ensure_data()  # downloads and verifies it once, if it is not there yet
        except SystemExit as e:
            print0(f"HellaSwag: skipped: {str(e).removeprefix('error: ')}")
        # every rank must agree, or the all-reduce inside hellaswag.evaluate would hang
        ready = float(os.path.exists(path) and hellaswag_enc is not None)
        if utils.all_reduce_sum(torch.tensor(ready, device=dev)).item() < world_size:
            print0(f"HellaSwag: skipped, {path} is not there on every rank "
                   f"(python hellaswag.py downloads it)")
        else:
            hellaswag_examples = hellaswag.load_examples(path, limit=hellaswag_limit)
    sampling = bool(sample_tokens) and master
    if sampling and meta.get("itos") is None:
        # tiktoken's BPE files: offline without a cache, train on
        try:
            data.tiktoken_encoding(meta["tokenizer"])
        except SystemExit as e:
            print0(f"warning: no samples: {str(e).removeprefix('error: ')}")
            sampling = False

    def save(step):
        """A checkpoint taken before `step` runs (resuming starts there).
        Never of weights that are not finite."""
        # every rank checks, so every rank stops together
        if not utils.all_finite(raw_model.parameters()):
            return None
        if master:
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
            payload = dict(model=raw_model.state_dict(),
                           model_config=dataclasses.asdict(model_config),
                           optimizers=[o.state_dict() for o in optimizers],
                           scaler=scaler.state_dict(), step=step, settings=settings,
                           loader=train_loader.state_dict(), rng=rng, meta=meta)
            saved_path = utils.save_checkpoint(out, step, payload, keep=keep_checkpoints)
            print0(f"step {step:6d} | saved {saved_path}")
        return os.path.join(out, f"ckpt_{step:06d}.pt")

    def stop_diverged(bad_step):
        log.write(event="diverged", step=bad_step)
        if master:  # rank 0 wrote the checkpoints, so it knows the last good one
            print(f"error: the loss or gradient norm is NaN or inf at step {bad_step}; stopping. "
                  f"The last good checkpoint is "
                  f"{last_good or 'none (no checkpoint was written yet)'}, left intact. "
                  f"Resume from it with a lower --max_lr (or --grad_clip) and --resume=True",
                  file=sys.stderr)
        utils.finish_distributed()
        sys.exit(utils.EXIT_DIVERGED)

    # ---- the loop --------------------------------------------------------------------------
    last_good = ckpt_path  # the newest checkpoint known to hold finite weights
    # first step with a non-finite loss or norm, on the device
    first_bad_step = torch.full((), -1, device=dev)
    t_last, steps_since_log = time.perf_counter(), 0
    # the first step compiles: time the next
    warm_step = start_step + int(compile and device_type == "cuda")
    for step in range(start_step, steps):
        last_step = step == steps - 1
        if step == stop_step:
            last_good = save(step) or last_good
            print0(f"stopped before step {step} (--stop_step); resume with --resume=True")
            break
        eval_now = eval_interval and (step % eval_interval == 0 or last_step)
        hellaswag_now = hellaswag_examples and (step % hellaswag_interval == 0 or last_step)
        if eval_now or hellaswag_now:  # time spent here is not training time
            if device_type == "cuda":
                # training work still queued on the GPU belongs to the training time
                torch.cuda.synchronize()
            t_eval = time.perf_counter()
            if eval_now:
                val_loss = evaluate(model, val_loader, val_steps, autocast, dev)
                print0(f"step {step:6d} | val loss {val_loss:.4f}")
                log.write(step=step, val_loss=val_loss)
                if sampling:
                    text = sample(raw_model, meta, sample_prompt, sample_tokens, autocast, dev,
                                  seed + rank)
                    print0(f"step {step:6d} | sample: {text!r}")
                    log.write(step=step, sample=text)
            if hellaswag_now:
                res = hellaswag.evaluate(raw_model, hellaswag_examples, hellaswag_enc, dev,
                                         autocast_ctx=autocast, rank=rank, world_size=world_size)
                print0(f"step {step:6d} | hellaswag acc_norm {res['acc_norm']:.4f} "
                       f"({res['correct_norm']}/{res['total']}, {res['style']} style)")
                log.write(step=step, hellaswag_acc=res["acc"], hellaswag_acc_norm=res["acc_norm"])
            t_last += time.perf_counter() - t_eval

        t_step = time.perf_counter()
        lr = get_lr(step, max_lr, min_lr, warmup_steps, steps, lr_schedule, decay_steps)
        loss, grad_norm = train_step(model, raw_model, optimizers, scaler, train_loader.next_batch,
                                     grad_accum_steps, lr, autocast, dev, grad_clip)
        # no host sync on ordinary steps: the NaN check stays on the device until a log line or a
        # checkpoint (float16: an overflowed gradient is a step GradScaler skips, not a divergence;
        # the loss still counts)
        watched = loss if scaler.is_enabled() else torch.stack([loss, grad_norm.float()])
        first_bad_step = utils.track_nonfinite(first_bad_step, watched, step)
        steps_since_log += 1
        # one early estimate, so a long run says what it will cost
        if step == warm_step and steps - step > 1:
            if device_type == "cuda":
                torch.cuda.synchronize()
            per_step = time.perf_counter() - t_step
            print0(f"step {step:6d} | {per_step:.2f} s/step: "
                   f"about {duration(per_step * (steps - step - 1))} for "
                   f"the remaining {steps - step - 1} steps (evaluations not counted)")

        save_now = last_step or (checkpoint_interval and (step + 1) % checkpoint_interval == 0)
        if save_now or (log_interval and step % log_interval == 0):
            bad_step = utils.diverged_at(first_bad_step, step)
            if bad_step is not None:
                stop_diverged(bad_step)
            # the mean over micro-steps and ranks
            loss_mean = utils.all_reduce_sum(loss).item() / world_size
            if device_type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t_last) / steps_since_log
            tokens_per_sec = total_batch_size / dt
            mfu = raw_model.estimate_mfu(tokens_per_sec / world_size, dev)
            norm_value = grad_norm.item()
            print0(f"step {step:6d} | loss {loss_mean:.4f} | lr {lr:.3e} | norm {norm_value:.3f} | "
                   f"{dt * 1000:.1f} ms/step | {tokens_per_sec:,.0f} tok/s | "
                   f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}")
            log.write(step=step, train_loss=loss_mean, lr=lr, grad_norm=norm_value,
                      ms_per_step=dt * 1000, tokens_per_sec=tokens_per_sec, mfu=mfu)
            t_last, steps_since_log = time.perf_counter(), 0
        if save_now:
            path = save(step + 1)
            if path is None:
                # finite loss and norm, but weights that are not: diverged all the same
                stop_diverged(step)
            last_good = path

    if master:
        png = utils.plot_log(log_path, os.path.join(out, "loss.png"))
        print0(f"log: {log_path}"
               + (f", plot: {png}" if png else " (pip install matplotlib for loss.png)"))
    if wandb_run is not None:
        wandb_run.finish()
    utils.finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
