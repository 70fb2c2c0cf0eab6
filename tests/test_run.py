"""A run's lifecycle (training.Run), through both trainers: the folder, resume, checkpoints, signals, the data a
run was trained on, the source it came from, timing, config files. Tiny models on the tests' own data; GPT runs
are subprocesses, as a user runs them."""
import ast
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import training
import utils
from test_train_gpt2 import TINY, losses, train, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LSTM_TINY = ["--device=cpu", "--dtype=float32", "--n_embd=16", "--n_hidden=32", "--n_layer=1", "--model=lstm",
             "--micro_batch_size=2", "--block_size=4", "--eval_interval=1000", "--log_interval=1"]


def digest(folder):
    """sha256 of every file in a folder, by name: what 'nothing was touched' means."""
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name != ".lock"}


def lstm(data_dir, out_dir, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "train_lstm.py"), f"--data_dir={data_dir}",
                           f"--out_dir={out_dir}", *LSTM_TINY, *args], capture_output=True, text=True, env=env,
                          timeout=300)


# ---- the folder -------------------------------------------------------------------------------------------------

def test_a_fresh_start_into_a_folder_that_holds_a_run_is_refused(char_shards, tmp_path):
    """Both trainers: a fresh start never writes into another run's folder (its pruning deleted the new run's
    checkpoints; a later --resume continued the old run). The refusal names what is there and the two ways on."""
    gpt, rnn = tmp_path / "gpt", tmp_path / "rnn"
    train(char_shards, gpt, "--max_steps=4", "--checkpoint_interval=2")
    assert lstm(char_shards, rnn, "--max_steps=4", "--checkpoint_interval=2").returncode == 0
    for folder, again in ((gpt, lambda: train(char_shards, gpt, "--max_steps=2", check=False)),
                          (rnn, lambda: lstm(char_shards, rnn, "--max_steps=2"))):
        before = digest(folder)
        result = again()
        assert result.returncode == 2 and "holds a run" in result.stderr and "ckpt_000004.pt" in result.stderr
        assert "--resume=True" in result.stderr and "another --out_dir" in result.stderr
        assert "Traceback" not in result.stderr and digest(folder) == before


def test_resume_needs_a_folder_that_exists(char_shards, tmp_path):
    result = train(char_shards, tmp_path / "typo", "--max_steps=2", "--resume=True", check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr and "--out_dir" in result.stderr
    assert not (tmp_path / "typo").exists()


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    """ckpt_1000000.pt sorts before ckpt_999995.pt by name: by step it comes after, for resume and pruning."""
    for step in (999990, 999995, 1000000, 1000005):
        (tmp_path / f"ckpt_{step:06d}.pt").write_bytes(b"")
    (tmp_path / "ckpt_000004.pt.unreadable").write_bytes(b"")  # set aside: not a checkpoint any more
    paths = utils.checkpoint_paths(str(tmp_path))
    assert [utils.checkpoint_step(p) for p in paths] == [999990, 999995, 1000000, 1000005]

    class Fake:  # what Run.prune reads
        out, s, print0 = str(tmp_path), {"keep_checkpoints": 2}, staticmethod(print)
    written = str(tmp_path / "ckpt_1000000.pt")  # a resumed run writes step 1,000,000 again
    training.Run.prune(Fake(), written)
    assert [os.path.basename(p) for p in utils.checkpoint_paths(str(tmp_path))] == \
        ["ckpt_999995.pt", "ckpt_1000000.pt"]  # the newest 2 up to the one just written
    assert (tmp_path / "ckpt_1000005.pt.later").exists()  # a later step is another timeline: set aside


def test_an_unreadable_newest_checkpoint_is_set_aside_and_never_wins(char_shards, tmp_path):
    """Resume past a truncated newest checkpoint with --keep_checkpoints=1: the good checkpoints the resumed run
    writes are kept (pruning by name kept only the unreadable one), and the next resume continues from them."""
    out = tmp_path / "run"
    train(char_shards, out, "--max_steps=8", "--checkpoint_interval=2", "--stop_step=6")
    newest = out / "ckpt_000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    result = train(char_shards, out, "--resume=True", "--keep_checkpoints=1", "--checkpoint_interval=5",
                   "--stop_step=7")
    assert "skipping" in result.stdout and "ckpt_000004.pt at step 4" in result.stdout
    assert (out / "ckpt_000006.pt.unreadable").exists()
    assert [os.path.basename(p) for p in utils.checkpoint_paths(str(out))] == ["ckpt_000007.pt"]
    result = train(char_shards, out, "--resume=True")
    assert "ckpt_000007.pt at step 7" in result.stdout and max(losses(out)) == 7


def test_checkpoints_none_of_which_loads_are_an_error_not_a_fresh_start(char_shards, tmp_path):
    out = tmp_path / "run"
    train(char_shards, out, "--max_steps=4", "--checkpoint_interval=2")
    for path in utils.checkpoint_paths(str(out)):
        with open(path, "r+b") as f:
            f.truncate(500)
    before = digest(out)
    result = train(char_shards, out, "--resume=True", check=False)
    assert result.returncode == 1 and "none of the 2 checkpoints" in result.stderr and "Traceback" not in result.stderr
    assert digest(out) == before


def test_stale_temporaries_of_killed_writers_are_removed_when_a_run_takes_the_folder(char_shards, tmp_path):
    out = tmp_path / "run"
    train(char_shards, out, "--max_steps=2")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".tmp_ckpt_000004.pt.{dead.pid}.x1y2z3"
    live = out / f".tmp_ckpt_000004.pt.{os.getppid()}.a1b2c3"  # a live process's write is left alone
    stale.write_bytes(b"\0" * 1000)
    live.write_bytes(b"")
    train(char_shards, out, "--resume=True", "--max_steps=3")
    assert not stale.exists() and live.exists()


# ---- signals ----------------------------------------------------------------------------------------------------

def start(data_dir, out_dir, *args, torchrun=0):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(launcher + [os.path.join(REPO, "train_gpt2.py"), f"--data_dir={data_dir}",
                                        f"--out_dir={out_dir}", *TINY, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_step(out_dir, step, process, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if os.path.exists(os.path.join(out_dir, "log.jsonl")) and max(losses(out_dir), default=-1) >= step:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not get there")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_checkpoints_at_the_step_boundary_and_resume_is_exact(char_shards, tmp_path, sig, code):
    """A scheduler's SIGTERM (or Ctrl-C) loses nothing: one checkpoint at the next step boundary, one line naming
    it, exit 143 (130), no traceback; --resume=True then continues bit-exactly (dropout on: the RNG too)."""
    # a constant LR: the schedule must not depend on max_steps, which the resumed run shortens
    args = ["--max_steps=400", "--dropout=0.1", "--checkpoint_interval=0", "--lr_schedule=constant"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    process = start(char_shards, cut, *args)
    wait_for_step(cut, 5, process)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr and f"stopped by {signal.Signals(sig).name} before step" in stdout
    stopped = max(losses(cut)) + 1
    assert stopped < 400 and [os.path.basename(p) for p in utils.checkpoint_paths(str(cut))] == \
        [f"ckpt_{stopped:06d}.pt"]
    resumed = train(char_shards, cut, "--resume=True", "--max_steps=40") if stopped < 40 else None
    if resumed is None:
        pytest.skip(f"the machine was too slow to stop before step 40 (stopped at {stopped})")
    train(char_shards, full, *args[1:], "--max_steps=40")
    assert losses(full) == losses(cut)
    for name, tensor in weights(full, 40).items():
        assert torch.equal(tensor, weights(cut, 40)[name]), name


def test_a_second_signal_aborts_a_checkpoint_write_without_a_torn_file(tmp_path):
    """The second SIGTERM raises SystemExit(143) wherever the process is: atomic_write removes its temporary file
    and leaves the file already there as it was."""
    target = tmp_path / "ckpt_000004.pt"
    target.write_bytes(b"the old checkpoint")

    class Fake:
        signal, print0 = signal.SIGTERM, staticmethod(print)

    def write(f):
        f.write(b"half a checkpoint")
        training.Run.on_signal(Fake(), signal.SIGTERM, None)  # the second signal, mid-write
    with pytest.raises(SystemExit) as e:
        utils.atomic_write(str(target), write)
    assert e.value.code == 143 and target.read_bytes() == b"the old checkpoint"
    assert os.listdir(tmp_path) == ["ckpt_000004.pt"]


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(char_shards, tmp_path):
    """torchrun, 2 gloo ranks: SIGTERM reaches only rank 1; both stop at the same step boundary, rank 0 writes the
    checkpoint, and a resumed run matches an uninterrupted one (each rank's own RNG restored: dropout on)."""
    args = ["--max_steps=400", "--dropout=0.1", "--checkpoint_interval=0", "--lr_schedule=constant"]
    cut, full = tmp_path / "cut", tmp_path / "full"
    launcher = start(char_shards, cut, *args, torchrun=2)
    wait_for_step(cut, 3, launcher)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    worker_args = {pid: open(f"/proc/{pid}/environ", "rb").read() for pid in workers}
    rank1 = next(pid for pid, env in worker_args.items() if b"\0RANK=1\0" in b"\0" + env)
    os.kill(int(rank1), signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=120)
    assert "stopped by SIGTERM before step" in stdout, stdout[-2000:] + stderr[-2000:]
    stopped = max(losses(cut)) + 1
    ckpt = torch.load(cut / f"ckpt_{stopped:06d}.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])  # own masks
    if stopped >= 20:
        pytest.skip(f"the machine was too slow to stop before step 20 (stopped at {stopped})")
    train(char_shards, cut, "--resume=True", "--max_steps=20", torchrun=2)
    train(char_shards, full, *args, "--max_steps=20", torchrun=2)
    assert losses(full) == losses(cut)
    for name, tensor in weights(full, 20).items():
        assert torch.equal(tensor, weights(cut, 20)[name]), name


# ---- what a resumed run may change --------------------------------------------------------------------------------

def test_resume_refuses_data_that_changed(char_shards, tmp_path):
    """The checkpoint's vocabulary against the data's meta.json, and the train shards (names, token counts)
    against the loader's record: another vocabulary of the same padded size, other contents, a shard added: each
    refused, naming the setting that goes on anyway (--allow_data_change) where going on can make sense."""
    out = tmp_path / "run"
    train(char_shards, out, "--max_steps=4", "--stop_step=2")
    other_vocab = tmp_path / "other_vocab"
    shutil.copytree(char_shards, other_vocab)
    meta = data.read_meta(str(other_vocab))
    data.write_meta(str(other_vocab), dict(meta, itos=[meta["itos"][1], meta["itos"][0]] + meta["itos"][2:]))
    result = train(other_vocab, out, "--resume=True", check=False)
    assert result.returncode == 1 and "another vocabulary" in result.stderr and "itos" in result.stderr

    more = tmp_path / "more"
    shutil.copytree(char_shards, more)
    tokens = np.asarray(data.read_shard(data.shard_name(str(more), "play", "train", 0)))
    data.write_shard(data.shard_name(str(more), "play", "train", 1), tokens[:5000], meta["vocab_size"])
    result = train(more, out, "--resume=True", check=False)
    assert result.returncode == 1 and "are not" in result.stderr and "1 new" in result.stderr
    assert "--allow_data_change=True" in result.stderr and "Traceback" not in result.stderr
    other = tmp_path / "other"
    shutil.copytree(char_shards, other)
    data.write_shard(data.shard_name(str(other), "play", "train", 0), tokens[:-7], meta["vocab_size"])
    result = train(other, out, "--resume=True", check=False)
    assert result.returncode == 1 and "1 gone" in result.stderr
    assert max(losses(out)) == 1  # nothing ran, nothing logged
    train(more, out, "--resume=True", "--allow_data_change=True")
    assert max(losses(out)) == 3


def test_settings_from_a_checkpoint_pass_the_same_checks(char_shards, tmp_path):
    out = tmp_path / "run"
    train(char_shards, out, "--max_steps=4", "--stop_step=2")
    path = out / "ckpt_000002.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["settings"]["micro_batch_size"] = 0
    torch.save(ckpt, path)
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_gpt2.py"), f"--out_dir={out}",
                             "--resume=True"], capture_output=True, text=True, timeout=300)  # its settings
    assert result.returncode == 2 and "--micro_batch_size must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_stop_step_and_max_steps_below_the_checkpoint_say_what_happened(char_shards, tmp_path):
    out = tmp_path / "run"
    train(char_shards, out, "--max_steps=6", "--stop_step=4")
    before = digest(out)
    result = train(char_shards, out, "--resume=True", "--stop_step=2", check=False)
    assert result.returncode == 2 and "--stop_step=2 is not after the checkpoint's step 4" in result.stderr
    result = train(char_shards, out, "--resume=True", "--max_steps=3", check=False)
    assert result.returncode == 2 and "--max_steps=3 is below the checkpoint's step 4" in result.stderr
    result = train(char_shards, out, "--resume=True", "--max_steps=4")
    assert "nothing to do" in result.stdout and digest(out) == before


def test_resume_in_float16_after_a_float32_run(char_shards, tmp_path):
    """A float32 (or bf16) run saves its disabled GradScaler's empty state; resuming with --dtype=float16
    starts a fresh scaler (GradScaler.load_state_dict({}) raised)."""
    out = tmp_path / "run"
    train(char_shards, out, "--max_steps=4", "--stop_step=2")
    result = train(char_shards, out, "--resume=True", "--dtype=float16")
    assert "dtype float32 -> float16" not in result.stdout  # the run said '' before: no change shown
    assert max(losses(out)) == 3 and all(np.isfinite(list(losses(out).values())))


# ---- the last evaluation, timing -----------------------------------------------------------------------------

def test_the_last_evaluation_scores_the_weights_that_are_saved(char_shards, tmp_path):
    """The val loss logged at max_steps is the loss of the final checkpoint's weights (recomputed here from the
    val shard, independently of the loader), not of the weights before the last update."""
    out = tmp_path / "run"
    train(char_shards, out, "--max_steps=6", "--eval_interval=4", "--val_steps=2")
    val = {e["step"]: e["val_loss"] for e in utils.read_log(out / "log.jsonl") if "val_loss" in e}
    assert sorted(val) == [0, 4, 6]
    from model import GPT, GPTConfig
    ckpt = torch.load(out / "ckpt_000006.pt", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    tokens = torch.from_numpy(np.asarray(data.read_shard(data.shard_name(char_shards, "play", "val", 0)),
                                         dtype=np.int64))
    windows = torch.stack([tokens[k * 32:k * 32 + 33] for k in range(8)])  # 2 batches of B=4, T=32
    with torch.no_grad():
        expected = sum(model(w[:, :-1], w[:, 1:])[1].item() for w in windows.split(4)) / 2
    assert val[6] == pytest.approx(expected, rel=1e-5)


def test_checkpoint_time_is_not_training_time(char_shards, tmp_path):
    """torch.save made to take 1 s: ms/step after a checkpoint counts the training step only, and the checkpoint
    event says how long the write took."""
    out = tmp_path / "run"
    code = ("import runpy, sys, time, torch\nreal = torch.save\n"
            "torch.save = lambda *a, **k: (time.sleep(1), real(*a, **k))[1]\n"
            f"sys.argv = sys.argv[1:]\nrunpy.run_path({os.path.join(REPO, 'train_gpt2.py')!r}, run_name='__main__')")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code, "train_gpt2.py", f"--data_dir={char_shards}",
                             f"--out_dir={out}", *TINY, "--max_steps=4", "--checkpoint_interval=1"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    events = utils.read_log(out / "log.jsonl")
    assert all(e["ms_per_step"] < 500 for e in events if e.get("train_loss") is not None and e["step"] > 0)
    saved = [e for e in events if e.get("event") == "checkpoint"]
    assert len(saved) == 4 and all(e["seconds"] >= 1 for e in saved)
    assert "(1.0 s)" in result.stdout or "(1.1 s)" in result.stdout


def test_the_first_compiled_step_is_reported_apart(tmp_path, capsys):
    """Run's timing without a GPU: with compiled=True the first step's time (compilation) gets its own line and no
    ms/step, tokens/s or MFU; the next line times training steps only."""
    ns = dict(out_dir=str(tmp_path / "run"), resume=False, stop_step=-1, keep_checkpoints=1, seed=0, max_lr=1.0,
              min_lr=0.1, warmup_steps=0, max_steps=3, lr_schedule="cosine", decay_steps=0)
    run = training.Run(ns, [], (), lambda: None)
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": net.parameters(), "initial_lr": 1.0}], lr=1.0)
    loader = data.WindowLoader.__new__(data.WindowLoader)
    loader.state_dict = lambda: {}
    run.begin(dict(ns), model=net, model_config=type("C", (), {})(), optimizers=[opt],
              scaler=torch.amp.GradScaler("cpu", enabled=False), loader=loader, meta={}, device="cpu",
              compiled=True, header=[])
    try:
        loss, norm = torch.tensor(1.0), torch.tensor(0.5)
        time.sleep(0.3)  # "compiling"
        run.after_step(0, loss, norm)
        run.log_step(0, loss, norm, 1.0, 100)
        run.after_step(1, loss, norm)
        run.log_step(1, loss, norm, 1.0, 100)
    finally:
        run.finish()
    printed = capsys.readouterr().out
    assert "first step 0.3 s (compilation" in printed and "s/step: about" in printed
    steps = [e for e in utils.read_log(tmp_path / "run" / "log.jsonl") if "train_loss" in e]
    assert steps[0]["ms_per_step"] is None and steps[0]["tokens_per_sec"] is None
    assert steps[1]["ms_per_step"] < 100


# ---- the source a run came from ----------------------------------------------------------------------------------

def test_a_run_of_an_edited_tree_keeps_the_edit(char_shards, tmp_path):
    """A clone with one changed line: the diff is saved beside log.jsonl and inside each checkpoint, and the start
    event names the commit. Outside a git checkout the run says so and goes on."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", REPO, str(clone)], check=True)
    for name in os.listdir(REPO):  # this tree's files, as they are now, then one edit on top
        if name.endswith(".py"):
            shutil.copy(os.path.join(REPO, name), clone / name)
    subprocess.run(["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "now"])
    path = clone / "train_gpt2.py"
    path.write_text(path.read_text().replace("weight_decay = 0.1 ", "weight_decay = 0.05"))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(path), f"--data_dir={char_shards}", f"--out_dir={out}", *TINY, "--max_steps=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "+ edits, saved as" in result.stdout, result.stderr[-2000:]
    (diff_file,) = glob.glob(str(out / "source-*.diff"))
    assert "+weight_decay = 0.05" in open(diff_file).read()
    ckpt = torch.load(out / "ckpt_000002.pt", weights_only=True)
    assert "+weight_decay = 0.05" in ckpt["source"]["diff"] and ckpt["source"]["dirty"]
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    start_event = utils.read_log(out / "log.jsonl")[0]
    assert start_event["source"]["commit"] == head.strip() and start_event["settings"]["weight_decay"] == 0.05

    shutil.rmtree(clone / ".git")
    result = subprocess.run(cmd[:3] + [f"--out_dir={tmp_path / 'bare'}"] + cmd[4:], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0 and "not a git checkout" in result.stdout


# ---- settings: config files, GPTConfig's fields --------------------------------------------------------------------

def trainer_of(recipe):
    return "train_lstm.py" if os.path.basename(recipe).startswith("lstm_") else "train_gpt2.py"


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(REPO, "config", "*.py"))))
def test_every_recipe_is_read_by_its_trainer(recipe):
    """python <trainer> config/<recipe>.py: every line of every recipe is a setting of its trainer, of its type."""
    result = subprocess.run([sys.executable, os.path.join(REPO, trainer_of(recipe)), recipe, "--help=json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)["settings"]
    tree = ast.parse(open(recipe).read())
    for node in tree.body:
        if isinstance(node, ast.Assign):
            assert settings[node.targets[0].id] == ast.literal_eval(node.value), node.targets[0].id


def test_the_cpu_quick_start_recipe_trains(char_shards, tmp_path):
    """The quick start's recipe, with the command line after it winning: the tests' own data, a few steps."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_gpt2.py"), "config/shakespeare_char.py",
                             f"--data_dir={char_shards}", f"--out_dir={out}", "--max_steps=3", "--eval_interval=3",
                             "--val_steps=2", "--sample_tokens=8"], cwd=REPO, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    settings = utils.read_log(out / "log.jsonl")[0]["settings"]
    assert settings["n_embd"] == 128 and settings["block_size"] == 64 and settings["max_steps"] == 3
    assert "sample:\nROMEO:" in result.stdout  # samples print as text, not as a repr


@pytest.mark.parametrize("line, says", [("import os", "only `name = value` lines"),
                                        ("max_lr = float('3e-3')", "must be a literal"),
                                        ("max_lr = f()", "must be a literal"),
                                        ("max_steps = 'ten'", "max_steps wants int"),
                                        ("max_lrr = 1e-3", "did you mean max_lr"),
                                        ("max_lr, min_lr = 1, 2", "only `name = value` lines")])
def test_a_config_file_is_read_never_run(tmp_path, line, says):
    recipe = tmp_path / "bad.py"
    recipe.write_text(f'"""A recipe."""\nn_layer = 2  # fine\n\n{line}\n')
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_gpt2.py"), str(recipe)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"{recipe}:4:" in result.stderr and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_config_values_take_the_settings_types_and_the_command_line_wins():
    ns = {"max_lr": 1e-3, "max_steps": 10, "name": "x", "budget": None}
    settings = {"max_lr": 1e-3, "max_steps": 10, "name": "x", "budget": None}
    assert utils.coerce("max_lr", 1, 1e-3) == 1.0 and type(utils.coerce("max_lr", 1, 1e-3)) is float
    assert utils.coerce("max_steps", 5e3, 10) == 5000 and utils.coerce("budget", 1e18, None) == 1e18
    with pytest.raises(ValueError):
        utils.coerce("max_steps", 2.5, 10)
    with pytest.raises(ValueError):
        utils.coerce("max_steps", True, 10)
    path = os.path.join(REPO, "config", "shakespeare_char.py")
    ns = dict(ns, **{k: v for k, v in utils.read_config(path, {**settings, **_all(path)}).items()})
    assert ns["max_lr"] == 3e-3


def _all(path):
    return {node.targets[0].id: None for node in ast.parse(open(path).read()).body if isinstance(node, ast.Assign)}


def test_every_gptconfig_field_is_a_setting_of_the_trainer_and_of_bench():
    """A new GPTConfig field is a setting of train_gpt2.py and bench.py without a line of theirs changing, and
    a value given on the command line reaches the model."""
    from model import GPTConfig
    fields = {f.name for f in __import__("dataclasses").fields(GPTConfig)}
    for script in ("train_gpt2.py", "bench.py"):
        result = subprocess.run([sys.executable, os.path.join(REPO, script), "--help=json", "--rope_base=5e5",
                                 "--mlp_hidden=96"], capture_output=True, text=True, timeout=120)
        settings = json.loads(result.stdout)["settings"]
        assert fields <= set(settings), fields - set(settings)
        assert settings["rope_base"] == 5e5 and settings["mlp_hidden"] == 96


def test_the_model_settings_reach_the_model(char_shards, tmp_path):
    train(char_shards, tmp_path / "run", "--max_steps=1", "--rope_base=5e5", "--mlp_hidden=48")
    config = torch.load(tmp_path / "run" / "ckpt_000001.pt", weights_only=True)["model_config"]
    assert config["rope_base"] == 5e5 and config["mlp_hidden"] == 48


def test_scripts_import_libraries_never_scripts():
    """No file but the tests imports a script: a function two files need lives in a library module."""
    scripts = {"train_gpt2", "train_lstm", "sample", "export_hf", "bench", "sweep", "prepare_fineweb",
               "prepare_wikitext"}
    for path in glob.glob(os.path.join(REPO, "*.py")):
        tree = ast.parse(open(path).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & scripts - {os.path.basename(path)[:-3]}, path
