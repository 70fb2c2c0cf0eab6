"""sweep.py: a tiny LR sweep of train_gpt2.py with one diverging point, rerun and resume, the FLOP-budget random
search, the results table and plots, and the clear errors. Trainer runs are real subprocesses on the tests'
own char-level shards (conftest.py's char_shards).

sweep.main runs in this process (reloaded each time, as its settings are module globals), which saves a torch
import per sweep; the runs it launches are subprocesses as in real use.
"""
import contextlib
import copy
import csv
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import sweep
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a ~6k-parameter model, no HellaSwag, no samples; eval at the first and last step. Every setting a default
# change could affect is explicit.
TINY = ["--device=cpu", "--compile=False", "--optimizer=adamw", "--dtype=float32", "--lr_schedule=cosine",
        "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--micro_batch_size=8", "--grad_clip=1.0",
        "--hellaswag_interval=0", "--sample_tokens=0", "--val_steps=2", "--log_interval=5",
        "--checkpoint_interval=0", "--eval_interval=1000"]
LR_GRID = ["--max_lr=1e-2,3e-3,1e6", "--min_lr=1e-4", "--max_steps=30", "--warmup_steps=3"]  # 1e6: NaN at step 2
MODEL_SETTINGS = ("--n_layer", "--n_head", "--n_embd", "--block_size", "--micro_batch_size")


ANSWERS = {}  # train_gpt2.py's --help=json answer: asked once per test session, as each asking imports torch (~1 s)


def reload_sweep():
    """sweep.py with its settings fresh from the file; train_gpt2.py's settings asked once (other trainers
    every time, as in real use)."""
    importlib.reload(sweep)
    ask = sweep.trainer_settings

    def once():
        if sweep.script != "train_gpt2.py":
            return ask()
        if not ANSWERS:
            ANSWERS["train_gpt2.py"] = ask()
        return copy.deepcopy(ANSWERS["train_gpt2.py"])
    sweep.trainer_settings = once


def run_sweep(*argv):
    """sweep.py's main, with its settings fresh from the file."""
    reload_sweep()
    sweep.main(list(argv))


def exit_code(*argv):
    with pytest.raises(SystemExit) as e:
        run_sweep(*argv)
    return e.value.code


@pytest.fixture(scope="module")
def one_thread_runs():
    with pytest.MonkeyPatch.context() as mp:  # the runs share 2 busy cores: one thread each
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def lr_sweep(char_shards, one_thread_runs, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lr_sweep"))
    run_sweep(f"--sweep_dir={folder}", "--parallel=2", f"--data_dir={char_shards}", *TINY, *LR_GRID)
    return folder


def read_csv(folder):
    with open(os.path.join(folder, "results.csv")) as f:
        return list(csv.DictReader(f))


def events(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_lr_sweep_table_states_and_falling_loss(lr_sweep):
    rows = read_csv(lr_sweep)
    assert [r["run"] for r in rows][2] == "max_lr=1e6" and len(rows) == 3
    states = {r["run"]: r["state"] for r in rows}
    assert states == {"max_lr=1e-2": "finished", "max_lr=3e-3": "finished", "max_lr=1e6": "diverged"}
    diverged = os.path.join(lr_sweep, "max_lr=1e6")
    assert json.load(open(os.path.join(diverged, "run.json")))["exit_code"] == utils.EXIT_DIVERGED
    assert any(e.get("event") == "diverged" for e in events(diverged))
    for row in rows[:2]:  # finished: the train and val loss fell, and the table holds the best val loss
        run_dir = os.path.join(lr_sweep, row["run"])
        assert os.path.getsize(os.path.join(run_dir, "stdout.log")) > 0
        log = events(run_dir)
        train = [e["train_loss"] for e in log if "train_loss" in e]
        val = [e["val_loss"] for e in log if "val_loss" in e]
        assert train[-1] < train[0] - 0.3 and val[-1] < val[0] - 0.3
        assert float(row["best_val_loss"]) == pytest.approx(min(val))
        assert float(row["val_ppl"]) == pytest.approx(math.exp(min(val)))
        assert int(row["tokens"]) == 30 * 8 * 16 and int(row["params"]) > 0
        assert "max_lr=" in row["overrides"] and "n_embd=16" in row["overrides"]  # the CSV has every override
    assert float(rows[0]["best_val_loss"]) <= float(rows[1]["best_val_loss"])  # sorted by val loss
    table = open(os.path.join(lr_sweep, "results.md")).read().splitlines()
    assert len(table) == 2 + 3 and "diverged" in table[-1]
    assert "n_embd=16" not in table[2] and "max_lr=" in table[2]  # the Markdown table: what differs


def test_plots_skip_a_single_batch_size(lr_sweep, capsys):
    pytest.importorskip("matplotlib")
    for name in ("val_loss_vs_lr.png", "train_loss.png"):
        assert is_png(os.path.join(lr_sweep, name))
    # every run has the same batch size: a batch plot would be one vertical line without labels
    assert not os.path.exists(os.path.join(lr_sweep, "val_loss_vs_batch.png"))
    run_sweep("--report_only=True", f"--sweep_dir={lr_sweep}")
    assert "val_loss_vs_batch.png skipped (one batch size" in capsys.readouterr().out


def fake_run(folder, name, max_lr, batch, val_loss):
    """A finished run's run.json and log.jsonl, as train_gpt2.py and sweep.py write them."""
    os.makedirs(folder / name)
    (folder / name / "run.json").write_text(json.dumps(
        dict(name=name, overrides={"max_lr": str(max_lr), "micro_batch_size": str(batch)}, state="finished",
             exit_code=0, runtime_s=1.0)))
    settings = dict(max_lr=max_lr, micro_batch_size=batch, block_size=16, total_batch_size=16 * batch)
    log = [dict(event="start", step=0, settings=settings, params=1000, world_size=1),
           dict(step=0, train_loss=4.0), dict(step=9, train_loss=3.0), dict(step=9, val_loss=val_loss)]
    (folder / name / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))


def test_plots_skip_a_single_lr(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    fake_run(tmp_path, "b8", 1e-3, 8, 3.0)
    fake_run(tmp_path, "b16", 1e-3, 16, 2.9)
    run_sweep("--report_only=True", f"--sweep_dir={tmp_path}")
    out = capsys.readouterr().out
    assert "val_loss_vs_lr.png skipped (one max LR" in out and not (tmp_path / "val_loss_vs_lr.png").exists()
    assert is_png(tmp_path / "val_loss_vs_batch.png") and is_png(tmp_path / "train_loss.png")
    assert [r["run"] for r in read_csv(tmp_path)] == ["b16", "b8"]  # by val loss
    assert [int(r["tokens"]) for r in read_csv(tmp_path)] == [10 * 16 * 16, 10 * 8 * 16]


def test_rerun_launches_nothing_then_retry_relaunches_only_the_failed(lr_sweep, char_shards, capsys):
    def snapshot():
        return {d: (os.stat(os.path.join(lr_sweep, d, "stdout.log")).st_mtime_ns,
                    open(os.path.join(lr_sweep, d, "run.json")).read())
                for d in ("max_lr=1e-2", "max_lr=3e-3", "max_lr=1e6")}
    before = snapshot()
    capsys.readouterr()
    run_sweep(f"--sweep_dir={lr_sweep}", "--parallel=2", f"--data_dir={char_shards}", *TINY, *LR_GRID)
    assert "0 runs to launch" in capsys.readouterr().out and snapshot() == before and len(read_csv(lr_sweep)) == 3
    run_sweep(f"--sweep_dir={lr_sweep}", f"--data_dir={char_shards}", "--retry_failed=True", *TINY, *LR_GRID)
    assert "1 runs to launch" in capsys.readouterr().out
    after = snapshot()
    assert after["max_lr=1e-2"] == before["max_lr=1e-2"] and after["max_lr=3e-3"] == before["max_lr=3e-3"]
    assert after["max_lr=1e6"][0] != before["max_lr=1e6"][0]
    assert {r["run"]: r["state"] for r in read_csv(lr_sweep)}["max_lr=1e6"] == "diverged"
    # a different fixed override would mix two sweeps in one table: refused
    assert exit_code(f"--sweep_dir={lr_sweep}", f"--data_dir={char_shards}", *TINY, *LR_GRID, "--weight_decay=0") == 2
    assert "weight_decay" in capsys.readouterr().err


def test_report_only_redraws_the_table(lr_sweep):
    os.remove(os.path.join(lr_sweep, "results.md"))
    run_sweep("--report_only=True", f"--sweep_dir={lr_sweep}")
    assert len(open(os.path.join(lr_sweep, "results.md")).read().splitlines()) == 5


def test_report_only_without_runs_says_so_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(SystemExit) as e:
            run_sweep("--report_only=True", f"--sweep_dir={folder}")
        assert e.value.code not in (0, None) and f"no runs found in {folder}" in str(e.value.code)
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []


def test_interrupted_run_resumes_from_its_checkpoint(char_shards, one_thread_runs, tmp_path, capsys):
    argv = [f"--sweep_dir={tmp_path}", f"--data_dir={char_shards}", *TINY, "--max_lr=1e-2", "--min_lr=1e-4",
            "--max_steps=10", "--warmup_steps=2", "--checkpoint_interval=5"]
    run_sweep(*argv)
    run_dir = tmp_path / "default"
    record, first_output = json.loads((run_dir / "run.json").read_text()), (run_dir / "stdout.log").read_text()
    # as if sweep.py had been killed during the run's second half: the last checkpoint and events are missing
    os.remove(run_dir / "ckpt_000010.pt")
    (run_dir / "run.json").write_text(json.dumps(dict(record, state="running")))
    capsys.readouterr()
    run_sweep(*argv)
    out = capsys.readouterr().out
    assert "1 runs to launch, 0 kept from before" in out and "launched default (resumed)" in out
    new_record, output = json.loads((run_dir / "run.json").read_text()), (run_dir / "stdout.log").read_text()
    assert new_record["state"] == "finished" and "--resume=True" in new_record["command"]
    assert new_record["runtime_s"] > record["runtime_s"]  # the time of both attempts
    assert output.startswith(first_output) and "resumed from" in output[len(first_output):]
    steps = [e["step"] for e in events(run_dir) if "train_loss" in e]
    assert steps == sorted(set(steps)) and steps[-1] == 9  # no step logged twice, every step run


def test_flop_budget_random_search(char_shards, one_thread_runs, tmp_path):
    budget = 1e8
    run_sweep("--mode=random", f"--sweep_dir={tmp_path}", f"--flop_budget={budget:g}", "--n_samples=2",
              "--random_seed=3", "--n_layer_lo=1", "--n_layer_hi=2", "--n_head_lo=2", "--n_head_hi=3",
              "--n_embd_lo=16", "--n_embd_hi=32", "--seq_len_lo=16", "--seq_len_hi=32", "--batch_lo=4",
              "--batch_hi=8", "--min_lr_lo=1e-3", "--min_lr_hi=3e-3", "--max_params=15000",
              f"--data_dir={char_shards}", "--pos_emb=rope", "--tie_embeddings=True",
              *[a for a in TINY if a.split("=")[0] not in MODEL_SETTINGS])
    records = {d: json.load(open(tmp_path / d / "run.json")) for d in os.listdir(tmp_path) if (tmp_path / d).is_dir()}
    skipped = [r for r in records.values() if r["state"] == "skipped"]
    finished = [r for r in records.values() if r["state"] == "finished"]
    assert len(finished) == 2 and len(skipped) >= 1 and len(records) == len(finished) + len(skipped)
    for r in skipped:  # rejected before launch: nothing ran
        assert "params outside [0, 15,000]" in r["reason"] and os.listdir(tmp_path / r["name"]) == ["run.json"]
    for r in finished:
        log = events(tmp_path / r["name"])
        start = next(e for e in log if e.get("event") == "start")
        s = start["settings"]
        assert s["pos_emb"] == "rope" and s["tie_embeddings"]  # no position table: every parameter does matmuls
        # PaLM's 6N + 12 L C T, N = all parameters (the tied lm_head counted once), independent of model.py
        flops_per_token = 6 * start["params"] + 12 * s["n_layer"] * s["n_embd"] * s["block_size"]
        flops_per_step = flops_per_token * s["total_batch_size"]
        steps = s["max_steps"]
        assert steps * flops_per_step <= budget < (steps + 1) * flops_per_step
        assert max(e["step"] for e in log if "train_loss" in e) == steps - 1  # it ran them all
        assert s["total_batch_size"] == s["micro_batch_size"] * s["block_size"]
        assert s["warmup_steps"] == steps // 10 and s["max_lr"] == pytest.approx(10 * s["min_lr"])
        assert s["n_embd"] % s["n_head"] == 0 and 1 <= s["n_layer"] <= 2 and start["params"] <= 15000
    assert len(read_csv(tmp_path)) == len(records) and read_csv(tmp_path)[-1]["state"] == "skipped"


def random_plan(char_shards, **settings):
    """The random search's runs for these sweep.py settings, planned without launching anything."""
    reload_sweep()
    for name, value in dict(mode="random", flop_budget=1e15, **settings).items():
        setattr(sweep, name, value)
    defaults, fixed, _ = sweep.trainer_overrides({"data_dir": char_shards, "pos_emb": "rope"})
    return sweep.plan_random(fixed, defaults)


def test_random_draws_only_head_counts_that_fit(char_shards):
    runs = random_plan(char_shards, n_samples=20)
    assert len(runs) == 20 and all(r["reason"] is None for r in runs)  # no draw wasted
    shapes = [(int(r["overrides"]["n_embd"]), int(r["overrides"]["n_head"])) for r in runs]
    assert all(c % h == 0 and (c // h) % 2 == 0 and 2 <= h <= 8 for c, h in shapes)  # RoPE: even head size
    assert len({h for _, h in shapes}) > 1  # drawn among the divisors, not a fixed choice
    # no head count in range divides the width: recorded as skipped, with the reason
    runs = random_plan(char_shards, n_samples=1, n_head_lo=3, n_head_hi=3, n_embd_lo=16, n_embd_hi=32)
    assert runs and all(r["reason"].startswith("no n_head in [3, 3] divides n_embd") for r in runs)


def test_random_runs_are_named_by_their_max_lr(char_shards):
    """The LR in a random run's name is the peak one users tune and compare with grid sweeps (max_lr=1e-3),
    not min_lr, a tenth of it."""
    runs = random_plan(char_shards, n_samples=10)
    for r in runs:
        ov = r["overrides"]
        batch = int(ov["total_batch_size"]) // int(ov["block_size"])
        assert r["name"] == (f"L{ov['n_layer']}_H{ov['n_head']}_C{ov['n_embd']}_B{batch}_T{ov['block_size']}"
                             f"_max_lr={ov['max_lr']}")
        assert ov["min_lr"] not in r["name"]
    assert len({r["name"] for r in runs}) == len(runs)


def test_dry_run_warns_about_a_missing_data_folder(char_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative data folders resolve against the repo, as in the trainers
    for data_dir, warned in ((char_shards, False), ("tests", False), ("tests/no_such_data", True)):
        run_sweep(f"--sweep_dir={tmp_path / 'sweep'}", "--dry_run=True", f"--data_dir={data_dir}", *TINY,
                  "--max_lr=1e-3,2e-3")
        out = capsys.readouterr().out
        assert ("warning: the data folder" in out) == warned and "max_lr=2e-3 (new): " in out
    assert os.path.join(REPO, "tests", "no_such_data") in out
    assert os.listdir(tmp_path) == []  # a dry run writes nothing


@pytest.mark.parametrize("bad", [
    ["--flop_budget=abc"], ["--flop_budget=0"], ["--flop_budget=nan"], ["--parallel=0"], ["--n_samples=0"],
    ["--base_batch=0"], ["--min_lr_ratio=-1"], ["--mode=bogus"], ["--lr_scaling=cube"], ["--mode=random"],
    ["--batch_lo=64", "--batch_hi=32"], ["--seq_len_lo=33", "--seq_len_hi=40"], ["--min_lr_lo=0"],
    ["--min_params=10", "--max_params=5"], ["--script=no_such_trainer.py"], ["--max_lr=1e-3,abc"],
    ["--norm=rmsnorm,bogus"], ["--out_dir=x"]])
def test_bad_settings_exit_2_naming_the_setting(bad, tmp_path, capsys):
    assert exit_code(f"--sweep_dir={tmp_path / 'sweep'}", "--max_lr=1e-3,2e-3", "--max_steps=2", *bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and bad[0].split("=")[0] in err and "Traceback" not in err
    assert not (tmp_path / "sweep").exists()


def test_random_mode_refuses_drawn_settings_and_axes(tmp_path, capsys):
    for extra in ("--n_embd=64", "--seed=1,2"):
        assert exit_code("--mode=random", "--flop_budget=1e12", f"--sweep_dir={tmp_path}", extra) == 2
        assert extra.split("=")[0] in capsys.readouterr().err


def test_one_sweep_per_folder(char_shards, tmp_path, capsys):
    lock = utils.lock_folder(str(tmp_path), "sweep")
    with pytest.raises(SystemExit) as e:
        run_sweep(f"--sweep_dir={tmp_path}", f"--data_dir={char_shards}", *TINY, "--max_lr=1e-3,2e-3", "--max_steps=2")
    lock.close()
    assert "in use by another sweep" in str(e.value.code) and sorted(os.listdir(tmp_path)) == [".lock"]


def test_lr_scaling_and_batch_points():
    importlib.reload(sweep)
    defaults = {"micro_batch_size": 32, "block_size": 1024, "total_batch_size": 524288, "max_lr": 1e-3, "min_lr": 1e-4}
    sweep.lr_scaling, sweep.base_batch = "sqrt", 32
    ov = sweep.with_batch_and_lr({"micro_batch_size": "128", "max_lr": "2e-3"}, defaults)
    assert ov["total_batch_size"] == str(128 * 1024)  # a batch point without accumulation
    assert float(ov["max_lr"]) == pytest.approx(2e-3 * math.sqrt(128 / 32), rel=1e-3)
    assert float(ov["min_lr"]) == pytest.approx(1e-4 * 2, rel=1e-3)
    sweep.lr_scaling, sweep.base_batch = "linear", 128
    ov = sweep.with_batch_and_lr({"total_batch_size": "16384", "block_size": "64"}, defaults)
    assert float(ov["max_lr"]) == pytest.approx(1e-3 * 2) and "micro_batch_size" not in ov
    lstm = {"micro_batch_size": 32, "block_size": 128, "max_lr": 1e-3, "min_lr": 1e-4}  # streams, no token batch
    assert float(sweep.with_batch_and_lr({"micro_batch_size": "256"}, lstm)["max_lr"]) == pytest.approx(2e-3)
    sweep.lr_scaling = "none"
    assert sweep.with_batch_and_lr({"max_lr": "1e-3"}, defaults) == {"max_lr": "1e-3"}
    sweep.lr_scaling, sweep.base_batch, sweep.min_lr_ratio = "sqrt", 32, 0.1  # min_lr follows the scaled max_lr
    ov = sweep.with_batch_and_lr({"micro_batch_size": "128", "max_lr": "2e-3"}, defaults)
    assert float(ov["min_lr"]) == pytest.approx(0.1 * float(ov["max_lr"]), rel=1e-3)


def test_ablation_set_and_names():
    importlib.reload(sweep)
    sweep.mode = "ablations"
    defaults = {"max_lr": 1e-3, "norm": "rmsnorm", "norm_pos": "pre", "pos_emb": "rope", "mlp": "swiglu", "seed": 1}
    runs = sweep.plan_grid({"seed": "7"}, {"max_lr": ["1e-3", "2e-3"]}, defaults)
    names = {r["name"]: r["overrides"] for r in runs}
    assert len(runs) == 10 and names["no_rmsnorm_max_lr=2e-3"] == {"seed": "7", "norm": "none", "max_lr": "2e-3"}
    assert names["baseline_max_lr=1e-3"] == {"seed": "7", "max_lr": "1e-3"}
    assert {names[f"{a}_max_lr=1e-3"].get(k) for a, k in (("post_norm", "norm_pos"), ("no_rope", "pos_emb"),
                                                            ("silu_ffn", "mlp"))} == {"post", "none", "silu"}
    name = sweep.run_name({"data_dir": "/a b/c", "max_lr": "1e-3"})
    assert "/" not in name and " " not in name
    long = [sweep.run_name({f"k{i}": "x" * 20 + str(j) for i in range(10)}) for j in range(2)]
    assert all(len(n) <= 80 for n in long) and long[0] != long[1]  # cut, but still one folder per run


def test_classify_states(tmp_path, capsys):
    importlib.reload(sweep)

    def state(rc, stdout="", log=()):
        run_dir = tmp_path / f"r{len(os.listdir(tmp_path))}"
        run_dir.mkdir()
        (run_dir / "stdout.log").write_text(stdout)
        (run_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log) + '{"step": 9, "trunc')
        return sweep.classify(rc, str(run_dir))
    assert state(0) == "finished" and state(utils.EXIT_DIVERGED) == "diverged" and state(-2) == "interrupted"
    assert state(1, log=[{"event": "diverged", "step": 4}]) == "diverged"
    assert state(1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") == "oom"
    assert state(1, "Traceback ...\nValueError: bad") == "failed" and state(-9) == "failed"
    assert capsys.readouterr().err == ""  # a running run's half-written last line is no news


def test_unknown_trainer_setting_exits_2(capsys):
    assert exit_code("--sweep_dir=/nonexistent/never", "--max_lr=1e-3,2e-3", "--no_such_setting=3") == 2
    assert "no_such_setting" in capsys.readouterr().err


# A stand-in trainer without torch, for what real ones do too slowly to test: it answers --help=json (once per
# sweep: each answer adds a line to help_calls), holds out_dir/.lock as utils.lock_folder does, and on SIGTERM or
# SIGINT writes the signal's name to out_dir/signalled and exits 128 + the signal, as the trainers do; otherwise
# it sleeps --seconds and exits 0. Imported or run as a module (not as __main__), it leaves out_dir/../imported.
FAKE_TRAINER = '''
import fcntl, json, os, signal, sys, time

out_dir = "out"
resume = False
max_lr = 1e-3
seconds = 30.0

if __name__ != "__main__":
    open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imported"), "w").close()
elif "--help=json" in sys.argv:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "help_calls"), "a") as f:
        f.write("answered\\n")
    print(json.dumps({"settings": dict(out_dir=out_dir, resume=resume, max_lr=max_lr, seconds=seconds),
                      "choices": {}}))
else:
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    out = args["out_dir"]
    lock = open(os.path.join(out, ".lock"), "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(f"{os.getpid()}\\n")
    lock.flush()

    def stop(signum, frame):
        with open(os.path.join(out, "signalled"), "w") as f:
            f.write(signal.Signals(signum).name)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with open(os.path.join(out, "started"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(float(args.get("seconds", seconds)))
'''


@pytest.fixture
def fake_trainer(tmp_path):
    """The stand-in trainer's path, in its own folder (help_calls and imported appear beside it)."""
    (tmp_path / "trainer").mkdir()
    path = tmp_path / "trainer" / "fake_train.py"
    path.write_text(FAKE_TRAINER)
    return path


def test_trainer_settings_come_from_help_json_once_without_importing_it(fake_trainer, tmp_path, capsys):
    run_sweep(f"--script={fake_trainer}", f"--sweep_dir={tmp_path / 'sweep'}", "--dry_run=True", "--max_lr=1,2",
              "--seconds=0")
    assert "max_lr=2 (new): --seconds=0 --max_lr=2" in capsys.readouterr().out
    assert not (fake_trainer.parent / "imported").exists()  # never imported nor exec'd by sweep.py
    assert (fake_trainer.parent / "help_calls").read_text() == "answered\n"  # asked once per sweep
    # unknown settings are still refused: the trainer's answer lists its settings
    assert exit_code(f"--script={fake_trainer}", f"--sweep_dir={tmp_path / 'sweep'}", "--n_layer=2") == 2
    assert "--n_layer is neither a sweep.py setting" in capsys.readouterr().err


@pytest.mark.parametrize("body", ["print('no settings here')", "raise RuntimeError('broken trainer')",
                                  "import sys; sys.exit(1)"])
def test_a_trainer_that_cannot_say_its_settings_is_one_line(body, tmp_path, capsys):
    script = tmp_path / "broken_train.py"
    script.write_text(body + "\n")
    assert exit_code(f"--script={script}", f"--sweep_dir={tmp_path / 'sweep'}", "--max_lr=1e-3,2e-3") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --script=") and err.count("\n") == 1 and "--help=json" in err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("state", ["running", "failed"])
def test_a_run_whose_folder_is_locked_is_left_alone(state, fake_trainer, tmp_path, capsys):
    """A trainer still running in a run's folder (an orphan of a killed sweep, or started by hand) holds its
    .lock: the sweep neither resumes nor retries that run, and deletes, truncates and records nothing there."""
    run_dir = tmp_path / "sweep" / "default"
    run_dir.mkdir(parents=True)
    record = dict(name="default", overrides={"seconds": "0"}, state=state, exit_code=None, runtime_s=5.0)
    files = {"run.json": json.dumps(record), "stdout.log": "step 7\n", "log.jsonl": '{"step": 7, "train_loss": 2}\n',
             "ckpt_000005.pt": "weights"}
    for name, text in files.items():
        (run_dir / name).write_text(text)
    holder = utils.lock_folder(str(run_dir), "training run")  # as that trainer holds it, with this PID
    try:
        run_sweep(f"--script={fake_trainer}", f"--sweep_dir={tmp_path / 'sweep'}", "--seconds=0", "--retry_failed=True")
        said = capsys.readouterr().out
        # and when the lock is taken after the sweep planned the run: checked again at launch
        reload_sweep()
        sweep.script = str(fake_trainer)
        sweep.launch(dict(name="default", dir=str(run_dir), overrides={"seconds": "0"}, resume=False, runtime_s=0),
                     None, sweep.Trainers())
        said += capsys.readouterr().out
    finally:
        holder.close()
    assert said.count(f"running default (PID {os.getpid()}") == 2 and "launched" not in said
    assert {name: (run_dir / name).read_text() for name in files} == files and not (run_dir / "started").exists()


def start_sweep(*argv):
    """sweep.py as a process of its own, so that signals go to it and not to pytest."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, "sweep.py"), *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(*paths, timeout=60):
    deadline = time.time() + timeout
    while not all(os.path.exists(p) for p in paths):
        assert time.time() < deadline, f"nothing at {[p for p in paths if not os.path.exists(p)]} after {timeout} s"
        time.sleep(0.05)


def end_processes(sweep_process, folder):
    """Kill what a test started and left running (a failing test): the sweep and the stand-in trainers, by PID."""
    if sweep_process.poll() is None:
        sweep_process.kill()
        sweep_process.wait()
    for started in folder.glob("*/started"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(started.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_sweep_stops_its_runs_and_exits_non_zero(sig, fake_trainer, tmp_path):
    """Ctrl-C or kill: the signal goes on to the running trainers (which checkpoint and stop), they are recorded as
    interrupted (a rerun resumes them), nothing more is launched and the sweep exits 128 + the signal."""
    folder = tmp_path / "sweep"
    sweep_process = start_sweep(f"--script={fake_trainer}", f"--sweep_dir={folder}", "--parallel=2", "--max_lr=1,2,3")
    try:
        wait_for(folder / "max_lr=1" / "started", folder / "max_lr=2" / "started")
        sweep_process.send_signal(sig)
        out, _ = sweep_process.communicate(timeout=20)  # the trainers sleep 30 s unless signalled
    finally:
        end_processes(sweep_process, folder)
    assert sweep_process.returncode == 128 + sig, out
    for run in ("max_lr=1", "max_lr=2"):
        assert (folder / run / "signalled").read_text() == sig.name
        record = json.loads((folder / run / "run.json").read_text())
        assert record["state"] == "interrupted" and record["exit_code"] == 128 + sig
    assert not (folder / "max_lr=3" / "run.json").exists()  # launched no more
    assert {r["run"]: r["state"] for r in read_csv(folder)} == {"max_lr=1": "interrupted", "max_lr=2": "interrupted"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a parent-death signal is Linux's prctl")
def test_the_runs_of_a_sweep_killed_hard_get_sigterm(fake_trainer, tmp_path):
    folder = tmp_path / "sweep"
    sweep_process = start_sweep(f"--script={fake_trainer}", f"--sweep_dir={folder}", "--max_lr=1")
    try:
        wait_for(folder / "default" / "started")
        sweep_process.kill()  # kill -9: no handler runs
        sweep_process.wait()
        wait_for(folder / "default" / "signalled", timeout=10)
    finally:
        end_processes(sweep_process, folder)
    assert (folder / "default" / "signalled").read_text() == "SIGTERM"  # it checkpoints and stops, not orphaned


def test_a_config_file_is_refused_in_one_line(tmp_path, capsys):
    """Trainers take config files; sweep.py refuses one rather than drop it (as it did) or pass on a path whose
    values it could neither check nor compare on a rerun."""
    config = tmp_path / "small.py"
    config.write_text("n_layer = 2\n")
    assert exit_code(f"--sweep_dir={tmp_path / 'sweep'}", "--dry_run=True", str(config), "--max_lr=1e-3,2e-3") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {config}: ") and err.count("\n") == 1 and "--name=value" in err
    assert not (tmp_path / "sweep").exists()
