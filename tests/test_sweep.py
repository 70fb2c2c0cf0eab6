"""sweep.py: a tiny LR sweep of train_gpt2.py with one diverging point, resume, the FLOP-budget random search,
the results table and plots. Trainer runs are real subprocesses on char-level Tiny Shakespeare shards.

sweep.main runs in this process (reloaded each time, as its settings are module globals), which saves a torch
import per sweep; the runs it launches are subprocesses as in real use.
"""
import csv
import importlib
import json
import math
import os

import numpy as np
import pytest

import data
import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
# a ~6k-parameter model, no HellaSwag, no samples; eval at the first and last step
TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--micro_batch_size=8",
        "--hellaswag_interval=0", "--sample_tokens=0", "--val_steps=2", "--log_interval=5",
        "--checkpoint_interval=0", "--eval_interval=1000"]
LR_GRID = ["--max_lr=1e-2,3e-3,1e6", "--min_lr=1e-4", "--max_steps=30", "--warmup_steps=3"]  # 1e6: NaN at step 2


def run_sweep(*argv):
    """sweep.py's main, with its settings fresh from the file."""
    importlib.reload(sweep)
    sweep.main(list(argv))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    if not os.path.exists(TEXT):
        pytest.skip(f"{TEXT} is not there")
    with open(TEXT) as f:
        text = f.read()
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    split = int(0.9 * len(ids))
    folder = str(tmp_path_factory.mktemp("shakespeare_char"))
    data.write_shard(data.shard_name(folder, "shakespeare", "train", 0), ids[:split], len(itos))
    data.write_shard(data.shard_name(folder, "shakespeare", "val", 0), ids[split:], len(itos))
    data.write_meta(folder, {"tokenizer": "char", "vocab_size": len(itos), "itos": itos, "unk": None, "eot": None})
    return folder


@pytest.fixture(scope="module")
def one_thread_runs():
    with pytest.MonkeyPatch.context() as mp:  # the runs share 2 busy cores: one thread each
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def lr_sweep(shards, one_thread_runs, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lr_sweep"))
    run_sweep(f"--sweep_dir={folder}", "--parallel=2", f"--data_dir={shards}", *TINY, *LR_GRID)
    return folder


def read_csv(folder):
    with open(os.path.join(folder, "results.csv")) as f:
        return list(csv.DictReader(f))


def events(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_lr_sweep_table_states_and_falling_loss(lr_sweep):
    rows = read_csv(lr_sweep)
    assert [r["run"] for r in rows][2] == "max_lr=1e6" and len(rows) == 3
    states = {r["run"]: r["state"] for r in rows}
    assert states == {"max_lr=1e-2": "finished", "max_lr=3e-3": "finished", "max_lr=1e6": "diverged"}
    diverged = os.path.join(lr_sweep, "max_lr=1e6")
    assert json.load(open(os.path.join(diverged, "run.json")))["exit_code"] == 3
    assert any(e.get("event") == "diverged" for e in events(diverged))
    for row in rows[:2]:  # finished: the train and val loss fell, and the table holds the best val loss
        log = events(os.path.join(lr_sweep, row["run"]))
        train = [e["train_loss"] for e in log if "train_loss" in e]
        val = [e["val_loss"] for e in log if "val_loss" in e]
        assert train[-1] < train[0] - 0.3 and val[-1] < val[0] - 0.3
        assert float(row["best_val_loss"]) == pytest.approx(min(val))
        assert float(row["val_ppl"]) == pytest.approx(math.exp(min(val)))
        assert int(row["tokens"]) == 30 * 8 * 16 and int(row["params"]) > 0
    assert float(rows[0]["best_val_loss"]) <= float(rows[1]["best_val_loss"])  # sorted by val loss
    table = open(os.path.join(lr_sweep, "results.md")).read().splitlines()
    assert len(table) == 2 + 3 and "diverged" in table[-1]


def test_plots_written(lr_sweep):
    pytest.importorskip("matplotlib")
    for name in ("val_loss_vs_lr.png", "val_loss_vs_batch.png", "train_loss.png"):
        with open(os.path.join(lr_sweep, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_launches_nothing_then_retry_relaunches_only_the_failed(lr_sweep, shards, capsys):
    def snapshot():
        return {d: (os.stat(os.path.join(lr_sweep, d, "stdout.log")).st_mtime_ns,
                    open(os.path.join(lr_sweep, d, "run.json")).read())
                for d in ("max_lr=1e-2", "max_lr=3e-3", "max_lr=1e6")}
    before = snapshot()
    capsys.readouterr()
    run_sweep(f"--sweep_dir={lr_sweep}", "--parallel=2", f"--data_dir={shards}", *TINY, *LR_GRID)
    assert "0 runs to launch" in capsys.readouterr().out and snapshot() == before and len(read_csv(lr_sweep)) == 3
    run_sweep(f"--sweep_dir={lr_sweep}", f"--data_dir={shards}", "--retry_failed=True", *TINY, *LR_GRID)
    assert "1 runs to launch" in capsys.readouterr().out
    after = snapshot()
    assert after["max_lr=1e-2"] == before["max_lr=1e-2"] and after["max_lr=3e-3"] == before["max_lr=3e-3"]
    assert after["max_lr=1e6"][0] != before["max_lr=1e6"][0]
    assert {r["run"]: r["state"] for r in read_csv(lr_sweep)}["max_lr=1e6"] == "diverged"
    # a different fixed override would mix two sweeps in one table: refused
    with pytest.raises(SystemExit) as e:
        run_sweep(f"--sweep_dir={lr_sweep}", f"--data_dir={shards}", *TINY, *LR_GRID, "--weight_decay=0")
    assert e.value.code == 2


def test_report_only_redraws_the_table(lr_sweep):
    os.remove(os.path.join(lr_sweep, "results.md"))
    run_sweep("--report_only=True", f"--sweep_dir={lr_sweep}")
    assert len(open(os.path.join(lr_sweep, "results.md")).read().splitlines()) == 5


def test_flop_budget_random_search(shards, one_thread_runs, tmp_path):
    budget = 3e8
    run_sweep("--mode=random", f"--sweep_dir={tmp_path}", f"--flop_budget={budget:g}", "--n_samples=2",
              "--random_seed=3", "--n_layer_lo=1", "--n_layer_hi=2", "--n_head_lo=2", "--n_head_hi=3",
              "--n_embd_lo=16", "--n_embd_hi=32", "--seq_len_lo=16", "--seq_len_hi=32", "--batch_lo=4",
              "--batch_hi=8", "--min_lr_lo=1e-3", "--min_lr_hi=3e-3", f"--data_dir={shards}",
              *[a for a in TINY if a.split("=")[0] not in ("--n_layer", "--n_head", "--n_embd", "--block_size",
                                                           "--micro_batch_size")])
    records = {d: json.load(open(tmp_path / d / "run.json")) for d in os.listdir(tmp_path) if (tmp_path / d).is_dir()}
    skipped = [r for r in records.values() if r["state"] == "skipped"]
    finished = [r for r in records.values() if r["state"] == "finished"]
    assert len(finished) == 2 and len(skipped) >= 1 and len(records) == len(finished) + len(skipped)
    for r in skipped:  # rejected before launch: nothing ran
        ov = r["overrides"]
        assert int(ov["n_embd"]) % int(ov["n_head"]) and "does not divide" in r["reason"]
        assert os.listdir(tmp_path / r["name"]) == ["run.json"]
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
        assert s["n_embd"] % s["n_head"] == 0 and 1 <= s["n_layer"] <= 2
    assert len(read_csv(tmp_path)) == len(records) and read_csv(tmp_path)[-1]["state"] == "skipped"


def test_lr_scaling_and_batch_points():
    importlib.reload(sweep)
    defaults = {"micro_batch_size": 32, "block_size": 1024, "total_batch_size": 524288, "max_lr": 1e-3, "min_lr": 1e-4}
    ov = sweep.with_batch_and_lr({"micro_batch_size": "128", "max_lr": "2e-3"}, defaults, "sqrt", 32)
    assert ov["total_batch_size"] == str(128 * 1024)  # a batch point without accumulation
    assert float(ov["max_lr"]) == pytest.approx(2e-3 * math.sqrt(128 / 32), rel=1e-3)
    assert float(ov["min_lr"]) == pytest.approx(1e-4 * 2, rel=1e-3)
    ov = sweep.with_batch_and_lr({"total_batch_size": "16384", "block_size": "64"}, defaults, "linear", 128)
    assert float(ov["max_lr"]) == pytest.approx(1e-3 * 2) and "micro_batch_size" not in ov
    assert sweep.with_batch_and_lr({"max_lr": "1e-3"}, defaults, "none", 128) == {"max_lr": "1e-3"}
    sweep.min_lr_ratio = 0.1  # min_lr follows the (scaled) max_lr
    ov = sweep.with_batch_and_lr({"micro_batch_size": "128", "max_lr": "2e-3"}, defaults, "sqrt", 32)
    assert float(ov["min_lr"]) == pytest.approx(0.1 * float(ov["max_lr"]), rel=1e-3)


def test_ablation_set_and_names():
    importlib.reload(sweep)
    defaults = {"max_lr": 1e-3, "norm": "rmsnorm", "norm_pos": "pre", "pos_emb": "rope", "mlp": "swiglu", "seed": 1}
    runs = sweep.plan_grid({"seed": "7"}, {"max_lr": ["1e-3", "2e-3"]}, defaults, sweep.ABLATIONS)
    names = {r["name"]: r["overrides"] for r in runs}
    assert len(runs) == 10 and names["no_rmsnorm_max_lr=2e-3"] == {"seed": "7", "norm": "none", "max_lr": "2e-3"}
    assert names["baseline_max_lr=1e-3"] == {"seed": "7", "max_lr": "1e-3"}
    assert {names[f"{a}_max_lr=1e-3"].get(k) for a, k in (("post_norm", "norm_pos"), ("no_rope", "pos_emb"),
                                                            ("silu_ffn", "mlp"))} == {"post", "none", "silu"}
    name = sweep.run_name({"data_dir": "/a b/c", "max_lr": "1e-3"})
    assert "/" not in name and " " not in name
    assert len(sweep.run_name({f"k{i}": "x" * 20 for i in range(10)})) <= 80


def test_classify_states(tmp_path):
    importlib.reload(sweep)

    def state(rc, stdout="", log=()):
        run_dir = tmp_path / f"r{len(os.listdir(tmp_path))}"
        run_dir.mkdir()
        (run_dir / "stdout.log").write_text(stdout)
        (run_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log) + '{"step": 9, "trunc')
        return sweep.classify(rc, str(run_dir), exit_diverged=3)
    assert state(0) == "finished" and state(3) == "diverged" and state(-2) == "interrupted"
    assert state(1, log=[{"event": "diverged", "step": 4}]) == "diverged"
    assert state(1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") == "oom"
    assert state(1, "Traceback ...\nValueError: bad") == "failed" and state(-9) == "failed"


def test_unknown_trainer_setting_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        run_sweep("--sweep_dir=/nonexistent/never", "--max_lr=1e-3,2e-3", "--no_such_setting=3")
    assert e.value.code == 2 and "no_such_setting" in capsys.readouterr().err
