"""What a training script is made of: the run's lifecycle (Run), the LR schedules, the GPT's step.

A trainer's main reads top to bottom as nanoGPT's train.py does:
    settings -> run = Run(...) -> processes, device -> data -> model -> optimizers
    -> run.begin(...) -> the loop (evaluate, step, log, save) -> run.end(...)
Run owns the run's folder and its life, the same for both trainers: the folder's lock, a fresh
start or --resume=True (the newest checkpoint that loads, its settings, the data it was trained
on), the start line and event (settings, versions, the source: git commit and the diff of an edited
tree), the NaN watch, timing that counts training only, log.jsonl (and Weights & Biases),
checkpoints (never of weights that are not finite; atomic; pruned by step), --stop_step and
SIGTERM/SIGINT (every rank stops at the same step, with a checkpoint), loss.png and the exit status
(0; 2 a bad setting; 3 diverged; 130/143 after SIGINT/SIGTERM).
"""
import contextlib
import dataclasses
import hashlib
import inspect
import math
import os
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import utils

# a resumed run takes its settings from its checkpoint, but for these, which belong to each command
PER_RUN = ("out_dir", "resume", "stop_step", "plot_only", "allow_data_change", "init_from")
LR_SCHEDULES = ("cosine", "wsd", "constant")

# -----------------------------------------------------------------------------
# LR schedules: a factor of the step; each param group trains at its initial_lr x the factor


def lr_factor(step, s):
    """The LR at `step` (0-based) as a fraction of max_lr, from the settings s: warmup to 1 at step
    warmup_steps - 1, then cosine: min + (cos(pi (t - a) / (b - a)) + 1) (1 - min) / 2 with
    a = warmup_steps, b = max_steps - 1; wsd: 1, then a linear decay over the last decay_steps."""
    low, warmup, last = s["min_lr"] / s["max_lr"], s["warmup_steps"], s["max_steps"] - 1
    if step < warmup:
        return (step + 1) / warmup
    if s["lr_schedule"] == "cosine":
        if last <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (last - warmup))
        return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - low)
    if s["lr_schedule"] == "wsd":
        decay_start = last - s["decay_steps"]
        if step <= decay_start or s["decay_steps"] <= 0:
            return 1.0
        return 1.0 + (low - 1.0) * min(1.0, (step - decay_start) / s["decay_steps"])
    return 1.0  # constant


def set_lr(optimizers, factor):
    """Each param group trains at its own initial_lr (its own LR scale) x the schedule's factor."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor


# -----------------------------------------------------------------------------
# the GPT's training step (train_gpt2.py, and bench.py times this same function)


def train_step(model, optimizers, next_batch, factor, *, accum_steps, scaler, autocast, device,
               grad_clip):
    """One optimizer step of accum_steps micro-steps at the schedule's `factor`: (mean loss, grad
    norm) as device tensors, no host sync (the NaN watch reads the norm, clipping off too)."""
    step_loss = torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        x, y = [t.pin_memory().to(device, non_blocking=True) if device.startswith("cuda")
                else t.to(device) for t in next_batch()]
        # no_sync around forward *and* backward: DDP decides in the forward whether to reduce, and
        # only the last micro-step's gradients are synced across processes
        last = micro_step == accum_steps - 1
        with contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            with autocast:
                _, loss = model(x, y)
            loss = loss / accum_steps  # a constant scale, so the sum is the mean over micro-steps
            step_loss += loss.detach()
            scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.unscale_(opt)  # a no-op unless float16
    grad_norm = clip_grads([p for opt in optimizers for g in opt.param_groups for p in g["params"]],
                           grad_clip)
    set_lr(optimizers, factor)
    for opt in optimizers:
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    scaler.update()
    return step_loss, grad_norm


def clip_grads(params, clip):
    """The gradients' global norm; with clip > 0 they are scaled down to at most clip."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def wrap(raw_model, compile_model, world_size, device):
    """The model the loop trains, compiled and/or DDP-wrapped (raw_model is saved and sampled).
    DDP does not broadcast buffers: the RoPE tables, the only ones, are the config's on every rank."""
    model = torch.compile(raw_model) if compile_model else raw_model
    if world_size > 1:
        ids = [int(device.split(":")[1])] if device.startswith("cuda") else None
        # torch 2.13 renamed the switch (and deprecated the old name); older torch knows only the old
        sync = "forward_sync_buffers" if "forward_sync_buffers" in DDP_SWITCHES else "broadcast_buffers"
        model = DDP(model, device_ids=ids, **{sync: False})
    return model


DDP_SWITCHES = inspect.signature(DDP).parameters


# -----------------------------------------------------------------------------
# the source a run was made from: git commit, and the diff of an edited tree


def provenance(out, print0):
    """{"commit", "dirty", "diff"} of the repo: an edited tree's diff is also saved in `out` (and in
    every checkpoint), so a run of a fork can be traced to its edit. Outside git it says so."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=utils.REPO, capture_output=True, text=True,
                              timeout=30, check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD", "--no-color", "--no-ext-diff")
    except (OSError, subprocess.SubprocessError):
        print0(f"source: {utils.REPO} is not a git checkout: no commit recorded")
        return {"commit": None, "dirty": None, "diff": ""}
    source = {"commit": commit, "dirty": bool(diff), "diff": diff}
    if diff:
        source["diff_file"] = f"source-{hashlib.sha256(diff.encode()).hexdigest()[:8]}.diff"
        utils.atomic_write(os.path.join(out, source["diff_file"]), lambda f: f.write(diff), mode="w")
        print0(f"source: {commit[:10]} + edits, saved as {os.path.join(out, source['diff_file'])}")
    return source


# -----------------------------------------------------------------------------
# the run


class Run:
    """One training run in out_dir (module docstring). Run() runs on every rank before the process
    group exists: rank 0 takes the lock, and every rank decides alike from a folder that is written
    only after begin's barrier. A resumed run's settings go into the script's namespace, checked."""

    def __init__(self, namespace, argv, can_change, check_settings):
        self.s, self.rank = namespace, int(os.environ.get("RANK", "0"))
        self.master, self.world_size = self.rank == 0, int(os.environ.get("WORLD_SIZE", "1"))
        self.print0 = print if self.master else (lambda *a, **k: None)
        self.out, resume = utils.in_repo(namespace["out_dir"]), namespace["resume"]
        self.log_path = os.path.join(self.out, "log.jsonl")
        utils.require(not resume or os.path.isdir(self.out),
                      f"--resume=True, but {self.out} does not exist: check --out_dir "
                      f"(a new run needs no --resume)")
        self.lock = utils.lock_folder(self.out, "training run") if self.master else None
        if self.master:
            utils.remove_stale_temporaries(self.out)  # of writers killed mid-checkpoint
        self.unreadable, self.changes = [], {}  # checkpoints that do not load: begin sets them aside
        self.ckpt_path, self.ckpt = None, None
        if resume:
            self.ckpt_path, self.ckpt = utils.load_latest_checkpoint(self.out, self.print0,
                                                                     self.unreadable)
        if not resume:  # a fresh start never writes into another run's folder: pruning would delete
            # its checkpoints, the logs would interleave, and --resume would continue the old run
            held = [os.path.basename(p) for p in utils.checkpoint_paths(self.out)]
            held += ["log.jsonl"] * os.path.exists(self.log_path)
            utils.require(not held, f"{self.out} holds a run ({', '.join(held[-2:])}): continue it "
                                    f"with --resume=True, or start a new run with another --out_dir")
        elif self.ckpt is None and self.unreadable:  # never a fresh start
            raise SystemExit(f"error: none of the {len(self.unreadable)} checkpoints in {self.out} "
                             f"loads; nothing was changed. Resume from a copy of the run, or start "
                             f"anew in another --out_dir")
        elif self.ckpt is None:
            self.print0(f"resume: no checkpoint in {self.out}, starting from scratch")
        else:
            self.merge_settings(argv, can_change)
            check_settings()  # the checkpoint's settings pass the same checks as typed ones
        self.start_step = int(self.ckpt["step"]) if self.ckpt else 0
        stop = namespace.get("stop_step", -1)
        utils.require(stop == -1 or stop > self.start_step,
                      f"--stop_step={stop} is not after the checkpoint's step {self.start_step}: "
                      f"give a later step, or leave it out")
        self.last_good, self.saved_step = self.ckpt_path, self.start_step if self.ckpt else None
        self.signal, self.stop_reason = 0, None
        self.log = utils.JsonlLog(self.log_path, enabled=self.master)

    def merge_settings(self, argv, can_change):
        """The checkpoint's settings, but for PER_RUN and what the command line may change."""
        saved = {k: v for k, v in self.ckpt["settings"].items() if k not in PER_RUN}
        current = utils.settings_of(self.s)
        given = utils.given_settings(argv, current)
        refused = {}
        for name, value in saved.items():
            if name not in current:
                continue  # a setting this version of the script no longer has
            if name not in given:
                current[name] = value
            elif current[name] != value:
                (self.changes if name in can_change else refused)[name] = (value, current[name])
        model = {k: v for k, v in refused.items() if k in self.ckpt["model_config"]}
        utils.require(not model, f"{self.ckpt_path} was trained with a different model config "
                                 f"(field: checkpoint, now): {model}; a resumed run keeps its model")
        utils.require(not refused, f"a resumed run keeps its checkpoint's settings; these differ "
                                   f"(name: checkpoint, now): {refused}. Drop them from the "
                                   f"command line, or start a new run in another --out_dir")
        self.s.update(current)

    # ---- begin: restore, say what runs ---------------------------------------------------------

    def begin(self, settings, *, model, model_config, optimizers, scaler, loader, meta, device,
              compiled, header, details=None):
        """On every rank: restore the checkpoint (returned, for the trainer's own state; None on a
        fresh start), then rank 0 starts the log. `settings`: as run, derived values filled in."""
        self.settings, self.model, self.model_config = settings, model, model_config
        self.optimizers, self.scaler, self.loader, self.meta = optimizers, scaler, loader, meta
        self.device, self.world_size, self.compiled = device, utils.world_size(), compiled
        utils.barrier()  # every rank has decided from an untouched folder: rank 0 may write now
        max_steps, start = settings["max_steps"], self.start_step
        utils.require(max_steps >= start, f"--max_steps={max_steps} is below the checkpoint's step "
                                          f"{start}: a run cannot go back; raise --max_steps")
        ckpt, self.ckpt = self.ckpt, None
        if ckpt is not None:
            self.restore(ckpt)
        else:  # each rank its own dropout masks, from the seed
            torch.manual_seed(settings["seed"] + self.rank)
        if ckpt is not None and max_steps == start:
            self.print0(f"nothing to do: {self.ckpt_path} is at step {start} = max_steps "
                        f"(raise --max_steps to go on)")
            self.finish()
            sys.exit(0)
        for line in header:
            self.print0(line)
        self.source = None
        if self.master:  # only rank 0 writes: the log, the checkpoints, the source's diff
            for path in self.unreadable:
                os.replace(path, path + ".unreadable")
            utils.truncate_log(self.log_path, start)  # what came after the checkpoint runs again
            self.source = provenance(self.out, self.print0)
            if self.s.get("wandb_project"):
                self.log.wandb_run = start_wandb(self.s["wandb_project"], settings)
        self.log.write(event="start", step=start, settings=settings, **utils.run_header(device),
                       params=sum(p.numel() for p in model.parameters()), world_size=self.world_size,
                       **(details or {}), resumed_from=self.ckpt_path,
                       source=self.source and {k: v for k, v in self.source.items() if k != "diff"})
        if ckpt is not None:
            self.say_resumed(ckpt)
        if start == 0 and settings["warmup_steps"] >= max_steps \
                and settings["lr_schedule"] != "constant":
            self.print0(f"warning: warmup_steps {settings['warmup_steps']} >= max_steps "
                        f"{max_steps}: the LR never decays")
        self.first_bad_step = torch.full((), -1, device=device)
        self.cpu_group = dist.new_group(backend="gloo") if self.world_size > 1 else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        self.t_last, self.steps_since_log, self.first_step = time.perf_counter(), 0, start
        return ckpt

    def restore(self, ckpt):
        """Model, optimizers, scaler, loader, this rank's RNG, once model and data are checked."""
        saved_meta = {k: ckpt["meta"].get(k) for k in ("tokenizer", "vocab_size", "itos")}
        wrong = [k for k in saved_meta if saved_meta[k] != self.meta.get(k)]
        if wrong:
            raise SystemExit(f"error: {self.ckpt_path} was trained on data of another vocabulary "
                             f"than --data_dir={self.s['data_dir']} holds: its {', '.join(wrong)} "
                             f"differ; point --data_dir at the run's data")
        now = dataclasses.asdict(self.model_config)
        diff = {k: (ckpt["model_config"].get(k), v) for k, v in now.items()
                if ckpt["model_config"].get(k) != v}
        if diff:
            raise SystemExit(f"error: {self.ckpt_path} was trained with a different model config "
                             f"(field: checkpoint, now): {diff}")
        shards, now_shards = ckpt["loader"].get("shards"), self.loader.state_dict().get("shards")
        if shards != now_shards and not self.s.get("allow_data_change"):
            gone = sorted({tuple(x) for x in shards} - {tuple(x) for x in now_shards})
            new = sorted({tuple(x) for x in now_shards} - {tuple(x) for x in shards})
            raise SystemExit(f"error: the train shards in --data_dir={self.s['data_dir']} are not "
                             f"{self.ckpt_path}'s (name, tokens): {len(gone)} gone {gone[:2]}, "
                             f"{len(new)} new {new[:2]}. Point --data_dir at the run's data, or "
                             f"pass --allow_data_change=True to go on with these")
        self.model.load_state_dict(ckpt["model"])
        for opt, state in zip(self.optimizers, ckpt["optimizers"], strict=True):
            initial = [g["initial_lr"] for g in opt.param_groups]
            opt.load_state_dict(state)
            for g, lr in zip(opt.param_groups, initial, strict=True):
                g["initial_lr"] = lr  # the settings' LRs (max_lr may change on resume)
        if ckpt["scaler"]:  # empty unless the checkpoint was trained in float16
            self.scaler.load_state_dict(ckpt["scaler"])
        self.loader.load_state_dict(ckpt["loader"])
        rngs = ckpt["rng"]
        if len(rngs) == self.world_size:  # each rank its own generators
            torch.set_rng_state(rngs[self.rank]["cpu"])
            if self.device.startswith("cuda") and rngs[self.rank]["cuda"] is not None:
                torch.cuda.set_rng_state(rngs[self.rank]["cuda"])
        else:  # another number of processes: fresh generators, distinct per rank and resume
            torch.manual_seed(self.s["seed"] + self.rank + self.world_size * self.start_step)

    def say_resumed(self, ckpt):
        """The resume line, and how a changed setting moves the LR at the resume step."""
        at, changes = self.start_step, ", ".join(f"{k} {a} -> {b}"
                                                 for k, (a, b) in self.changes.items())
        self.print0(f"resumed from {self.ckpt_path} at step {at} with its settings"
                    + (f"; {changes}" if changes else ""))
        before, now = ckpt["settings"], self.settings
        lr_then = before["max_lr"] * lr_factor(at, before)
        lr_now = now["max_lr"] * lr_factor(at, now)
        if not math.isclose(lr_then, lr_now, rel_tol=1e-9):
            self.print0(f"{changes} moves the LR at step {at} from {lr_then:.3e} to {lr_now:.3e}")

    # ---- the loop ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def paused(self):
        """Time left out of ms/step (evaluation, checkpoints); queued GPU work is training time."""
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.t_last += time.perf_counter() - t0

    def after_step(self, step, *watched):
        """Per step: the NaN watch (the first non-finite step, kept on the device: no host sync),
        the first compiled step's time apart (compilation), one early estimate of the run's time."""
        values = torch.stack([v.detach().float() for v in watched])
        bad = (self.first_bad_step < 0) & ~torch.isfinite(values).all()
        self.first_bad_step = torch.where(bad, torch.full_like(self.first_bad_step, step),
                                          self.first_bad_step)
        self.steps_since_log += 1
        if step not in (self.first_step, self.first_step + self.compiled):
            return
        self.sync()
        seconds, left = time.perf_counter() - self.t_last, self.settings["max_steps"] - step - 1
        if self.compiled and step == self.first_step:
            self.print0(f"step {step:6d} | first step {seconds:.1f} s (compilation: not counted in "
                        f"ms/step)")
            self.t_last, self.steps_since_log = time.perf_counter(), 0
        elif left > 0:
            self.print0(f"step {step:6d} | {seconds:.2f} s/step: about {duration(seconds * left)} "
                        f"for the remaining {left} steps (evaluations not counted)")

    def log_step(self, step, loss, grad_norm, lr, tokens_per_step, mfu=None, **extra):
        """A log line and event: loss and `extra` averaged over ranks, LR, norm, ms/step, tokens/s,
        MFU (mfu(tokens/s)) since the last line; exit 3 if a step so far was not finite."""
        self.check_finite(step)
        names = list(extra)
        values = torch.stack([loss.detach().float()] + [extra[k].detach().float() for k in names])
        values = (utils.all_reduce_sum(values) / self.world_size).tolist()
        self.sync()
        record = {"step": step, "train_loss": values[0], "lr": lr, "grad_norm": grad_norm.item(),
                  "ms_per_step": None, "tokens_per_sec": None, "mfu": None,
                  **dict(zip(names, values[1:], strict=True))}
        timing = "warm-up"
        if self.steps_since_log:
            dt = (time.perf_counter() - self.t_last) / self.steps_since_log
            rate = tokens_per_step / dt
            record.update(ms_per_step=dt * 1000, tokens_per_sec=rate, mfu=mfu and mfu(rate))
            timing = f"{dt * 1000:.1f} ms/step | {rate:,.0f} tok/s" + (
                f" | MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else "")
        self.log.write(**record)
        self.print0(f"step {step:6d} | loss {values[0]:.4f} | lr {lr:.3e} | "
                    f"norm {record['grad_norm']:.3f} | {timing}"
                    + "".join(f" | {k} {v:.4f}" for k, v in zip(names, values[1:], strict=True)))
        self.t_last, self.steps_since_log = time.perf_counter(), 0

    def stopping(self, step):
        """Whether the run stops before `step`: --stop_step, or SIGTERM/SIGINT received by any rank
        (one small all-reduce on the CPU, so every rank stops at the same step)."""
        received = self.signal
        if self.cpu_group is not None:
            flag = torch.tensor([received])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group)
            received = int(flag)
        if received:
            self.stop_reason = received
        elif step == self.s.get("stop_step", -1):
            self.stop_reason = "stop_step"
        return self.stop_reason is not None

    def on_signal(self, signum, frame):
        if self.signal:  # a second one: abort now (a checkpoint being written is removed whole)
            raise SystemExit(128 + signum)
        self.signal = signum
        self.print0(f"\n{signal.Signals(signum).name} received: stopping at the end of this step "
                    f"with a checkpoint ({signal.Signals(signum).name} again aborts at once)",
                    flush=True)

    def save(self, step, **extra):
        """The checkpoint before `step`, every rank taking part (with `extra`, the trainer's own
        state): never of weights that are not finite (exit 3), so the newest is always good."""
        if step == self.saved_step:
            return  # written already (a checkpoint interval ended where the run stops)
        with self.paused():
            self.check_finite(step, weights=True)
            rngs = utils.all_gather_objects({
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if self.device.startswith("cuda") else None})
            t0 = time.perf_counter()
            if self.master:
                payload = dict(model=self.model.state_dict(),
                               model_config=dataclasses.asdict(self.model_config),
                               optimizers=[o.state_dict() for o in self.optimizers],
                               scaler=self.scaler.state_dict(), step=step, settings=self.settings,
                               loader=self.loader.state_dict(), rng=rngs, meta=self.meta,
                               source=self.source, **extra)
                path = os.path.join(self.out, f"ckpt_{step:06d}.pt")
                utils.atomic_write(path, lambda f: torch.save(payload, f))
                self.prune(path)
                seconds = time.perf_counter() - t0
                self.print0(f"step {step:6d} | saved {path} ({seconds:.1f} s)")
                self.log.write(event="checkpoint", step=step, path=path, seconds=seconds)
        self.saved_step, self.last_good = step, os.path.join(self.out, f"ckpt_{step:06d}.pt")

    def prune(self, written):
        """Keep the newest keep_checkpoints by step, the one just written among them; set aside a
        later step's (another timeline)."""
        step, keep = utils.checkpoint_step(written), self.s["keep_checkpoints"]
        paths = utils.checkpoint_paths(self.out)
        for path in paths:
            if utils.checkpoint_step(path) > step:
                os.replace(path, path + ".later")
                self.print0(f"warning: set aside {path} as .later: a step after this run's")
        older = [p for p in paths if utils.checkpoint_step(p) < step]
        for path in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
            utils.remove_quietly(path)

    def check_finite(self, step, weights=False):
        """Exit 3 if a loss or grad norm so far, or (weights) a weight now, is NaN/inf on any rank:
        one host sync and one all-reduce."""
        flags = torch.stack([(self.first_bad_step >= 0).float(),
                             torch.zeros((), device=self.device)])
        if weights:
            flags[1] = (~torch.stack([torch.isfinite(p.detach()).all()
                                      for p in self.model.parameters()]).all()).float()
        flags = utils.all_reduce_sum(flags).tolist()
        if flags[0]:
            mine = int(self.first_bad_step.item())
            self.diverge(mine if mine >= 0 else step, "the loss or gradient norm")
        if flags[1]:
            self.diverge(step, "a weight")

    def diverge(self, bad_step, what):
        self.log.write(event="diverged", step=bad_step)
        self.print0(f"error: {what} is NaN or inf at step {bad_step}; stopping. The last good "
                    f"checkpoint is {self.last_good or 'none (no checkpoint was written yet)'}, "
                    f"left intact. Resume from it with a lower --max_lr (or --grad_clip) and "
                    f"--resume=True", file=sys.stderr)
        self.finish()
        sys.exit(utils.EXIT_DIVERGED)

    # ---- the end ---------------------------------------------------------------------------------

    def end(self, step, note=None, **extra):
        """After the loop: the checkpoint of `step`, why the run stopped, loss.png; 130/143 after a
        signal."""
        self.save(step, **extra)
        if isinstance(self.stop_reason, int):
            name = signal.Signals(self.stop_reason).name
            self.print0(f"stopped by {name} before step {step}: {self.last_good} holds the run; "
                        f"continue with --resume=True --out_dir={self.s['out_dir']}")
        elif self.stop_reason == "stop_step":
            self.print0(f"stopped before step {step} (--stop_step); continue with --resume=True "
                        f"--out_dir={self.s['out_dir']}")
        elif note:
            self.print0(note)
        if self.master:
            png = utils.plot_log(self.log_path, os.path.join(self.out, "loss.png"))
            self.print0(f"log: {self.log_path}"
                        + (f", plot: {png}" if png else " (pip install matplotlib for loss.png)"))
        self.finish()
        if isinstance(self.stop_reason, int):
            sys.exit(128 + self.stop_reason)

    def finish(self):
        """wandb, the process group, the signal handlers, the lock: nothing held after a run."""
        if self.log.wandb_run is not None:
            self.log.wandb_run.finish()
        utils.finish_distributed()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        if self.lock is not None:
            self.lock.close()

    def sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def start_wandb(project, settings):
    try:
        import wandb
    except ImportError:
        utils.bad_setting("--wandb_project is set but wandb is not installed (pip install wandb)")
    return wandb.init(project=project, config=settings, resume="allow")


def duration(seconds):
    hours, minutes = divmod(round(seconds / 60), 60)
    return (f"{hours}h{minutes:02d}m" if hours
            else f"{seconds:.0f} s" if seconds < 120 else f"{minutes} min")
