"""Small pieces every script of the repo shares: settings overrides, atomic writes, run header.

Kept deliberately tiny; anything specific to one job lives in that job's script.
"""
import json
import math
import os
import subprocess
import sys
import tempfile

# -----------------------------------------------------------------------------
# settings: plain constants at the top of a script, overridden by --name=value

SETTING_TYPES = (bool, int, float, str, type(None))


def settings_of(namespace):
    """The settings of a script: its lowercase module-level constants of a plain type, in order.

    UPPERCASE constants (paths, exit codes) and _private names are fixed facts, not settings."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k == k.lower() and type(v) in SETTING_TYPES}


def parse_value(name, text, current):
    """Parse `text` to the type of the current value of setting `name` (no eval, no exec)."""
    if text == "None":  # Python's spelling only: --norm=none is the string "none"
        return None
    lowered = text.strip().lower()
    kind = type(current)
    if kind is bool:
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} wants a bool (True/False), got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)  # accept 1e6 and 5.0 for integer settings, but not 2.5
            except ValueError:
                raise ValueError(f"--{name} wants an integer, got {text!r}") from None
            if not number.is_integer():
                raise ValueError(f"--{name} wants an integer, got {text!r}") from None
            return int(number)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--{name} wants a number, got {text!r}") from None
    if kind is type(None):  # a setting that defaults to None takes an int, a float or a string
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return text


def apply_overrides(namespace, argv):
    """Apply `--name=value` arguments to the settings in `namespace` (a script's globals()).

    Unknown names and unparsable values exit with status 2 and list the valid names.
    Returns the dict of all settings after overriding, for logging and checkpoints.
    """
    settings = settings_of(namespace)
    if any(arg in ("--help", "-h") for arg in argv):  # the script's docstring, then every setting and its default
        print((namespace.get("__doc__") or "").strip() + "\n\nsettings (--name=value):\n  "
              + "\n  ".join(f"{k} = {v!r}" for k, v in settings.items()))
        sys.exit(0)
    for arg in argv:
        name, sep, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep or name not in settings:
            print(f"error: unknown setting {arg!r}. Use --name=value with one of:\n  "
                  + "\n  ".join(f"{k} = {v!r}" for k, v in settings.items()), file=sys.stderr)
            sys.exit(2)
        try:
            value = parse_value(name, text, settings[name])
        except ValueError as e:
            print(f"error: cannot parse {arg!r}: {e}. Valid settings: {', '.join(settings)}", file=sys.stderr)
            sys.exit(2)
        namespace[name] = settings[name] = value
    return settings


# -----------------------------------------------------------------------------
# atomic writes: an interrupted run never leaves a half-written file under the final name


UMASK = os.umask(0o022)  # reading the umask means setting it: put it straight back
os.umask(UMASK)


def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(file) on a temporary file in the same folder, fsync it, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_" + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files: give the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


# -----------------------------------------------------------------------------
# a run describes itself: versions, device and git commit at the top of its log


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_header(device):
    import numpy
    import torch
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else str(device)
    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
            "device": name, "git_commit": git_commit(), "argv": sys.argv}


# -----------------------------------------------------------------------------
# devices, precision and processes: one code path for CPU/GPU and one/many processes


def pick_device(device=""):
    """The requested device, or the best available one: cuda, then mps, then cpu."""
    import torch
    if device:
        try:
            kind = torch.device(device).type
        except RuntimeError as e:
            raise SystemExit(f"error: --device={device} is not a device torch knows ({e})") from None
        available = {"cuda": torch.cuda.is_available, "mps": lambda: torch.backends.mps.is_available()}
        if kind in available and not available[kind]():
            raise SystemExit(f"error: --device={device}, but this torch ({torch.__version__}) sees no {kind} device")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype, device_type):
    """'' = bfloat16 on GPUs that have it, float16 on GPUs that don't, float32 on CPU."""
    import torch
    if dtype:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise SystemExit(f"error: --dtype must be float32, bfloat16 or float16, got {dtype!r}")
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if device_type == "mps" else "float32"


def autocast_context(device_type, dtype):
    """Mixed precision for the forward pass; a no-op in float32. Takes a device *type* ('cuda')."""
    import contextlib
    import torch
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def setup_distributed(device):
    """Read torchrun's environment. Returns (rank, local_rank, world_size, device).

    Without torchrun this is rank 0 of 1 and nothing is initialised. With it: NCCL on CUDA (one GPU
    per local rank), gloo elsewhere.
    """
    import torch
    import torch.distributed as dist
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device))
    else:
        dist.init_process_group(backend="gloo")
    return rank, local_rank, world_size, device


def finish_distributed():
    """Wait for every rank (rank 0 may still be writing a checkpoint), then tear the group down.
    Without the barrier a rank that leaves early can abort gloo's teardown on the others."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sum over ranks in place (a no-op in one process). ReduceOp.AVG does not exist on gloo."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def track_nonfinite(first_bad_step, loss, step):
    """first_bad_step (a device tensor, -1 = none yet) set to `step` if `loss` is NaN/inf: no host sync."""
    import torch
    bad = (first_bad_step < 0) & ~torch.isfinite(loss.detach())
    return torch.where(bad, torch.full_like(first_bad_step, step), first_bad_step)


def diverged_at(first_bad_step, step):
    """This rank's first non-finite step (`step` if only another rank saw one), or None if no rank did.
    A host sync and an all-reduce: call it only where a log line or a checkpoint needs one anyway."""
    if all_reduce_sum((first_bad_step >= 0).float()).item() == 0:
        return None
    mine = int(first_bad_step.item())
    return mine if mine >= 0 else step


# -----------------------------------------------------------------------------
# learning rate: linear warmup, then cosine to min_lr (EXPERIMENTS.md §3) or warmup-stable-decay


LR_SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step, max_lr, min_lr, warmup_steps, max_steps, schedule="cosine", decay_steps=0):
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
    if schedule == "constant":
        return max_lr
    raise SystemExit(f"error: --lr_schedule must be cosine, wsd or constant, got {schedule!r}")


# -----------------------------------------------------------------------------
# checkpoints: ckpt_{step:06d}.pt in out_dir, written atomically, the newest `keep` kept


def checkpoint_paths(out_dir):
    import glob
    return sorted(glob.glob(os.path.join(out_dir, "ckpt_[0-9]*.pt")))


def latest_checkpoint(out_dir):
    paths = checkpoint_paths(out_dir)
    return paths[-1] if paths else None


def save_checkpoint(out_dir, step, payload, keep=3):
    """torch.save to a temporary file, fsync, rename; then delete all but the newest `keep`."""
    import torch
    path = os.path.join(out_dir, f"ckpt_{step:06d}.pt")
    atomic_write(path, lambda f: torch.save(payload, f))
    if keep > 0:
        for old in checkpoint_paths(out_dir)[:-keep]:
            os.remove(old)
    return path


def load_checkpoint(path, map_location="cpu"):
    """Load with weights_only=True: tensors and plain containers only, no pickled code runs."""
    import torch
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one, not a pickle traceback
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise SystemExit(f"error: cannot read checkpoint {path} ({type(e).__name__}: {first_line}); is it a "
                         f"checkpoint of this repo, complete, and not from an untrusted source?") from None


# -----------------------------------------------------------------------------
# the run log: out_dir/log.jsonl, one JSON object per event, and a plot drawn from it


class JsonlLog:
    """Appends one JSON object per line; only the process that owns the log writes (rank 0)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, **fields):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(fields) + "\n")


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_log(log_path, png_path, keys=("train_loss", "val_loss", "hellaswag_acc_norm")):
    """Train/val loss (and HellaSwag, on a second axis) against step. Needs matplotlib; returns
    png_path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    events = read_log(log_path)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax2 = None
    for key in keys:
        points = [(e["step"], e[key]) for e in events if e.get(key) is not None and "step" in e]
        if not points:
            continue
        steps, values = zip(*points)
        if key.startswith("hellaswag"):
            ax2 = ax2 or ax.twinx()
            ax2.plot(steps, values, "g.-", label=key)
            ax2.set_ylabel("HellaSwag acc_norm")
        else:
            ax.plot(steps, values, label=key, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    if ax2 is not None:
        extra = ax2.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
    ax.legend(*handles)
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return png_path


def truncate_log(path, before_step):
    """Keep only the events of steps before `before_step` (on resume, the rest is logged again)."""
    if os.path.exists(path):
        kept = [e for e in read_log(path) if e.get("step", -1) < before_step]
        atomic_write(path, lambda f: f.writelines(json.dumps(e) + "\n" for e in kept), mode="w")
