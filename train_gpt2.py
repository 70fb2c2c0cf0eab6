"""Train a GPT on token shards: one CPU core to eight GPUs, with exact resume.

    python train_gpt2.py                                              # GPT-2 124M, EXPERIMENTS.md §1
    torchrun --standalone --nproc_per_node=8 train_gpt2.py            # the same, data-parallel
    python train_gpt2.py --device=cpu --n_layer=2 --n_head=2 --n_embd=64 ...   # a toy on a laptop

Every setting below can be overridden with --name=value. The defaults are the §1 run.
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
import utils
from model import GPT, MLPS, NORM_POSS, NORMS, POS_EMBS, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings (all overridable with --name=value)
# data and output; relative paths are relative to this file's folder, not the current one
data_dir = "data/fineweb10B"  # folder of *_train_*.bin / *_val_*.bin shards (prepare_fineweb.py)
out_dir = "out"               # checkpoints, log.jsonl, loss.png
shuffle = True                # shuffle windows across all shards, reshuffled every epoch from the seed
# model (model.py's GPTConfig): the modern GPT-2 124M
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024             # context length T, tokens
vocab_size = 0                # 0 = the data's meta.json vocab rounded up to a multiple of 64 (GPT-2: 50304)
pos_emb = "rope"              # rope | learned | none
mlp = "swiglu"                # swiglu | gelu | silu | relu2
norm = "rmsnorm"              # rmsnorm | layernorm | none
norm_pos = "pre"              # pre | post
qk_norm = False
tie_embeddings = True
bias = False
dropout = 0.0
# batch
micro_batch_size = 32         # sequences per forward pass per process (B)
total_batch_size = 524288     # tokens per optimizer step, all processes and micro-steps together
# optimization
optimizer = "muon"            # muon | adamw (Muon for the hidden matrices, AdamW for the rest; adamw = §1 as run)
max_lr = 1.8e-3
min_lr = 1.8e-4
warmup_steps = 285
max_steps = 38146             # ~20B tokens = 2 epochs of FineWeb-Edu 10BT
lr_schedule = "cosine"        # cosine | wsd (warmup-stable-decay) | constant
decay_steps = 0               # wsd only: length of the final linear decay, steps
flop_budget = None            # FLOPs; when set, max_steps = budget / (FLOPs per token x total_batch_size)
weight_decay = 0.1            # on 2-D+ parameters only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0               # max global grad norm; 0 = off
# evaluation, logging, checkpoints (intervals in steps; 0 = never)
eval_interval = 250
val_steps = 20                # val batches of micro_batch_size x block_size per process
hellaswag_interval = 250
hellaswag_file = None         # None = hellaswag.py's cache; evaluated only when the file is there
hellaswag_limit = 0           # 0 = all 10,042 examples
sample_tokens = 32            # tokens sampled at each eval (0 = no samples)
sample_prompt = "Hello, I'm a language model,"
log_interval = 10
checkpoint_interval = 5000
keep_checkpoints = 3          # newest checkpoints kept in out_dir
resume = False                # continue from the newest checkpoint in out_dir (if there is one)
stop_step = -1                # stop with a checkpoint before this step, as if interrupted (-1 = never)
wandb_project = None          # log to Weights & Biases under this project (needs `pip install wandb`)
plot_only = False             # only redraw out_dir/loss.png from out_dir/log.jsonl, then exit
# system
device = ""                   # "" = cuda, then mps, then cpu
dtype = ""                    # "" = bfloat16 autocast on GPUs (float16 + GradScaler without bf16), float32 on CPU
compile = True                # torch.compile the training model (CUDA only)
seed = 1337

LR_SCHEDULES = ("cosine", "wsd", "constant")
CHOICES = dict(pos_emb=POS_EMBS, mlp=MLPS, norm=NORMS, norm_pos=NORM_POSS, optimizer=("adamw", "muon"),
               lr_schedule=LR_SCHEDULES, dtype=utils.DTYPES)  # checked when the command line is read
MODEL_FIELDS = [f.name for f in dataclasses.fields(GPTConfig)]


def resolve(path):
    return path if os.path.isabs(path) else os.path.join(HERE, path)


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


def text_codec(meta):
    """(encode, decode) for samples, from data.py and the shards' meta.json; (None, None) when unavailable."""
    meta = meta or {"tokenizer": "gpt2"}  # llm.c's shards come without meta.json: GPT-2 BPE
    try:
        data.decode(data.encode("a", meta), meta)  # offline without a tiktoken cache: train on, without samples
    except Exception as e:
        print(f"warning: no tokenizer for samples ({type(e).__name__}: {e})")
        return None, None
    return (lambda text: data.encode(text, meta)), (lambda ids: data.decode(ids, meta))


def main(settings):
    global vocab_size, max_steps
    out = resolve(out_dir)
    log_path = os.path.join(out, "log.jsonl")
    if plot_only:
        if not os.path.exists(log_path):
            raise SystemExit(f"error: --plot_only needs {log_path}: point --out_dir at a run's folder")
        print(utils.plot_log(log_path, os.path.join(out, "loss.png")) or "matplotlib is not installed")
        return

    # ---- processes, device, precision ----------------------------------------------------
    rank, local_rank, world_size, dev = utils.setup_distributed(utils.pick_device(device))
    device_type = dev.split(":")[0]
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)
    precision = utils.pick_dtype(dtype, device_type)
    autocast = utils.autocast_context(device_type, precision)
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls

    # ---- derived settings and their checks, before any work ----------------------------------
    for name in ("micro_batch_size", "block_size", "total_batch_size", "max_steps"):
        if settings[name] < 1:
            utils.bad_setting(f"--{name} must be at least 1, got {settings[name]}")
    if lr_schedule not in LR_SCHEDULES:
        raise SystemExit(f"error: --lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if optimizer not in ("adamw", "muon"):
        raise SystemExit(f"error: --optimizer must be adamw or muon, got {optimizer!r}")
    tokens_per_micro_step = micro_batch_size * block_size * world_size
    if total_batch_size % tokens_per_micro_step:
        raise SystemExit(f"error: total_batch_size {total_batch_size} is not a multiple of micro_batch_size "
                         f"{micro_batch_size} x block_size {block_size} x world_size {world_size} = "
                         f"{tokens_per_micro_step}")
    grad_accum_steps = total_batch_size // tokens_per_micro_step
    data_path = resolve(data_dir)
    meta = data.read_meta(data_path)
    if vocab_size == 0:
        vocab_size = 64 * math.ceil(meta["vocab_size"] / 64) if meta else 50304
    elif meta and meta["vocab_size"] > vocab_size:
        raise SystemExit(f"error: vocab_size {vocab_size} is below the data's vocabulary "
                         f"({meta['vocab_size']} in {data_path}/meta.json)")
    settings.update(vocab_size=vocab_size)
    try:
        model_config = GPTConfig(**{k: settings[k] for k in MODEL_FIELDS if k in settings})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        train_loader = data.WindowLoader(data_path, "train", micro_batch_size, block_size, rank, world_size,
                                         shuffle=shuffle, seed=seed, vocab_size=vocab_size)
        val_loader = data.WindowLoader(data_path, "val", micro_batch_size, block_size, rank, world_size,
                                       vocab_size=vocab_size)
    except data.ShardError as e:
        raise SystemExit(f"error: {e}\n  e.g. python prepare_fineweb.py, or python prepare_wikitext.py "
                         f"--text_file=... and --data_dir=<its out_dir>") from None

    # ---- model and optimizers ----------------------------------------------------------------
    raw_model = GPT(model_config).to(dev)  # saved, sampled and HellaSwag-scored: never compiled or wrapped
    if flop_budget:
        max_steps = int(flop_budget // (raw_model.flops_per_token() * total_batch_size))
        settings.update(max_steps=max_steps)
        if max_steps < 1:
            raise SystemExit(f"error: flop_budget {flop_budget:g} buys no step of {total_batch_size} tokens")
    if warmup_steps >= max_steps and lr_schedule != "constant":
        print0(f"warning: warmup_steps {warmup_steps} >= max_steps {max_steps}: the LR never decays")
    optimizers = raw_model.configure_optimizers(optimizer, weight_decay, max_lr, (beta1, beta2), 1e-8,
                                                device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "float16")
    model = raw_model
    if compile and device_type == "cuda":
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    # ---- resume ------------------------------------------------------------------------------
    start_step = 0
    checkpoint = utils.latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        print0(f"resume: no checkpoint in {out}, starting from scratch")
    if checkpoint:
        state = utils.load_checkpoint(checkpoint, map_location="cpu")  # rng states must stay CPU tensors; load_state_dict moves the rest
        saved = state.get("model_config", {})
        diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(model_config).items() if saved.get(k) != v}
        if diff:
            raise SystemExit(f"error: {checkpoint} was trained with a different model config "
                             f"(field: checkpoint vs now): {diff}")
        raw_model.load_state_dict(state["model"])
        if len(state["optimizers"]) != len(optimizers):
            raise SystemExit(f"error: {checkpoint} holds {len(state['optimizers'])} optimizer states, "
                             f"--optimizer={optimizer} needs {len(optimizers)}")
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        scaler.load_state_dict(state["scaler"])
        train_loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device_type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        start_step = state["step"]
        if master:  # events logged after the checkpoint was taken will be logged again
            utils.truncate_log(log_path, start_step)
        print0(f"resumed from {checkpoint} at step {start_step}")
        if start_step >= max_steps:
            print0(f"nothing to do: the run already reached max_steps {max_steps} (raise --max_steps to go on)")

    # ---- logging -----------------------------------------------------------------------------
    log = utils.JsonlLog(log_path, enabled=master)
    wandb_run = None
    if wandb_project and master:
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: --wandb_project is set but wandb is not installed (pip install wandb)")
        wandb_run = wandb.init(project=wandb_project, config=settings, resume="allow")

    def log_event(**fields):
        log.write(**fields)
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in fields.items() if isinstance(v, (int, float))}, step=fields["step"])

    header = utils.run_header(dev)
    n_params = raw_model.num_params()
    log_event(event="start", step=start_step, settings=settings, **header, params=n_params,
              grad_accum_steps=grad_accum_steps, world_size=world_size, dtype=precision)
    print0(f"{header} | {n_params / 1e6:.2f}M parameters | world {world_size} | {precision}")
    print0(" ".join(f"{k}={v}" for k, v in settings.items()))
    print0(f"total batch {total_batch_size} tokens = {micro_batch_size} x {block_size} x {world_size} "
           f"processes x {grad_accum_steps} accumulation steps; {max_steps} steps")

    # ---- HellaSwag and samples (on raw_model, so compile stays on for training) -----------------
    hellaswag_examples, hellaswag_enc = None, None
    if hellaswag_interval and (meta or {}).get("tokenizer", "gpt2") != "gpt2":
        print0(f"HellaSwag: skipped, it needs GPT-2 BPE tokens and {data_path} holds {meta['tokenizer']} tokens")
    elif hellaswag_interval:
        import hellaswag
        import tiktoken
        path = hellaswag_file or hellaswag.default_path()  # a file you name is read as given
        if master and not hellaswag_file:
            try:
                hellaswag.ensure_data()  # downloads and verifies it once, if it is not there yet
            except SystemExit as e:
                print(f"HellaSwag: skipped: {e}")
        # every rank must agree, or the all-reduce inside hellaswag.evaluate would hang
        have = utils.all_reduce_sum(torch.tensor(float(os.path.exists(path)), device=dev)).item()
        if have < world_size:
            print0(f"HellaSwag: skipped, {path} is not there on every rank (python hellaswag.py downloads it)")
            path = None
        if path:
            hellaswag_examples = hellaswag.load_examples(path, limit=hellaswag_limit)
            hellaswag_enc = tiktoken.get_encoding("gpt2")
    encode, decode = text_codec(meta)

    def evaluate(step):
        model.eval()
        val_loader.reset()
        val_loss = torch.zeros((), device=dev)
        with torch.no_grad():
            for _ in range(val_steps):
                x, y = val_loader.next_batch()
                with autocast:
                    _, loss = model(x.to(dev), y.to(dev))
                val_loss += loss.detach()
        val_loss = utils.all_reduce_sum(val_loss).item() / (val_steps * world_size)
        print0(f"step {step:6d} | val loss {val_loss:.4f}")
        log_event(step=step, val_loss=val_loss)
        model.train()
        return val_loss

    def sample(step):
        if not (sample_tokens and master and encode):
            return
        generator = torch.Generator(device=dev).manual_seed(seed + rank)
        idx = torch.tensor([encode(sample_prompt)], dtype=torch.long, device=dev)
        with autocast:
            out_idx = raw_model.generate(idx, sample_tokens, temperature=1.0, top_k=50, generator=generator)
        text = decode(out_idx[0].tolist())
        print0(f"step {step:6d} | sample: {text!r}")
        log_event(step=step, sample=text)

    def save(step):
        """Checkpoint taken before `step` runs: resuming starts at `step`."""
        if not master:
            return None
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
        payload = dict(model=raw_model.state_dict(), model_config=dataclasses.asdict(model_config),
                       optimizers=[o.state_dict() for o in optimizers], scaler=scaler.state_dict(), step=step,
                       settings=settings, loader=train_loader.state_dict(), rng=rng,
                       meta=meta or {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256})  # decodes samples
        path = utils.save_checkpoint(out, step, payload, keep=keep_checkpoints)
        print0(f"step {step:6d} | saved {path}")
        return path

    # ---- the loop --------------------------------------------------------------------------
    last_checkpoint = checkpoint
    first_bad_step = torch.full((), -1, device=dev)  # first step whose loss was not finite, kept on the device
    t_last, steps_since_log = time.perf_counter(), 0
    for step in range(start_step, max_steps):
        last_step = step == max_steps - 1
        if step == stop_step:
            last_checkpoint = save(step) or last_checkpoint
            print0(f"stopped before step {step} (--stop_step); resume with --resume=True")
            break
        t_eval = time.perf_counter()
        if eval_interval and (step % eval_interval == 0 or last_step):
            evaluate(step)
            sample(step)
        if hellaswag_examples and (step % hellaswag_interval == 0 or last_step):
            res = hellaswag.evaluate(raw_model, hellaswag_examples, hellaswag_enc, dev, autocast_ctx=autocast,
                                     rank=rank, world_size=world_size)
            print0(f"step {step:6d} | hellaswag acc_norm {res['acc_norm']:.4f} ({res['correct_norm']}/{res['total']}, "
                   f"{res['style']} style)")
            log_event(step=step, hellaswag_acc=res["acc"], hellaswag_acc_norm=res["acc_norm"])
        t_last += time.perf_counter() - t_eval  # ms/step and tokens/s count training only (evals end in a sync)

        lr = get_lr(step, max_lr, min_lr, warmup_steps, max_steps, lr_schedule, decay_steps)
        step_loss, grad_norm = train_step(model, raw_model, optimizers, scaler, train_loader.next_batch,
                                          grad_accum_steps, lr, autocast, dev, grad_clip)
        # no host sync here: the NaN check and the loss stay on the device until a log line needs them
        first_bad_step = utils.track_nonfinite(first_bad_step, step_loss, step)
        steps_since_log += 1

        checkpoint_now = last_step or (checkpoint_interval and (step + 1) % checkpoint_interval == 0)
        if last_step or checkpoint_now or (log_interval and step % log_interval == 0):
            bad_step = utils.diverged_at(first_bad_step, step)
            if bad_step is not None:
                log_event(event="diverged", step=bad_step)
                if master:  # rank 0 writes the checkpoints, so it knows the last good one
                    print(f"error: loss is NaN or inf at step {bad_step}; stopping. The last good checkpoint is "
                          f"{last_checkpoint or 'none (no checkpoint was written yet)'}, left intact.", file=sys.stderr)
                utils.finish_distributed()
                sys.exit(utils.EXIT_DIVERGED)
            loss_mean = utils.all_reduce_sum(step_loss).item() / world_size  # this step's mean over micro-steps and ranks
            if device_type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t_last) / steps_since_log
            tokens_per_sec = total_batch_size / dt
            mfu = raw_model.estimate_mfu(tokens_per_sec / world_size, dev)
            norm_value = grad_norm.item()
            print0(f"step {step:6d} | loss {loss_mean:.4f} | lr {lr:.3e} | norm {norm_value:.3f} | "
                   f"{dt * 1000:.1f} ms/step | {tokens_per_sec:,.0f} tok/s | "
                   f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}")
            log_event(step=step, train_loss=loss_mean, lr=lr, grad_norm=norm_value, ms_per_step=dt * 1000,
                      tokens_per_sec=tokens_per_sec, mfu=mfu)
            t_last, steps_since_log = time.perf_counter(), 0
        if checkpoint_now:
            last_checkpoint = save(step + 1) or last_checkpoint

    if master:
        png = utils.plot_log(log_path, os.path.join(out, "loss.png"))
        print0(f"log: {log_path}" + (f", plot: {png}" if png else ""))
    if wandb_run is not None:
        wandb_run.finish()
    utils.finish_distributed()


def train_step(model, raw_model, optimizers, scaler, next_batch, grad_accum_steps, lr, autocast, dev, clip):
    """One optimizer step of grad_accum_steps micro-steps (bench.py times this same function).

    Gradients are synced across processes only on the last micro-step. Returns (loss, grad_norm) as
    device tensors, the loss being the mean over micro-steps: no host sync here, the caller decides when
    a figure is worth one.
    """
    step_loss = torch.zeros((), device=dev)
    for micro_step in range(grad_accum_steps):
        x, y = next_batch()
        if dev.startswith("cuda"):
            x, y = x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
        else:
            x, y = x.to(dev), y.to(dev)
        # no_sync around forward *and* backward: DDP decides in the forward whether to reduce
        sync = not isinstance(model, DDP) or micro_step == grad_accum_steps - 1
        with (nullcontext() if sync else model.no_sync()):
            with autocast:
                _, loss = model(x, y)
            loss = loss / grad_accum_steps  # a constant scale, so the sum is the mean over micro-steps
            step_loss += loss.detach()
            scaler.scale(loss).backward()
    grad_norm = torch.zeros((), device=dev)
    if clip > 0:
        for opt in optimizers:
            scaler.unscale_(opt)  # a no-op unless float16
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), clip)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return step_loss, grad_norm


if __name__ == "__main__":
    main(utils.apply_overrides(globals(), sys.argv[1:], CHOICES))
