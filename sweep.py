"""Run a trainer once per point of a grid, of §2's ablation set, or of §3's FLOP-budgeted random search.

    python sweep.py --sweep_dir=sweeps/lr --max_lr=3e-4,1e-3,2e-3,3e-3 --micro_batch_size=128
    python sweep.py --mode=ablations --sweep_dir=sweeps/ablations --max_lr=1e-3,2e-3
    python sweep.py --mode=random --flop_budget=1e16 --n_samples=20 --sweep_dir=sweeps/search
    python sweep.py --report_only=True --sweep_dir=sweeps/lr     # only redraw the table and plots

An argument named like a setting below is the sweep's; every other --name=value goes to the trainer: a
comma list is a grid axis (so no value can hold a comma), a single value is passed to every run. Each run
has its own folder sweep_dir/<name>/ holding run.json (overrides, command, state, exit code, runtime),
stdout.log and the trainer's log.jsonl. A run ends finished, diverged (NaN stop), oom, failed (any other
non-zero exit) or interrupted (Ctrl-C); configs rejected before launch are recorded as skipped. Rerunning
the same command skips finished runs, relaunches interrupted ones (from their last checkpoint) and
relaunches failed, diverged and oom runs only with --retry_failed=True. One sweep.py at a time per sweep_dir.
"""
import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib.util
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
import time

import utils

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings (all overridable with --name=value)
script = "train_gpt2.py"      # trainer, relative to this folder (grids and ablations also run train_lstm.py)
sweep_dir = "sweeps/default"  # one folder per run inside; relative to this folder
mode = "grid"                 # grid | ablations (§2's named set, times the grid) | random (§3, train_gpt2.py)
parallel = 1                  # runs at a time
gpus = ""                     # e.g. "0,1,2,3": worker slot i runs with CUDA_VISIBLE_DEVICES=gpus[i % len]
lr_scaling = "none"           # none | linear | sqrt: max_lr and min_lr times (batch / base_batch) ** (1 | 0.5)
base_batch = 128              # batch (sequences per optimizer step) at which the given LRs are right
min_lr_ratio = 0.0            # > 0: each run's min_lr = min_lr_ratio x its max_lr (0.1 as in §1), after scaling
retry_failed = False          # relaunch failed, diverged and oom runs (finished runs are never rerun)
dry_run = False               # print the runs and their overrides; launch and write nothing
report_only = False           # only redraw results.md, results.csv and the plots of sweep_dir
flop_budget = None            # FLOPs per run. random: max_steps = budget // (flops_per_token x tokens per step);
                              # grid/ablations: passed to the trainer, which derives max_steps the same way
# random search (§3): max_lr = 10 x min_lr, warmup = 10% of the steps; each range is inclusive
n_samples = 20                # runs to launch; rejected draws are recorded as skipped and do not count
random_seed = 0               # the same seed draws the same runs, so a rerun continues the same search
batch_lo, batch_hi = 32, 512  # sequences per optimizer step, powers of two
seq_len_lo, seq_len_hi = 32, 512  # block_size in tokens, powers of two
n_embd_lo, n_embd_hi = 64, 512    # log-uniform, rounded to a multiple of 16
n_layer_lo, n_layer_hi = 2, 8     # uniform
n_head_lo, n_head_hi = 2, 8       # uniform; draws whose n_head does not divide n_embd are skipped
min_lr_lo, min_lr_hi = 1e-5, 1e-3  # min_lr, log-uniform
min_params, max_params = 0, 50_000_000  # parameters (num_params, embeddings included); others are skipped
max_micro_batch = 0           # sequences per forward pass at most, the rest by gradient accumulation; 0 = no cap

ABLATIONS = {  # EXPERIMENTS.md §2: each changes one switch of the modern baseline
    "baseline": {},
    "no_rmsnorm": {"norm": "none"},
    "post_norm": {"norm_pos": "post"},
    "no_rope": {"pos_emb": "none"},
    "silu_ffn": {"mlp": "silu"},
}
RETRYABLE = ("failed", "diverged", "oom")  # relaunched only with --retry_failed=True
INTERRUPTED = (-signal.SIGINT, -signal.SIGTERM, 130)  # exit statuses of a Ctrl-C'd or terminated run
STATES = ("finished", "diverged", "oom", "failed", "interrupted", "running", "skipped")  # table order
SET_BY_SWEEP = ("out_dir", "resume")
DRAWN = ("n_layer", "n_head", "n_embd", "block_size", "micro_batch_size", "total_batch_size", "min_lr", "max_lr",
         "warmup_steps", "max_steps")  # set per run by the random search
LR_KEYS = ("max_lr", "min_lr")  # scaled with the batch size


def bad_setting(message):
    """Exit 2, as utils.apply_overrides does for a bad --name=value."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# the command line: the sweep's own settings, the trainer's fixed overrides and its grid axes


def load_trainer(path):
    """The trainer's settings (defaults) and its diverged exit status; importing it runs nothing."""
    if not os.path.isfile(path):
        bad_setting(f"--script {path} does not exist")
    spec = importlib.util.spec_from_file_location("sweep_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = {k: v for k, v in utils.settings_of(vars(module)).items() if not k.isupper()}  # not HERE etc.
    return settings, getattr(module, "EXIT_DIVERGED", getattr(module, "_EXIT_DIVERGED", 3))


def parse_trainer_args(argv, defaults):
    """(fixed overrides, grid axes) as text, each value checked against the trainer's settings (exit 2)."""
    fixed, axes = {}, {}
    for arg in argv:
        name, _, text = arg.removeprefix("--").partition("=")
        if name not in defaults or name in SET_BY_SWEEP:
            bad_setting(f"{arg!r} is neither a sweep.py setting nor one of {script}'s"
                        f"{' (sweep.py sets it)' if name in SET_BY_SWEEP else ''}. Trainer settings:\n  "
                        + ", ".join(k for k in defaults if k not in SET_BY_SWEEP))
        values = [v.strip() for v in text.split(",")]
        for v in values:
            try:
                utils.parse_value(name, v, defaults[name])
            except ValueError as e:
                bad_setting(f"cannot parse {arg!r}: {e}")
        if len(values) > 1:
            axes[name] = values
        else:
            fixed[name] = text
    return fixed, axes


def run_name(parts):
    """A folder name from overrides, e.g. max_lr=1e-3_micro_batch_size=32; a long one ends in a hash."""
    name = re.sub(r"[^A-Za-z0-9_=.,+-]+", "-", "_".join(f"{k}={v}" for k, v in parts.items()))
    return name if len(name) <= 80 else name[:70] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]


def setting(name, overrides, defaults):
    return utils.parse_value(name, overrides[name], defaults[name]) if name in overrides else defaults.get(name)


def with_batch_and_lr(overrides, defaults, rule, base):
    """A batch-size point: micro_batch_size alone also sets total_batch_size (no accumulation), and with rule
    linear | sqrt the LRs are multiplied by (batch / base) ** (1 | 0.5), batch = sequences per step."""
    ov = dict(overrides)
    if "micro_batch_size" in ov and "total_batch_size" in defaults and "total_batch_size" not in ov:
        ov["total_batch_size"] = str(setting("micro_batch_size", ov, defaults) * setting("block_size", ov, defaults))
    if min_lr_ratio > 0:
        ov["min_lr"] = f"{setting('max_lr', ov, defaults) * min_lr_ratio:.4g}"
    if rule == "none":
        return ov
    if rule not in ("linear", "sqrt") or base <= 0:
        bad_setting(f"--lr_scaling must be none, linear or sqrt (got {rule!r}) with --base_batch > 0")
    if "total_batch_size" in defaults:  # train_gpt2.py: tokens per step / tokens per sequence
        batch = setting("total_batch_size", ov, defaults) / setting("block_size", ov, defaults)
    else:  # train_lstm.py: streams per step
        batch = setting("micro_batch_size", ov, defaults)
    factor = (batch / base) ** (1.0 if rule == "linear" else 0.5)
    for k in LR_KEYS:
        ov[k] = f"{setting(k, ov, defaults) * factor:.4g}"
    return ov


# -----------------------------------------------------------------------------
# the plan: a list of runs {name, overrides (name -> text), reason (why skipped) or None, info}


def plan_grid(fixed, axes, defaults, variants=None):
    """Every point of the axes (command-line order), times each named variant (ablation) when given."""
    runs = []
    for variant, changes in (variants or {"": {}}).items():
        for point in itertools.product(*axes.values()):
            ax = dict(zip(axes, point))
            name = "_".join(filter(None, [variant, run_name(ax)])) or "default"
            ov = with_batch_and_lr({**fixed, **changes, **ax}, defaults, lr_scaling, base_batch)
            runs.append(dict(name=name, overrides=ov, reason=None, info={}))
    return runs


def log_uniform(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def power_of_two(rng, lo, hi):
    return 2 ** rng.randint(math.ceil(math.log2(lo)), math.floor(math.log2(hi)))


def plan_random(fixed, defaults):
    """§3: draw configs until n_samples fit; max_steps = flop_budget // (flops_per_token x tokens per step)."""
    import torch
    import data
    from model import GPT, GPTConfig
    if [k for k in DRAWN if k not in defaults]:
        bad_setting(f"--mode=random draws GPT settings ({', '.join(DRAWN)}) that {script} does not have")
    if [k for k in DRAWN if k in fixed]:
        bad_setting(f"the random search draws {[k for k in DRAWN if k in fixed]}; set their ranges instead")
    cfg = {**defaults, **{k: utils.parse_value(k, v, defaults[k]) for k, v in fixed.items()}}
    if not cfg["vocab_size"]:  # as train_gpt2.py: the data's vocabulary rounded up to a multiple of 64
        meta = data.read_meta(os.path.join(HERE, cfg["data_dir"]))
        cfg["vocab_size"] = 64 * math.ceil(meta["vocab_size"] / 64) if meta else 50304
    cfg = {f.name: cfg[f.name] for f in dataclasses.fields(GPTConfig) if f.name in cfg}
    rng, runs, seen = random.Random(random_seed), [], set()
    for _ in range(100 * n_samples):  # a bound, for ranges that leave (almost) nothing
        if sum(r["reason"] is None for r in runs) == n_samples:
            break
        L, H = rng.randint(n_layer_lo, n_layer_hi), rng.randint(n_head_lo, n_head_hi)
        C = min(n_embd_hi, max(n_embd_lo, 16 * round(log_uniform(rng, n_embd_lo, n_embd_hi) / 16)))
        B, T = power_of_two(rng, batch_lo, batch_hi), power_of_two(rng, seq_len_lo, seq_len_hi)
        lr = f"{log_uniform(rng, min_lr_lo, min_lr_hi):.3g}"
        micro = max(d for d in range(1, min(B, max_micro_batch or B) + 1) if B % d == 0)
        name = f"L{L}_H{H}_C{C}_B{B}_T{T}_lr{lr}"
        if name in seen:
            continue
        seen.add(name)
        ov = dict(fixed, n_layer=str(L), n_head=str(H), n_embd=str(C), block_size=str(T), micro_batch_size=str(micro),
                  total_batch_size=str(B * T), min_lr=lr, max_lr=f"{10 * float(lr):.3g}")
        reason, info = None, {"flop_budget": flop_budget}
        try:
            config = GPTConfig(**{**cfg, "n_layer": L, "n_head": H, "n_embd": C, "block_size": T})
        except ValueError as e:  # n_head not dividing n_embd, an odd RoPE head size
            reason = f"n_head {H} does not divide n_embd {C}" if C % H else str(e)
        if reason is None:
            with torch.device("meta"):  # shapes only: no memory, no init time
                model = GPT(config)
            params, fpt = model.num_params(), model.flops_per_token()
            steps = int(flop_budget // (fpt * B * T))
            info.update(params=params, flops_per_token=fpt, max_steps=steps, tokens=steps * B * T)
            if not min_params <= params <= max_params:
                reason = f"{params:,} params outside [{min_params:,}, {max_params:,}]"
            elif steps < 1:
                reason = f"flop_budget {flop_budget:g} buys no step of {B * T} tokens"
            ov.update(max_steps=str(steps), warmup_steps=str(steps // 10))
        runs.append(dict(name=name, overrides=ov, reason=reason, info=info))
    if sum(r["reason"] is None for r in runs) < n_samples:
        print(f"warning: only {sum(r['reason'] is None for r in runs)} of {n_samples} runs fit the ranges")
    return runs


# -----------------------------------------------------------------------------
# launching: one subprocess per run, `parallel` at a time; a failing run never stops the sweep


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_events(run_dir):
    """The run's log.jsonl, without a last line cut short by a killed run."""
    events, path = [], os.path.join(run_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
    return events


def classify(rc, run_dir, exit_diverged=3):
    """finished | interrupted | diverged | oom | failed, from the exit status, log.jsonl and stdout.log."""
    if rc == 0:
        return "finished"
    if rc in INTERRUPTED:
        return "interrupted"
    if rc == exit_diverged or any(e.get("event") == "diverged" for e in read_events(run_dir)):
        return "diverged"
    path = os.path.join(run_dir, "stdout.log")
    if os.path.exists(path):
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 65536))  # the traceback is at the end
            tail = f.read().decode(errors="replace").lower()
        if "out of memory" in tail or "outofmemoryerror" in tail:
            return "oom"
    return "failed"


def launch(run, gpu, trainer_path, exit_diverged):
    run_dir, resume = run["dir"], run["resume"]
    if not resume:  # a fresh start: no events or checkpoints of an earlier attempt
        for path in utils.checkpoint_paths(run_dir) + [os.path.join(run_dir, "log.jsonl")]:
            if os.path.exists(path):
                os.remove(path)
    command = [sys.executable, trainer_path, f"--out_dir={run_dir}"]
    command += [f"--{k}={v}" for k, v in run["overrides"].items()] + (["--resume=True"] if resume else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {}))
    if "OMP_NUM_THREADS" not in os.environ:  # parallel runs share the cores instead of each taking all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, parallel)))
    record = dict(name=run["name"], overrides=run["overrides"], info=run["info"], command=command, state="running",
                  exit_code=None, runtime_s=None, gpu=gpu, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    utils.atomic_write_json(os.path.join(run_dir, "run.json"), record)
    print(f"   launched {run['name']}" + (f" on GPU {gpu}" if gpu else "") + (" (resumed)" * resume), flush=True)
    t0 = time.time()
    with open(os.path.join(run_dir, "stdout.log"), "a" if resume else "w") as out:
        try:
            rc = subprocess.run(command, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        except OSError as e:  # it could not even start: this run failed, the sweep goes on
            out.write(f"sweep.py: cannot launch: {e}\n")
            rc = -1
    record.update(state=classify(rc, run_dir, exit_diverged), exit_code=rc,
                  runtime_s=round(time.time() - t0 + run["runtime_s"], 1))
    utils.atomic_write_json(os.path.join(run_dir, "run.json"), record)
    print(f"{record['state']:>11} {run['name']} (exit {rc}, {record['runtime_s']:.0f} s)", flush=True)


def run_all(runs, trainer_path, exit_diverged):
    """Launch the runs, `parallel` at a time; worker slot i always uses GPU gpus[i % len(gpus)]."""
    slots = queue.Queue()
    for i in range(parallel):
        slots.put(i)
    gpu_list = [g.strip() for g in gpus.split(",") if g.strip()]

    def work(run):
        slot = slots.get()
        try:
            launch(run, gpu_list[slot % len(gpu_list)] if gpu_list else None, trainer_path, exit_diverged)
        finally:
            slots.put(slot)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
    try:
        for future in concurrent.futures.as_completed([pool.submit(work, run) for run in runs]):
            future.result()
    except KeyboardInterrupt:  # the running runs got the Ctrl-C too; launch no more
        print("interrupted: rerun the same command to continue the sweep")
    pool.shutdown(wait=True, cancel_futures=True)


# -----------------------------------------------------------------------------
# results: one table sorted by val loss (Markdown and CSV) and plots

COLUMNS = ("run", "overrides", "params", "tokens", "best_val_loss", "val_ppl", "hellaswag_acc_norm", "runtime_s",
           "state", "note")


def summarize(run_dir):
    """One table row (plus max_lr, batch and the train loss curve, for the plots) from run.json and log.jsonl."""
    rec, events = read_json(os.path.join(run_dir, "run.json")), read_events(run_dir)
    start = next((e for e in events if e.get("event") == "start"), {})
    s = start.get("settings", {})
    curve = [(e["step"], e["train_loss"]) for e in events if "train_loss" in e]
    vals = [e["val_loss"] for e in events if "val_loss" in e and math.isfinite(e["val_loss"])]
    hellaswag = [e["hellaswag_acc_norm"] for e in events if e.get("hellaswag_acc_norm") is not None]
    bad = [e["step"] for e in events if e.get("event") == "diverged"]
    steps = max([st + 1 for st, _ in curve] + [b + 1 for b in bad] + [0])  # steps run, the diverging one included
    # tokens per step: train_gpt2.py's total_batch_size, or train_lstm.py's streams x block_size x processes
    step_tokens = s.get("total_batch_size") or s.get("micro_batch_size", 0) * s.get("block_size", 0) * start.get(
        "world_size", 1)
    best = min(vals) if vals else None
    note = rec.get("reason") or (f"NaN/inf at step {bad[0]}" if bad else "") or (
        f"exit {rec['exit_code']}" if rec.get("exit_code") else "")
    params = start.get("params", rec.get("info", {}).get("params"))  # skipped runs: from the plan
    return dict(run=rec["name"], overrides=rec["overrides"], params=params, tokens=steps * step_tokens or None,
                best_val_loss=best, val_ppl=math.exp(best) if best is not None and best < 700 else None,
                hellaswag_acc_norm=hellaswag[-1] if hellaswag else None, runtime_s=rec.get("runtime_s"),
                state=rec["state"], note=note, max_lr=s.get("max_lr"),
                batch=step_tokens // s["block_size"] if step_tokens else None, curve=curve)


def cell(row, column, varying):
    v = row[column]
    if column == "overrides":  # the table shows what differs between runs; run.json and the CSV have all
        return " ".join(f"{k}={x}" for k, x in v.items() if k in varying or not varying)
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.0f}" if column == "runtime_s" else f"{v:.4f}" if column != "val_ppl" else f"{v:.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def report(folder):
    """results.md, results.csv and plots from every run folder in the sweep folder; returns the rows."""
    dirs = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "run.json")))
    rows = [summarize(os.path.join(folder, d)) for d in dirs]
    rows.sort(key=lambda r: (STATES.index(r["state"]) if r["state"] in STATES else len(STATES),
                             r["best_val_loss"] if r["best_val_loss"] is not None else math.inf, r["run"]))
    keys = {k for r in rows for k in r["overrides"]}
    varying = {k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c, varying).replace("|", "/") for c in COLUMNS) + " |" for r in rows]
    utils.atomic_write(os.path.join(folder, "results.md"), lambda f: f.write("\n".join(lines) + "\n"), mode="w")

    def write_csv(f):
        out = csv.writer(f, lineterminator="\n")
        out.writerow(COLUMNS)
        out.writerows([cell(r, c, set()) if c == "overrides" else r[c] for c in COLUMNS] for r in rows)
    utils.atomic_write(os.path.join(folder, "results.csv"), write_csv, mode="w")
    print("\n".join(lines) + f"\ntable: {folder}/results.md and results.csv; " + plot(folder, rows))
    return rows


def plot(folder, rows):
    """Best val loss vs max LR (a line per batch size) and vs batch size; every train loss curve in one figure."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plots: matplotlib is not installed (pip install matplotlib)"
    done = [r for r in rows if r["state"] == "finished" and r["best_val_loss"] is not None and r["max_lr"]]
    by_batch = {f"batch {b}": [(r["max_lr"], r["best_val_loss"]) for r in done if r["batch"] == b]
                for b in sorted({r["batch"] for r in done})}
    figures = [("val_loss_vs_lr.png", "max LR", "best val loss", by_batch),
               ("val_loss_vs_batch.png", "batch (sequences per step)", "best val loss",  # one line: LRs may be scaled
                {"": [(r["batch"], r["best_val_loss"]) for r in done]}),
               ("train_loss.png", "step", "train loss", {f"{r['run']} ({r['state']})": r["curve"] for r in rows})]
    for name, xlabel, ylabel, series in figures:
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, points in series.items():
            if points:
                ax.plot(*zip(*sorted(points)), marker="o" if len(points) < 50 else None, label=label or None)
        if name != "train_loss.png" and done:
            ax.set_xscale("log", base=10 if name == "val_loss_vs_lr.png" else 2)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=os.path.basename(os.path.normpath(folder)))
        ax.grid(alpha=0.3)
        if 0 < len(ax.get_legend_handles_labels()[1]) <= 20:
            ax.legend(fontsize=7)
        fig.tight_layout()
        utils.atomic_write(os.path.join(folder, name), lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
    return "plots: " + ", ".join(f[0] for f in figures)


# -----------------------------------------------------------------------------


def main(argv):
    own = list(utils.settings_of(globals()))
    if "--help" in argv or "-h" in argv:
        utils.apply_overrides(globals(), ["--help"])  # prints the docstring and the settings, exits 0
    bad = [a for a in argv if not a.startswith("--") or "=" not in a]
    if bad:
        bad_setting(f"{bad} are not --name=value")
    mine = [a for a in argv if a[2:].partition("=")[0] in own]
    utils.apply_overrides(globals(), mine)
    folder = os.path.join(HERE, sweep_dir)  # an absolute sweep_dir stays as it is
    if report_only:
        if not os.path.isdir(folder):
            bad_setting(f"--sweep_dir {folder} does not exist")
        report(folder)
        return
    if mode not in ("grid", "ablations", "random") or parallel < 1:
        bad_setting(f"--mode must be grid, ablations or random (got {mode!r}) and --parallel >= 1")
    trainer_path = os.path.join(HERE, script)
    defaults, exit_diverged = load_trainer(trainer_path)
    fixed, axes = parse_trainer_args([a for a in argv if a not in mine], defaults)
    if mode == "random":
        if axes or not flop_budget:
            bad_setting(f"--mode=random needs --flop_budget and takes no grid axes (got {list(axes)})")
        runs = plan_random(fixed, defaults)
    else:
        if flop_budget:
            fixed["flop_budget"] = f"{flop_budget:g}"
        runs = plan_grid(fixed, axes, defaults, ABLATIONS if mode == "ablations" else None)

    todo, kept = [], []
    if len({r["name"] for r in runs}) < len(runs):
        bad_setting("two runs would share a folder: is a value repeated in a comma list?")
    for run in runs:
        run["dir"] = os.path.join(folder, run["name"])
        path = os.path.join(run["dir"], "run.json")
        old = read_json(path) if os.path.exists(path) else None
        if old and old["overrides"] != run["overrides"]:
            then, now = old["overrides"], run["overrides"]
            diff = {k: (then.get(k), now.get(k)) for k in {**then, **now} if then.get(k) != now.get(k)}
            bad_setting(f"{path} was run with other overrides (then, now: {diff}); use another --sweep_dir")
        if dry_run:
            what = " ".join(f"--{k}={v}" for k, v in run["overrides"].items())
            what = f"skipped, {run['reason']}" if run["reason"] else what
            print(f"{run['name']} ({old['state'] if old else 'new'}): {what}")
        elif run["reason"]:
            utils.atomic_write_json(path, dict(name=run["name"], overrides=run["overrides"], info=run["info"],
                                               state="skipped", reason=run["reason"], exit_code=None, runtime_s=None))
        elif old and (old["state"] == "finished" or (old["state"] in RETRYABLE and not retry_failed)):
            kept.append(f"{old['state']:>11} {run['name']}" + ("" if old["state"] == "finished" else
                                                                 " (--retry_failed=True relaunches it)"))
        else:  # new, interrupted (continues from its last checkpoint if it has one), or retried from scratch
            interrupted = old is not None and old["state"] in ("running", "interrupted")
            run["resume"] = interrupted and "resume" in defaults and bool(utils.checkpoint_paths(run["dir"]))
            run["runtime_s"] = (old.get("runtime_s") or 0) if run["resume"] else 0
            os.makedirs(run["dir"], exist_ok=True)
            todo.append(run)
    if dry_run:
        return
    print("\n".join(kept + [f"{len(todo)} runs to launch, {len(kept)} kept from before, "
                            f"{sum(r['reason'] is not None for r in runs)} skipped before launch"]), flush=True)
    run_all(todo, trainer_path, exit_diverged)
    if os.path.isdir(folder):
        report(folder)


if __name__ == "__main__":
    main(sys.argv[1:])
