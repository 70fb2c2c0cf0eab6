"""Run a trainer once per point of a grid, of §2's ablations or of §3's FLOP-budgeted random search.

    python sweep.py --sweep_dir=sweeps/lr --max_lr=3e-4,1e-3,2e-3,3e-3 --micro_batch_size=128
    python sweep.py --mode=ablations --sweep_dir=sweeps/ablations --max_lr=1e-3,2e-3
    python sweep.py --mode=random --flop_budget=1e16 --n_samples=20 --sweep_dir=sweeps/search
    python sweep.py --report_only=True --sweep_dir=sweeps/lr     # only redraw the table and plots

The settings below are the sweep's; any other --name=value goes to the trainer, a comma list as a
grid axis (so no value can hold a comma). Each run has a folder sweep_dir/<name>/ (run.json,
stdout.log, log.jsonl); a rerun skips finished runs and resumes interrupted ones. Ctrl-C or SIGTERM
goes on to the running trainers (they checkpoint and stop) and the sweep exits 130 or 143.
"""
import concurrent.futures
import contextlib
import csv
import ctypes
import fcntl
import hashlib
import itertools
import json
import math
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

import torch

import data
import utils
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings (all overridable with --name=value)
script = "train_gpt2.py"      # trainer in this folder (grids and ablations also run train_lstm.py)
sweep_dir = "sweeps/default"  # one folder per run inside; relative to this folder
mode = "grid"                 # grid | ablations (§2, times the grid) | random (§3, train_gpt2.py)
parallel = 1                  # runs at a time
gpus = ""                     # e.g. "0,1,2,3": slot i runs with CUDA_VISIBLE_DEVICES=gpus[i % len]
lr_scaling = "none"           # none | linear | sqrt: LRs times (batch / base_batch) ** (1 | 0.5)
base_batch = 128              # batch (sequences per optimizer step) the given LRs are right for
min_lr_ratio = 0.0            # > 0: min_lr = this x the run's max_lr (0.1 as in §1), after scaling
retry_failed = False          # relaunch failed, diverged and oom runs; finished runs never rerun
dry_run = False               # print the runs and their overrides; launch and write nothing
report_only = False           # only redraw results.md, results.csv and the plots of sweep_dir
flop_budget = None            # FLOPs per run: random sets max_steps from it, grid/ablations pass it to the trainer
# random search (§3): max_lr = 10 x min_lr, warmup = 10% of the steps; each range is inclusive
n_samples = 20                # runs to launch; rejected draws are recorded as skipped, not counted
random_seed = 0               # the same seed draws the same runs: a rerun continues the same search
batch_lo = 32                 # sequences per optimizer step, a power of two from batch_lo...
batch_hi = 512                # ...to batch_hi
seq_len_lo = 32               # block_size in tokens, a power of two from seq_len_lo...
seq_len_hi = 512              # ...to seq_len_hi
n_embd_lo = 64                # width, log-uniform from n_embd_lo...
n_embd_hi = 512               # ...to n_embd_hi, rounded to a multiple of 16
n_layer_lo = 2                # layers, uniform from n_layer_lo...
n_layer_hi = 8                # ...to n_layer_hi
n_head_lo = 2                 # heads, uniform over n_head_lo...
n_head_hi = 8                 # ...n_head_hi that divide the width (to an even head size with RoPE)
min_lr_lo = 1e-5              # min_lr, log-uniform from min_lr_lo...
min_lr_hi = 1e-3              # ...to min_lr_hi
min_params = 0                # parameters (num_params, embeddings included) at least...
max_params = 50_000_000       # ...and at most; draws outside are skipped
max_micro_batch = 0           # sequences per forward pass at most, the rest by gradient accumulation; 0 = no cap

CHOICES = dict(mode=("grid", "ablations", "random"), lr_scaling=("none", "linear", "sqrt"))
# EXPERIMENTS.md §2: each changes one switch of the baseline
ABLATIONS = dict(baseline={}, no_rmsnorm={"norm": "none"}, post_norm={"norm_pos": "post"},
                 no_rope={"pos_emb": "none"}, silu_ffn={"mlp": "silu"})
RANGES = ("batch", "seq_len", "n_embd", "n_layer", "n_head", "min_lr")  # <name>_lo, <name>_hi
RETRYABLE = ("failed", "diverged", "oom")  # relaunched only with --retry_failed=True
# exit statuses of a Ctrl-C'd or terminated run: killed by the signal, or stopped by its handler
INTERRUPTED = (-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM)
STATES = ("finished", "diverged", "oom", "failed", "interrupted", "running", "skipped")  # table order
SET_BY_SWEEP = ("out_dir", "resume")
DRAWN = ("n_layer", "n_head", "n_embd", "block_size", "micro_batch_size", "total_batch_size",
         "min_lr", "max_lr", "warmup_steps", "max_steps")  # set per run by the random search
# Linux's prctl: a trainer gets a signal when the sweep dies, however it dies (kill -9); elsewhere
# (no prctl) a sweep killed hard leaves its trainers running
PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
PR_SET_PDEATHSIG = 1
COLUMNS = dict(run="", overrides="", params=",", tokens=",", best_val_loss=".4f",  # and formats
               val_ppl=".2f", hellaswag_acc_norm=".4f", runtime_s=".0f", state="", note="")


def check_settings():
    utils.require(sweep_dir != "", "--sweep_dir must name a folder")
    utils.require(os.path.isfile(os.path.join(HERE, script)),
                  f"--script={script}: no such file in {HERE}")
    for name, low in (("parallel", 1), ("base_batch", 1), ("n_samples", 1), ("max_micro_batch", 0),
                      ("min_params", 0)):
        utils.require(globals()[name] >= low, f"--{name}={globals()[name]}: want at least {low}")
    utils.require(min_params <= max_params,
                  f"--max_params={max_params}: want at least --min_params={min_params}")
    utils.require(0 <= min_lr_ratio <= 1, f"--min_lr_ratio={min_lr_ratio}: want 0 (off) to 1")
    utils.require(flop_budget is None
                  or (type(flop_budget) in (int, float) and 0 < flop_budget < math.inf),
                  f"--flop_budget={flop_budget}: want a number of FLOPs above 0 (or leave it out)")
    utils.require(mode != "random" or flop_budget is not None, "--mode=random needs --flop_budget")
    for name in RANGES:
        lo, hi = globals()[f"{name}_lo"], globals()[f"{name}_hi"]
        given = f"--{name}_lo={lo}, --{name}_hi={hi}"
        utils.require(0 < lo <= hi < math.inf, f"{given}: want 0 < lo <= hi")
        utils.require(name not in ("batch", "seq_len") or 2 ** math.ceil(math.log2(lo)) <= hi,
                      f"{given}: the range holds no power of two")


# -----------------------------------------------------------------------------
# the plan: a list of runs {name, overrides (name -> text), reason (why skipped) or None}


def trainer_settings():
    """The trainer's {setting: default}, {setting: choices} from --help=json (importing runs it)."""
    command = [sys.executable, os.path.join(HERE, script), "--help=json"]
    asked = f"--script={script}: `python {script} --help=json`"
    try:
        out = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        utils.bad_setting(f"{asked} failed: {e}")
    lines = out.stdout.strip().splitlines()
    with contextlib.suppress(ValueError, IndexError, KeyError, TypeError):
        answer = json.loads(lines[-1])  # the last line: anything printed on import comes first
        if out.returncode == 0:
            return dict(answer["settings"]), dict(answer["choices"])
    # a traceback's last line says why; otherwise what it printed instead
    why = (out.stderr.strip().splitlines() or lines or ["no output"])[-1][:200]
    utils.bad_setting(f"{asked} gave no settings (exit {out.returncode}: {why})")


def trainer_overrides(passed):
    """The trainer's defaults, and its fixed overrides and grid axes as text, each value checked."""
    defaults, choices = trainer_settings()
    axes = {k: [v.strip() for v in text.split(",")] for k, text in passed.items() if "," in text}
    for name, text in passed.items():
        utils.require(name in defaults and name not in SET_BY_SWEEP, f"--{name} is neither a "
                      f"sweep.py setting nor one of {script}'s that sweep.py passes on")
        for v in axes.get(name, [text]):
            try:
                value = utils.parse_value(name, v, defaults[name])
            except ValueError as e:
                utils.bad_setting(f"cannot parse --{name}={v}: {e}")
            utils.require(value in choices.get(name, [value]),
                          f"--{name}={v}: allowed values are {choices.get(name)}")
    fixed = {k: v for k, v in passed.items() if k not in axes}
    if mode == "random":
        utils.require(all(k in defaults for k in DRAWN),
                      f"--mode=random: {script} lacks train_gpt2.py's settings")
        taken = [k for k in passed if k in DRAWN or k in axes]
        utils.require(not taken, f"--{next(iter(taken), '')}: --mode=random draws {', '.join(DRAWN)}"
                      f" itself (set their ranges instead) and takes no grid axes")
    elif flop_budget is not None:  # the trainer derives max_steps from it
        utils.require("flop_budget" in defaults, f"--flop_budget: {script} has no such setting")
        fixed["flop_budget"] = f"{flop_budget:g}"
    return defaults, fixed, axes


def with_batch_and_lr(overrides, defaults):
    """The overrides plus total_batch_size (no accumulation), min_lr (min_lr_ratio), scaled LRs."""
    ov = dict(overrides)

    def get(name):
        return utils.parse_value(name, ov[name], defaults[name]) if name in ov else defaults.get(name)
    if "micro_batch_size" in ov and "total_batch_size" in defaults and "total_batch_size" not in ov:
        ov["total_batch_size"] = str(get("micro_batch_size") * get("block_size"))
    if min_lr_ratio > 0:
        ov["min_lr"] = f"{get('max_lr') * min_lr_ratio:.4g}"
    if lr_scaling != "none":  # batch: train_gpt2.py's sequences per step, train_lstm.py's streams
        tokens = get("total_batch_size")
        batch = tokens / get("block_size") if tokens else get("micro_batch_size")
        factor = (batch / base_batch) ** (1.0 if lr_scaling == "linear" else 0.5)
        ov.update({k: f"{get(k) * factor:.4g}" for k in ("max_lr", "min_lr")})
    return ov


def run_name(parts):
    """A folder name from overrides (max_lr=1e-3_micro_batch_size=32); a long one ends in a hash."""
    name = re.sub(r"[^A-Za-z0-9_=.,+-]+", "-", "_".join(f"{k}={v}" for k, v in parts.items()))
    return name if len(name) <= 80 else name[:70] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]


def plan_grid(fixed, axes, defaults):
    """Every point of the axes (command-line order), times each ablation in --mode=ablations."""
    runs = []
    for variant, changes in (ABLATIONS if mode == "ablations" else {"": {}}).items():
        for point in itertools.product(*axes.values()):
            ax = dict(zip(axes, point, strict=True))
            name = "_".join(filter(None, [variant, run_name(ax)])) or "default"
            runs.append(dict(name=name, reason=None,
                             overrides=with_batch_and_lr({**fixed, **changes, **ax}, defaults)))
    return runs


def plan_random(fixed, defaults):
    """§3: draw configs until n_samples fit; max_steps = flop_budget // FLOPs per step."""
    cfg = {**defaults, **{k: utils.parse_value(k, v, defaults[k]) for k, v in fixed.items()}}
    if not cfg["vocab_size"]:  # as train_gpt2.py derives it from the data
        meta = data.read_meta(os.path.join(HERE, cfg["data_dir"]))
        cfg["vocab_size"] = data.model_vocab_size(meta)
    cfg = {k: cfg[k] for k in utils.fields_of(GPTConfig) if k in cfg}
    rng, runs, rope = random.Random(random_seed), [], cfg["pos_emb"] == "rope"

    def log_uniform(lo, hi):
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))

    def power_of_two(lo, hi):
        return 2 ** rng.randint(math.ceil(math.log2(lo)), math.floor(math.log2(hi)))
    for _ in range(100 * n_samples):  # a bound, for ranges that leave (almost) nothing
        if sum(r["reason"] is None for r in runs) == n_samples:
            break
        L = rng.randint(n_layer_lo, n_layer_hi)
        C = min(n_embd_hi, max(n_embd_lo, 16 * round(log_uniform(n_embd_lo, n_embd_hi) / 16)))
        heads = [h for h in range(n_head_lo, n_head_hi + 1)
                 if C % h == 0 and not (rope and C // h % 2)]  # fitting the width: no draw wasted
        H = rng.choice(heads) if heads else None
        B, T = power_of_two(batch_lo, batch_hi), power_of_two(seq_len_lo, seq_len_hi)
        lr = f"{log_uniform(min_lr_lo, min_lr_hi):.3g}"
        max_lr = f"{10 * float(lr):.3g}"
        micro = max(d for d in range(1, min(B, max_micro_batch or B) + 1) if B % d == 0)
        # named by what was drawn, the LR by its peak: the one users tune and compare with grids
        name = f"L{L}_H{H}_C{C}_B{B}_T{T}_max_lr={max_lr}"
        if any(r["name"] == name for r in runs):
            continue
        ov = dict(fixed, n_layer=str(L), n_head=str(H), n_embd=str(C), block_size=str(T),
                  micro_batch_size=str(micro), total_batch_size=str(B * T),
                  min_lr=lr, max_lr=max_lr)
        reason = None
        if H is None:
            reason = (f"no n_head in [{n_head_lo}, {n_head_hi}] divides n_embd {C}"
                      + " into even heads" * rope)
        else:
            try:
                config = GPTConfig(**dict(cfg, n_layer=L, n_head=H, n_embd=C, block_size=T))
            except ValueError as e:  # drawn values always fit: a fixed setting is wrong for all
                utils.bad_setting(str(e))
            with torch.device("meta"):  # shapes only: no memory, no init time
                model = GPT(config)
            params = model.num_params()
            steps = int(flop_budget // (model.flops_per_token() * B * T))
            ov.update(max_steps=str(steps), warmup_steps=str(steps // 10))
            if not min_params <= params <= max_params:
                reason = f"{params:,} params outside [{min_params:,}, {max_params:,}]"
            elif steps < 1:
                reason = f"flop_budget {flop_budget:g} buys no step of {B * T} tokens"
        runs.append(dict(name=name, overrides=ov, reason=reason))
    fit = sum(r["reason"] is None for r in runs)
    if fit < n_samples:
        print(f"warning: only {fit} of {n_samples} runs fit the ranges")
    return runs


# -----------------------------------------------------------------------------
# launching: one subprocess per run, `parallel` at a time; a failing run never stops the sweep


def read_json(path):
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        return json.load(f)


def read_events(run_dir):
    """log.jsonl's events; a half-written last line is skipped quietly (read_log would warn)."""
    events, path = [], os.path.join(run_dir, "log.jsonl")
    with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def classify(rc, run_dir):
    """finished | interrupted | diverged | oom | failed: the exit status, log.jsonl, stdout.log."""
    if rc == 0:
        return "finished"
    if rc in INTERRUPTED:
        return "interrupted"
    if rc == utils.EXIT_DIVERGED or any(e.get("event") == "diverged" for e in read_events(run_dir)):
        return "diverged"
    with open(os.path.join(run_dir, "stdout.log"), errors="replace") as f:
        tail = f.read()[-65536:].lower()  # a traceback is at the end
    return "oom" if "out of memory" in tail or "outofmemoryerror" in tail else "failed"


def left_alone(run):
    """The line to print if a process (a trainer's lock_folder) holds the run's .lock, else None."""
    with contextlib.suppress(FileNotFoundError), open(os.path.join(run["dir"], ".lock")) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = f.read().strip() or "unknown"
            return (f"{'running':>11} {run['name']} (PID {pid} holds its folder: left alone, "
                    f"rerun when it ends)")
        fcntl.flock(f, fcntl.LOCK_UN)  # at once: the trainer launched next must take it
    return None


class Trainers:
    """The running trainers, and the signal that stops the sweep: after one, none is launched."""

    def __init__(self):
        # reentrant: a second signal's handler may run while the first one's holds it
        self.lock, self.running, self.signum = threading.RLock(), set(), None

    def run(self, command, **popen_args):
        """The trainer's exit status, or None when the sweep is stopping. In a session of its own:
        a Ctrl-C in the terminal reaches it once, passed on by stop(), not also from the tty."""
        parent = os.getpid()

        def die_with_sweep():  # SIGTERM once the launching thread (which waits for it) ends
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the sweep's handler would swallow it
            PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the sweep died before prctl: no signal will come
                os.kill(os.getpid(), signal.SIGTERM)
        with self.lock:  # a signal between the check and the launch would miss this trainer
            if self.signum:
                return None
            proc = subprocess.Popen(command, start_new_session=True,
                                    preexec_fn=die_with_sweep if PRCTL else None, **popen_args)
            self.running.add(proc)
        rc = proc.wait()
        with self.lock:
            self.running.discard(proc)
        return rc

    def stop(self, signum, frame=None):
        """SIGINT's and SIGTERM's handler: the running trainers get the signal, no more start."""
        with self.lock:
            if self.signum is None:
                print(f"{signal.Signals(signum).name}: stopping {len(self.running)} running runs "
                      f"at their checkpoints; no more are launched", flush=True)
            self.signum = self.signum or signum
            for proc in self.running:
                proc.send_signal(signum)


def launch(run, gpu, trainers):
    run_dir, resume = run["dir"], run["resume"]
    if trainers.signum:  # the sweep is stopping
        return
    # a trainer may have started there while this run waited for a slot: all there is its own
    if busy := left_alone(run):
        print(busy, flush=True)
        return
    if not resume:  # a fresh start: no events or checkpoints of an earlier attempt
        for path in utils.checkpoint_paths(run_dir) + [os.path.join(run_dir, "log.jsonl")]:
            utils.remove_quietly(path)
    command = [sys.executable, os.path.join(HERE, script), f"--out_dir={run_dir}"]
    command += [f"--{k}={v}" for k, v in run["overrides"].items()] + ["--resume=True"] * resume
    # parallel runs share the cores (unless OMP_NUM_THREADS says otherwise), not each take them all
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel)), **os.environ,
           "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})}
    record = dict(name=run["name"], overrides=run["overrides"], command=command,
                  state="running", exit_code=None, runtime_s=None,
                  gpu=gpu, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    utils.atomic_write_json(os.path.join(run_dir, "run.json"), record)
    print(f"   launched {run['name']}" + f" on GPU {gpu}" * bool(gpu) + " (resumed)" * resume,
          flush=True)
    t0 = time.time()
    with open(os.path.join(run_dir, "stdout.log"), "a" if resume else "w") as out:
        try:  # rc None: the sweep stopped before it started
            rc = trainers.run(command, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT)
        except (OSError, subprocess.SubprocessError) as e:  # cannot start (or preexec_fn failed)
            out.write(f"sweep.py: cannot launch: {e}\n")
            rc = -1
    state = "interrupted" if rc is None else classify(rc, run_dir)
    if trainers.signum and state == "failed":  # told to stop, it did, whatever its exit says
        state = "interrupted"
    record.update(state=state, exit_code=rc,
                  runtime_s=round(time.time() - t0 + run["runtime_s"], 1))
    utils.atomic_write_json(os.path.join(run_dir, "run.json"), record)
    print(f"{state:>11} {run['name']} (exit {rc}, {record['runtime_s']:.0f} s)", flush=True)


def run_all(runs):
    """Launch the runs, `parallel` at a time; return the signal that stopped the sweep, or None."""
    gpu_list, slots = [g.strip() for g in gpus.split(",") if g.strip()], queue.Queue()
    for i in range(parallel):
        slots.put(gpu_list[i % len(gpu_list)] if gpu_list else None)
    trainers = Trainers()

    def work(run):
        gpu = slots.get()
        try:
            launch(run, gpu, trainers)
        finally:
            slots.put(gpu)
    # handlers run in this (the main) thread, which only waits here
    handlers = {s: signal.signal(s, trainers.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            for future in concurrent.futures.as_completed([pool.submit(work, r) for r in runs]):
                future.result()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return trainers.signum


# -----------------------------------------------------------------------------
# results: one table sorted by val loss (Markdown and CSV) and plots


def summarize(run_dir):
    """A table row from run.json and log.jsonl, with max_lr, batch and loss curve for the plots."""
    rec, events = read_json(os.path.join(run_dir, "run.json")), read_events(run_dir)
    start = next((e for e in events if e.get("event") == "start"), {})
    s = start.get("settings", {})
    curve = [(e["step"], e["train_loss"]) for e in events if "train_loss" in e]
    best = min((e["val_loss"] for e in events if "val_loss" in e and math.isfinite(e["val_loss"])),
               default=None)
    hellaswag = [e["hellaswag_acc_norm"] for e in events if e.get("hellaswag_acc_norm") is not None]
    bad = [e["step"] for e in events if e.get("event") == "diverged"]
    steps = max([st for st, _ in curve] + bad, default=-1) + 1  # the diverging step included
    # sequences per step: train_gpt2.py's tokens / block_size, train_lstm.py's streams x processes
    batch = s["total_batch_size"] // s["block_size"] if s.get("total_batch_size") else (
        s.get("micro_batch_size", 0) * start.get("world_size", 1))
    note = rec.get("reason") or (f"NaN/inf at step {bad[0]}" if bad else "") or (
        f"exit {rec['exit_code']}" if rec.get("exit_code") else "")
    return dict(run=rec["name"], overrides=rec["overrides"], params=start.get("params"),
                tokens=steps * batch * s.get("block_size", 0) or None, best_val_loss=best,
                val_ppl=math.exp(best) if best is not None and best < 700 else None,
                hellaswag_acc_norm=hellaswag[-1] if hellaswag else None,
                runtime_s=rec.get("runtime_s"), state=rec["state"], note=note,
                max_lr=s.get("max_lr"), batch=batch or None, curve=curve)


def report(folder):
    """results.md and results.csv (finished runs first, by best val loss) and the plots."""
    dirs = os.listdir(folder) if os.path.isdir(folder) else []
    dirs = sorted(d for d in dirs if os.path.isfile(os.path.join(folder, d, "run.json")))
    if not dirs:
        raise SystemExit(f"error: no runs found in {folder}")
    rows = sorted((summarize(os.path.join(folder, d)) for d in dirs), key=lambda r: (
        STATES.index(r["state"]), math.inf if r["best_val_loss"] is None else r["best_val_loss"],
        r["run"]))
    # the Markdown table shows the overrides that differ between runs (all if none do), the CSV all
    every = {k for r in rows for k in r["overrides"]}
    varying = {k for k in every if len({r["overrides"].get(k) for r in rows}) > 1} or every

    def cells(r, keys):
        shown = " ".join(f"{k}={v}" for k, v in r["overrides"].items() if k in keys)
        return {**r, "overrides": shown}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"] + [
        "| " + " | ".join("" if r[c] is None else f"{r[c]:{f}}".replace("|", "/")
                          for c, f in COLUMNS.items()) + " |"
        for r in (cells(r, varying) for r in rows)]
    utils.atomic_write(os.path.join(folder, "results.md"),
                       lambda f: f.write("\n".join(lines) + "\n"), mode="w")

    def write_csv(f):
        out = csv.DictWriter(f, list(COLUMNS), extrasaction="ignore", lineterminator="\n")
        out.writeheader()
        out.writerows(cells(r, every) for r in rows)
    utils.atomic_write(os.path.join(folder, "results.csv"), write_csv, mode="w")
    print("\n".join(lines) + f"\ntable: {folder}/results.md and results.csv; " + plot(folder, rows))


def plot(folder, rows):
    """Best val loss vs max LR (a line per batch size) and vs batch, and the train loss curves."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plots: matplotlib is not installed (pip install matplotlib)"
    done = [r for r in rows
            if r["state"] == "finished" and r["best_val_loss"] is not None and r["batch"]]
    by_batch = {f"batch {b}": [(r["max_lr"], r["best_val_loss"]) for r in done if r["batch"] == b]
                for b in sorted({r["batch"] for r in done})}
    # the batch plot has one line: LRs may be scaled
    figures = [("val_loss_vs_lr.png", "max LR", 10, by_batch),
               ("val_loss_vs_batch.png", "batch size", 2,
                {"": [(r["batch"], r["best_val_loss"]) for r in done]}),
               ("train_loss.png", "step", None,
                {f"{r['run']} ({r['state']})": r["curve"] for r in rows})]
    said = []
    for name, xlabel, log_base, series in figures:
        xs = {x for points in series.values() for x, _ in points}
        if len(xs) < 2:
            said.append(f"{name} skipped ({'one ' + xlabel if xs else 'nothing to draw'})")
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, points in series.items():
            ax.plot(*zip(*sorted(points), strict=True), marker="o" if len(points) < 50 else None,
                    label=label or None)
        if log_base:
            ax.set_xscale("log", base=log_base)
        ax.set(xlabel=xlabel, ylabel="best val loss" if log_base else "train loss",
               title=os.path.basename(os.path.normpath(folder)))
        ax.grid(alpha=0.3)
        if 0 < len(ax.get_legend_handles_labels()[1]) <= 20:
            ax.legend(fontsize=7)
        fig.tight_layout()
        utils.atomic_write(os.path.join(folder, name),
                           lambda f, fig=fig: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        said.append(name)
    return "plots: " + ", ".join(said)


# -----------------------------------------------------------------------------


def main(argv):
    if "--help" in argv or "-h" in argv:  # sweep.py's, not the trainer's: prints it and exits
        utils.apply_overrides(globals(), ["--help"], CHOICES)
    own, (pairs, files) = utils.settings_of(globals()), utils.split_args(argv)
    # refused, not passed on: the sweep could neither check the file's values (out_dir, the
    # random search's draws, the LR scaling and FLOP count read them) nor see them change on a rerun
    utils.require(not files, f"config file {next(iter(files), '')}: sweep.py takes none; give its "
                  f"settings as --name=value (a comma list is a grid axis)")
    utils.apply_overrides(globals(), [f"--{k}={v}" for k, v in pairs if k in own], CHOICES)
    passed = {k: v for k, v in pairs if k not in own}
    check_settings()
    folder = os.path.join(HERE, sweep_dir)  # an absolute sweep_dir stays as it is
    if report_only:
        return report(folder)
    defaults, fixed, axes = trainer_overrides(passed)
    runs = plan_random(fixed, defaults) if mode == "random" else plan_grid(fixed, axes, defaults)
    utils.require(len({r["name"] for r in runs}) == len(runs),
                  "two runs would share a folder: a value is repeated")
    data_dirs = {r["overrides"].get("data_dir", defaults.get("data_dir", ".")) for r in runs}
    for path in sorted({os.path.join(HERE, d) for d in data_dirs}):  # as the trainers resolve them
        if not os.path.isdir(path):
            print(f"warning: the data folder {path} does not exist: "
                  f"prepare it first, or set --data_dir")
    lock = None if dry_run else utils.lock_folder(folder, "sweep")
    todo, kept = [], []
    for run in runs:
        run["dir"] = os.path.join(folder, run["name"])
        old = (read_json(os.path.join(run["dir"], "run.json"))
               or {"state": "new", "overrides": run["overrides"]})
        changed = sorted({k for k, _ in old["overrides"].items() ^ run["overrides"].items()})
        utils.require(not changed, f"{run['dir']} was run with other values of {changed}: "
                      f"use another --sweep_dir")
        busy = left_alone(run)  # a trainer there (a killed sweep's, or by hand): touch none of it
        if dry_run:
            what = " ".join(f"--{k}={v}" for k, v in run["overrides"].items())
            status = f"skipped, {run['reason']}" if run["reason"] else what
            print(busy or f"{run['name']} ({old['state']}): " + status)
        elif busy:
            kept.append(busy)
        elif run["reason"]:
            utils.atomic_write_json(os.path.join(run["dir"], "run.json"),
                                    dict(name=run["name"], overrides=run["overrides"],
                                         state="skipped", reason=run["reason"]))
        elif old["state"] == "finished" or (old["state"] in RETRYABLE and not retry_failed):
            hint = " (--retry_failed=True relaunches it)" * (old["state"] != "finished")
            kept.append(f"{old['state']:>11} {run['name']}" + hint)
        else:
            # new, interrupted (resumed from its last checkpoint if it has one) or retried afresh
            run["resume"] = (old["state"] in ("running", "interrupted") and "resume" in defaults
                             and bool(utils.checkpoint_paths(run["dir"])))
            run["runtime_s"] = (old.get("runtime_s") or 0) if run["resume"] else 0
            os.makedirs(run["dir"], exist_ok=True)
            todo.append(run)
    if dry_run:
        return
    skipped = sum(r["reason"] is not None for r in runs)
    print("\n".join(kept + [f"{len(todo)} runs to launch, {len(kept)} kept from before, "
                            f"{skipped} skipped before launch"]), flush=True)
    signum = run_all(todo)
    report(folder)
    lock.close()
    if signum:  # a stopped sweep is no success: scripts and schedulers that run it must see so
        print(f"stopped by {signal.Signals(signum).name}: rerun the same command to continue "
              f"the sweep", flush=True)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main(sys.argv[1:])
