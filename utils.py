"""Plumbing every script shares: settings (constants, config files, --name=value), paths, atomic
writes and folder locks, devices and processes, checkpoint files, the log. A training run's
lifecycle (resume, saving, signals, the NaN watch) is training.py's."""
import ast
import contextlib
import dataclasses
import difflib
import fcntl
import glob
import inspect
import json
import os
import re
import shlex
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist

EXIT_BAD_SETTING = 2  # a run refused for a bad setting, before any work
EXIT_DIVERGED = 3  # a training run stopped by a NaN/inf loss or gradient (sweep.py reads it)
REPO = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# paths, one rule in every script: folders a setting names (data_dir, out_dir, ...) are relative to
# the repo folder; files you name (--checkpoint, --text_file, a config file) are read as given.


def in_repo(folder):
    return os.path.join(REPO, os.path.expanduser(folder))  # an absolute folder stays as it is


def repo_relative(folder):
    """A folder as a setting takes it (shell-quoted; relative to the repo folder when inside it)."""
    relative = os.path.relpath(folder, REPO)
    return shlex.quote(folder if relative.split(os.sep)[0] == ".." else relative)


# -----------------------------------------------------------------------------
# settings: plain constants at the top of a script, overridden by --name=value (or --name value)

SETTING_TYPES = (bool, int, float, str, type(None))


def run_script(main):
    """main(argv), quiet when stdout is a pipe that closes (`| head`): Python's recipe."""
    try:
        try:
            main(sys.argv[1:])
        finally:  # flush now, while a closed pipe can still be caught
            sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def bad_setting(message):
    """Exit 2 with `error: message`: a setting that cannot work. Under torchrun every rank exits and
    only rank 0 says why: one line, not one per GPU."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_SETTING)


def require(ok, message):
    if not ok:
        bad_setting(message)


def unknown_setting(name, settings, where=None):
    """Exit 2: `name` is no setting (of the command line, or of a config file at `where`)."""
    dash, close = "" if where else "--", difflib.get_close_matches(name, settings, n=1)
    bad_setting((f"{where}: " if where else "") + f"unknown setting {dash}{name}"
                + (f" (did you mean {dash}{close[0]}?)" if close else "")
                + ("" if where else f". Settings: {', '.join(settings)} (--help explains each)"))


FIELD_COMMENTS = {}  # setting name -> the comment of the dataclass field it comes from (--help)


def fields_of(config_class):
    """{field: default} of a config dataclass whose every field is a setting (GPTConfig's in
    train_gpt2.py and bench.py), their comments kept for --help."""
    source = inspect.getsource(config_class).splitlines()
    FIELD_COMMENTS.update({m.group(1): m.group(2).strip() for m in
                           (re.match(r"^\s+(\w+)\s*:.*?#\s*(.*)$", line) for line in source) if m})
    return {f.name: f.default for f in dataclasses.fields(config_class)}


def settings_of(namespace):
    """A script's lowercase module constants of a plain type, in order (UPPERCASE: not settings)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k == k.lower() and type(v) in SETTING_TYPES}


def parse_value(name, text, current):
    """Parse `text` to the type of the current value of setting `name` (no eval, no exec)."""
    if text == "None":  # Python's spelling only: --norm=none is the string "none"
        return None
    kind, lowered = type(current), text.strip().lower()
    if kind is bool and lowered in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return lowered in ("1", "true", "yes", "on")
    if kind in (int, float, type(None)):  # None: a setting that takes an int, a float or a string
        with contextlib.suppress(ValueError):
            return int(text) if kind is not float else float(text)
        with contextlib.suppress(ValueError):
            number = float(text)  # 1e6 and 5.0 are integers, 2.5 is not
            if kind is not int or number.is_integer():
                return int(number) if kind is int else number
    if kind is str or kind is type(None):
        return text
    raise ValueError(f"--{name} wants " + {bool: "a bool (True/False)", int: "an integer",
                                           float: "a number"}[kind] + f", got {text!r}")


def coerce(name, value, current):
    """A config file's literal as the setting's type: 1 is 1.0 for a float, 5e3 is 5000 for an int."""
    kind, given = type(current), type(value)
    if value is None or kind is type(None) or given is kind:
        return value
    if kind is float and given is int:
        return float(value)
    if kind is int and given is float and value.is_integer():
        return int(value)
    raise ValueError(f"{name} wants {kind.__name__ if kind is not bool else 'a bool'}, "
                     f"got {value!r}")


def read_config(path, settings):
    """{name: value} of a config file: `name = literal` lines (and comments, a docstring), read with
    ast, never run; anything else exits 2 naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        hint = (f" (the repo has {os.path.join(REPO, path)}: give that path)"
                if not os.path.isabs(path) and os.path.isfile(os.path.join(REPO, path)) else "")
        bad_setting(f"config file {path}: {getattr(e, 'strerror', None) or e}{hint}")
    try:
        tree = ast.parse(source, path)
    except SyntaxError as e:
        bad_setting(f"{path}:{e.lineno}: not Python syntax ({e.msg})")
    values = {}
    for k, node in enumerate(tree.body):
        if k == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        where, text = f"{path}:{node.lineno}", ast.get_source_segment(source, node)
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            bad_setting(f"{where}: {text!r}: a config file holds only `name = value` lines "
                        f"(it is read, never run)")
        name = node.targets[0].id
        if name not in settings:
            unknown_setting(name, settings, where)
        try:
            value = ast.literal_eval(node.value)
            if type(value) not in SETTING_TYPES:
                raise ValueError
        except ValueError:
            bad_setting(f"{where}: {text!r}: the value must be a literal number, string, "
                        f"True/False or None (a config file is read, never run)")
        try:
            values[name] = coerce(name, value, settings[name])
        except ValueError as e:
            bad_setting(f"{where}: {e}")
    return values


def split_args(argv):
    """([(name, text)] of --name=value and --name value, [config files: arguments ending in .py])."""
    pairs, files, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.endswith(".py") and not arg.startswith("--"):
            files.append(arg)
            i += 1
            continue
        if not arg.startswith("--") or arg == "--":
            bad_setting(f"unexpected argument {arg!r}: settings are given as --name=value, "
                        f"config files as path/to/file.py")
        name, sep, text = arg[2:].partition("=")
        if not sep:  # --name value
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                bad_setting(f"--{name} has no value: use --{name}=value")
            text, i = argv[i + 1], i + 1
        pairs.append((name, text))
        i += 1
    return pairs, files


def given_settings(argv, settings=None):
    """The settings a command line gives (a resumed run takes the others from its checkpoint)."""
    pairs, files = split_args(argv)
    from_files = {n for f in files for n in read_config(f, settings)} if settings else set()
    return {name for name, _ in pairs} | from_files


def usage(namespace, settings, choices):
    """The script's docstring, then every setting with its default, its comment (from the source)
    and its allowed values."""
    with open(namespace["__file__"], encoding="utf-8") as f:
        found = [re.match(r"^([a-z_][a-z0-9_]*)\s*=.*?#\s*(.*)$", line) for line in f]
    comments, lines = {**FIELD_COMMENTS, **{m.group(1): m.group(2).strip() for m in found if m}}, []
    for name, value in settings.items():
        note = comments.get(name, "")
        if name in choices and not all(str(c) in note for c in choices[name] if c):
            note = f"one of {' | '.join(map(repr, choices[name]))}" + (f"; {note}" if note else "")
        lines.append(f"  --{name}={value!r}" + (f"  # {note}" if note else ""))
    doc = (namespace.get("__doc__") or "").strip()
    return (f"{doc}\n\nsettings (config files first, then --name=value or --name value; "
            f"defaults shown):\n" + "\n".join(lines))


def apply_overrides(namespace, argv, choices=None):
    """Config files (arguments ending in .py), then --name=value, into the settings in `namespace` (a
    script's globals()); returns them all. Values take the constant's type and `choices`
    ({name: allowed}); anything else exits 2 naming it. --help prints every setting; --help=json the
    settings and choices as JSON (sweep.py reads a trainer's so)."""
    settings, choices = settings_of(namespace), choices or {}
    as_json = "--help=json" in argv
    argv = [arg for arg in argv if arg != "--help=json"]
    if any(arg in ("--help", "-h") for arg in argv):
        print(usage(namespace, settings, choices))
        sys.exit(0)
    pairs, files = split_args(argv)
    given = [(f"{path}: {name} = {value!r}", name, value)
             for path in files for name, value in read_config(path, settings).items()]
    for name, text in pairs:
        if name not in settings:
            unknown_setting(name, settings)
        try:
            given.append((f"--{name}={text}", name, parse_value(name, text, settings[name])))
        except ValueError as e:
            bad_setting(f"cannot parse --{name}={text}: {e}")
    for where, name, value in given:
        if name in choices and value not in choices[name]:
            bad_setting(f"{where}: allowed values are {', '.join(map(str, choices[name]))}")
        namespace[name] = settings[name] = value
    if as_json:  # the settings as config files and --name=value leave them, and the choices
        print(json.dumps({"settings": settings, "choices": {k: list(v) for k, v in choices.items()}}))
        sys.exit(0)
    return settings


# -----------------------------------------------------------------------------
# files: atomic writes, one run per folder

UMASK = os.umask(0o022)  # reading the umask means setting it: put it straight back
os.umask(UMASK)


def atomic_write(path, write_fn, mode="wb"):
    """write_fn(file) on a temporary file beside `path`, fsync, rename. A failed write (full disk, ...)
    exits 1 naming path and cause, and leaves the file at `path` as it was."""
    folder, tmp = os.path.dirname(os.path.abspath(path)), None
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=folder,
                                   prefix=f".tmp_{os.path.basename(path)}.{os.getpid()}.")
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600 files: give the usual permissions of a new file
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise SystemExit(f"error: cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        remove_quietly(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def remove_quietly(path):
    if path is not None and os.path.exists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


def remove_stale_temporaries(path):
    """Delete the .tmp_<name>.<pid>.<random> files of `path` (of any file, if `path` is a folder)
    whose writer is gone: a checkpoint write killed half-way leaves 1.5 GB at 124M."""
    folder, name = (path, None) if os.path.isdir(path) else os.path.split(os.path.abspath(path))
    prefix = ".tmp_" + (glob.escape(name) + "." if name else "")
    for tmp in glob.glob(os.path.join(glob.escape(folder), prefix + "*")):
        pid = os.path.basename(tmp).split(".")[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            remove_quietly(tmp)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def lock_folder(folder, what="run"):
    """An exclusive lock on `folder` while the returned file is open (flock on folder/.lock: the OS
    releases it when the process ends, kill -9 included). A second process: exit 1 naming the PID."""
    path = os.path.join(folder, ".lock")
    # the first write into the folder: a folder that cannot be written is one line, not a traceback
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(path, "a+")
    except OSError as e:
        raise SystemExit(f"error: cannot write {folder}: {e.strerror or e}") from None
    take_lock(handle, lambda pid: f"{folder} is in use by another {what} (PID {pid}): one {what} "
                                  f"per folder. Wait for it, stop it, or choose another folder")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def take_lock(handle, in_use):
    """flock the open lock file, or exit 1 with in_use(the PID the file names)."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SystemExit(f"error: {in_use(holder)}") from None


def run_header(device):
    """Versions, the device's name and the command line: the top of a run's log."""
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else str(device)
    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "device": name, "argv": sys.argv}


# -----------------------------------------------------------------------------
# devices, precision and processes: one code path for CPU/GPU and one/many processes

DTYPES = ("", "float32", "bfloat16", "float16")


def pick_device(device=""):
    """The requested device, or the best available one: cuda, then mps, then cpu."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not device:
        return next((kind for kind, present in available.items() if present), "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        bad_setting(f"--device={device} is not a device torch knows ({e})")
    require(available.get(kind, True),
            f"--device={device}, but this torch ({torch.__version__}) sees no {kind} device")
    return device


def pick_dtype(dtype, device_type):
    """'' = bfloat16 on GPUs with native bf16 (Ampere on), float16 + GradScaler on older ones (their
    bf16 is emulated, slowly), bfloat16 on MPS, float32 on CPU."""
    if dtype:
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return "bfloat16" if device_type == "mps" else "float32"


def autocast_context(device_type, dtype):
    """Mixed precision for the forward pass; a no-op in float32. Takes a device *type* ('cuda')."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def setup_distributed(device):
    """(rank, local_rank, world_size, device) from torchrun's environment: NCCL on CUDA (one GPU per
    local rank), gloo elsewhere. Without torchrun: rank 0 of 1, nothing initialised."""
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size, per_node = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count()
    require(not device.startswith("cuda") or per_node <= gpus,
            f"torchrun --nproc_per_node={per_node}, but this machine has {gpus} "
            f"GPU{'s' * (gpus != 1)}: one process per GPU")
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device))
    else:
        dist.init_process_group(backend="gloo")
    return rank, local_rank, world_size, device


def finish_distributed():
    """Wait for every rank (rank 0 may still be writing a checkpoint), then tear the group down:
    a rank that leaves early can abort gloo's teardown on the others."""
    if world_size() > 1:
        dist.barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if world_size() > 1:
        dist.barrier()


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in one process)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(tensor):
    """Sum over ranks in place (a no-op in one process). ReduceOp.AVG does not exist on gloo."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# -----------------------------------------------------------------------------
# checkpoint files: ckpt_{step:06d}.pt in a run's folder (training.Run writes them)

CHECKPOINT = re.compile(r"ckpt_(\d+)\.pt")


def checkpoint_paths(out_dir):
    """The checkpoints in out_dir, oldest step first: ordered by the step, not the name
    (ckpt_1000000.pt comes after ckpt_999995.pt)."""
    found = glob.glob(os.path.join(glob.escape(out_dir), "ckpt_[0-9]*.pt"))
    steps = {path: CHECKPOINT.fullmatch(os.path.basename(path)) for path in found}
    return sorted((p for p, m in steps.items() if m), key=lambda p: int(steps[p].group(1)))


def checkpoint_step(path):
    return int(CHECKPOINT.fullmatch(os.path.basename(path)).group(1))


def load_checkpoint(path, map_location="cpu"):
    """Load with weights_only=True: tensors and plain containers only, no pickled code runs."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one, not a pickle traceback
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise SystemExit(f"error: cannot read checkpoint {path} "
                         f"({type(e).__name__}: {first_line}); is it a checkpoint of this repo, "
                         f"complete, and not from an untrusted source?") from None


def load_latest_checkpoint(out_dir, print_fn=print, skipped=None):
    """(path, checkpoint) of the newest checkpoint that loads, or (None, None); newer ones are named
    and added to `skipped`."""
    for path in reversed(checkpoint_paths(out_dir)):
        try:
            return path, load_checkpoint(path)
        except SystemExit as e:
            print_fn(f"warning: skipping {path}, it does not load "
                     f"({str(e).removeprefix('error: ')[:200]})")
            if skipped is not None:
                skipped.append(path)
    return None, None


# -----------------------------------------------------------------------------
# the run log: out_dir/log.jsonl, one JSON object per event, and a plot drawn from it


class JsonlLog:
    """One JSON object per line, written by the process that owns the log (rank 0); with a wandb
    run, each event's numbers go to Weights & Biases too."""

    def __init__(self, path, enabled=True, wandb_run=None):
        self.path, self.enabled, self.wandb_run = path, enabled, wandb_run

    def write(self, **fields):
        if not self.enabled:
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(fields) + "\n")
        except OSError as e:
            raise SystemExit(f"error: cannot write {self.path}: {e.strerror or e}") from None
        if self.wandb_run is not None:
            numbers = {k: v for k, v in fields.items()
                       if isinstance(v, (int, float)) and k != "step"}
            if numbers:
                self.wandb_run.log(numbers, step=fields.get("step"))


def read_log(path):
    """A log.jsonl's events; a torn last line (a killed run) is dropped with a warning."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    events = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[number:]):
                raise SystemExit(f"error: {path}:{number} is not a JSON line; "
                                 f"the log is damaged") from None
            print(f"warning: {path}: dropped a torn last line (the run stopped while writing it)",
                  file=sys.stderr)
    return events


def plot_log(log_path, png_path, keys=("train_loss", "val_loss", "hellaswag_acc_norm"), title=None):
    """Train loss (raw and smoothed), val loss and HellaSwag against step, the loss on a log axis
    labelled where the curves are; returns png_path, or None without matplotlib."""
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
        elif key == "train_loss" and len(values) >= 100:  # noisy: a smoothed curve over ~2% of it
            line, = ax.plot(steps, values, alpha=0.25)
            ax.plot(steps, smoothed(values, 1 - 50 / len(values)), color=line.get_color(),
                    label=f"{key} (smoothed)")
        else:
            ax.plot(steps, values, label=key, marker="." if len(steps) < 50 else None)
    # the first steps' loss would squash the rest of the curve on a linear axis
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(log_path))))
    ax.grid(alpha=0.3, which="both")
    handles = ax.get_legend_handles_labels()
    if ax2 is not None:
        extra = ax2.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
    if handles[0]:
        ax.legend(*handles)
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return png_path


def smoothed(values, beta):
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for k, value in enumerate(values, 1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** k))
    return out


def truncate_log(path, before_step):
    """Keep only the events of steps before `before_step` (on resume, the rest is logged again)."""
    if os.path.exists(path):
        kept = [e for e in read_log(path) if e.get("step", -1) < before_step]
        atomic_write(path, lambda f: f.writelines(json.dumps(e) + "\n" for e in kept), mode="w")
