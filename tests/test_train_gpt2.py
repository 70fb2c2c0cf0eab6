"""train_gpt2.py end to end on CPU: tiny models on the tests' own char-level play, run as a user runs them."""
import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--micro_batch_size=4",
        "--total_batch_size=256", "--warmup_steps=2", "--max_lr=1e-2", "--min_lr=1e-3", "--eval_interval=0",
        "--hellaswag_interval=0", "--sample_tokens=0", "--log_interval=1", "--checkpoint_interval=0",
        "--compile=False"]


@pytest.fixture
def shakespeare(char_shards):
    """Char-level shards of the tests' own play (tests/corpus.py): 56 characters, 270k train tokens."""
    return char_shards


def train(data_dir, out_dir, *args, torchrun=0, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    cmd = launcher + [os.path.join(REPO, "train_gpt2.py"), f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                      *TINY, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def losses(out_dir):
    return {e["step"]: e["train_loss"] for e in utils.read_log(os.path.join(out_dir, "log.jsonl"))
            if "train_loss" in e}


def weights(out_dir, step):
    return torch.load(os.path.join(out_dir, f"ckpt_{step:06d}.pt"), weights_only=True)["model"]


def test_loss_falls_and_log_and_plot(shakespeare, tmp_path):
    out = tmp_path / "run"
    result = train(shakespeare, out, "--max_steps=40", "--eval_interval=20", "--val_steps=4",
                   "--sample_tokens=16", "--sample_prompt=ROMEO:")
    curve = losses(out)
    assert curve[0] > math.log(39), curve[0]          # starts near uniform over the 56 characters
    assert curve[39] < curve[0] - 1.0, (curve[0], curve[39])
    events = utils.read_log(out / "log.jsonl")
    start = events[0]
    assert start["event"] == "start" and start["settings"]["n_layer"] == 2 and start["torch"] == torch.__version__
    val = [e["val_loss"] for e in events if "val_loss" in e]
    assert len(val) == 3 and val[-1] < val[0]          # steps 0, 20 and the last step
    samples = [e["sample"] for e in events if "sample" in e]
    assert samples and all(s.startswith("ROMEO:") for s in samples)
    for e in events:
        if "train_loss" in e:
            assert {"lr", "grad_norm", "ms_per_step", "tokens_per_sec", "mfu"} <= set(e)
    assert "val loss" in result.stdout and "tok/s" in result.stdout
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "ckpt_000040.pt", weights_only=True)  # the last step always checkpoints
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["step"] == 40 and ckpt["model_config"]["n_embd"] == 32


def test_exact_resume(shakespeare, tmp_path):
    """2N steps in one go == N steps, stop, resume for N more: same losses, identical weights."""
    args = ["--max_steps=8", "--dropout=0.1", "--shuffle=True", "--checkpoint_interval=3"]
    full, split = tmp_path / "full", tmp_path / "split"
    train(shakespeare, full, *args)
    train(shakespeare, split, *args, "--stop_step=4")
    assert max(losses(split)) == 3
    result = train(shakespeare, split, *args, "--resume=True")
    assert "resumed from" in result.stdout and "step 4" in result.stdout
    assert losses(full) == losses(split)               # bit-identical floats, every step 0..7
    for name, tensor in weights(full, 8).items():
        assert torch.equal(tensor, weights(split, 8)[name]), name
    kept = sorted(os.listdir(split))
    assert [k for k in kept if k.startswith("ckpt_")] == ["ckpt_000004.pt", "ckpt_000006.pt", "ckpt_000008.pt"]


def test_gradient_accumulation_equivalence(shakespeare, tmp_path):
    """4 micro-steps of B=2 make the same step as 1 micro-step of B=8: same loss, same weights."""
    a, b = tmp_path / "accum", tmp_path / "whole"
    train(shakespeare, a, "--max_steps=2", "--micro_batch_size=2", "--shuffle=False")
    train(shakespeare, b, "--max_steps=2", "--micro_batch_size=8", "--shuffle=False")
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-5 for k in la)
    for name, tensor in weights(a, 2).items():
        torch.testing.assert_close(tensor, weights(b, 2)[name], rtol=1e-4, atol=1e-5)


def test_ddp_two_processes_match_one(shakespeare, tmp_path):
    """2 gloo processes x B=4 == 1 process x B=4 x 2 accumulation steps (the same global batch)."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(shakespeare, one, "--max_steps=3", "--shuffle=True")
    result = train(shakespeare, two, "--max_steps=3", "--shuffle=True", torchrun=2)
    assert "world 2" in result.stdout
    l1, l2 = losses(one), losses(two)
    assert l1.keys() == l2.keys() and all(abs(l1[k] - l2[k]) < 1e-5 for k in l1), (l1, l2)
    for name, tensor in weights(one, 3).items():
        torch.testing.assert_close(tensor, weights(two, 3)[name], rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shakespeare, tmp_path):
    out = tmp_path / "nan"
    train(shakespeare, out, "--max_steps=4", "--checkpoint_interval=2", "--stop_step=2", "--norm=none")
    good = out / "ckpt_000002.pt"
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    # without norms, an absurd learning rate overflows the activations within a step (EXPERIMENTS.md §2)
    result = train(shakespeare, out, "--max_steps=4", "--checkpoint_interval=2", "--resume=True",
                   "--norm=none", "--max_lr=1e30", "--min_lr=1e30", check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "NaN or inf at step" in result.stderr and "ckpt_000002.pt" in result.stderr
    assert hashlib.sha256(good.read_bytes()).hexdigest() == digest
    assert sorted(p for p in os.listdir(out) if p.startswith("ckpt_")) == ["ckpt_000002.pt"]
    assert any(e.get("event") == "diverged" for e in utils.read_log(out / "log.jsonl"))


def test_bad_batch_and_bad_settings_fail_before_any_work(shakespeare, tmp_path):
    result = train(shakespeare, tmp_path / "b", "--total_batch_size=1000", check=False)
    assert result.returncode != 0 and "1000" in result.stderr and "4 x block_size 32 x world_size 1 = 128" \
        in result.stderr
    result = train(shakespeare, tmp_path / "b", "--learning_rate=1", check=False)
    assert result.returncode == 2 and "max_lr" in result.stderr
    result = train(shakespeare, tmp_path / "b", "--max_steps=ten", check=False)
    assert result.returncode == 2 and "max_steps" in result.stderr
    result = train(shakespeare, tmp_path / "b", "--mlp=swish", check=False)
    assert result.returncode != 0 and "mlp" in result.stderr
    for bad, name in (("--lr_schedule=linear", "lr_schedule"), ("--optimizer=sgd", "optimizer"),
                      ("--micro_batch_size=0", "micro_batch_size"), ("--device=tpu", "device")):
        result = train(shakespeare, tmp_path / "b", bad, check=False)
        assert result.returncode == 2 and f"--{name}" in result.stderr and "Traceback" not in result.stderr, bad
    result = train(str(tmp_path / "nothing"), tmp_path / "b", check=False)
    assert result.returncode != 0 and "prepare_fineweb.py" in result.stderr
    assert not os.path.exists(tmp_path / "b" / "log.jsonl")


def test_resume_with_another_model_config_is_a_clear_error(shakespeare, tmp_path):
    out = tmp_path / "cfg"
    train(shakespeare, out, "--max_steps=1")
    result = train(shakespeare, out, "--max_steps=2", "--n_embd=64", "--resume=True", check=False)
    assert result.returncode != 0 and "different model config" in result.stderr and "n_embd" in result.stderr


@pytest.mark.parametrize("ablation", ["--norm=none", "--norm_pos=post", "--pos_emb=none", "--mlp=silu",
                                      "--optimizer=muon"])
def test_ablations_run_as_overrides(shakespeare, tmp_path, ablation):
    out = tmp_path / "ablation"
    train(shakespeare, out, "--max_steps=6", ablation)
    curve = losses(out)
    assert all(math.isfinite(v) for v in curve.values()) and curve[5] < curve[0]
    assert utils.read_log(out / "log.jsonl")[0]["settings"][ablation[2:].split("=")[0]] == \
        utils.parse_value("x", ablation.split("=")[1], "")


def test_flop_budget_sets_max_steps(shakespeare, tmp_path):
    out = tmp_path / "flops"
    from model import GPT, GPTConfig
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=128)
    per_step = GPT(cfg).flops_per_token() * 256
    train(shakespeare, out, f"--flop_budget={per_step * 5.5}", "--max_steps=1000")
    start = utils.read_log(out / "log.jsonl")[0]
    assert start["settings"]["max_steps"] == 5 and max(losses(out)) == 4


def test_lr_schedule_corners():
    import training

    def lr(step, schedule="cosine", decay_steps=0):  # max_lr 1: the factor is the LR
        return training.lr_factor(step, dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=101,
                                             lr_schedule=schedule, decay_steps=decay_steps))
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)      # linear warmup
    assert lr(10) == pytest.approx(1.0) and lr(100) == pytest.approx(0.1)   # cosine from max to min
    assert lr(55) == pytest.approx(0.55)                                     # halfway: the mean
    assert lr(500) == pytest.approx(0.1)                                     # past the end: min_lr
    assert lr(79, schedule="wsd", decay_steps=20) == pytest.approx(1.0)
    assert lr(90, schedule="wsd", decay_steps=20) == pytest.approx(0.55)
    assert lr(100, schedule="wsd", decay_steps=20) == pytest.approx(0.1)


def test_overrides_parse_to_the_constants_type():
    ns = {"lr": 1e-3, "steps": 10, "flag": False, "name": "x", "budget": None}
    settings = utils.apply_overrides(ns, ["--lr=1", "--steps=1e3", "--flag=true", "--name=None", "--budget=2e18"])
    assert settings == {"lr": 1.0, "steps": 1000, "flag": True, "name": None, "budget": 2e18}
    assert type(settings["lr"]) is float and type(settings["steps"]) is int
    for bad in (["--steps=2.5"], ["--flag=maybe"], ["--nope=1"], ["lr=1"]):
        with pytest.raises(SystemExit) as e:
            utils.apply_overrides(dict(ns), bad)
        assert e.value.code == 2


def test_hellaswag_and_gpt2_samples_inside_training(tmp_path, gpt2_enc):
    """GPT-2 BPE shards (the tests' play) and a HellaSwag file in the real schema: both evaluated in the loop."""
    import corpus
    tokens = np.array(gpt2_enc.encode_ordinary(corpus.play(200_000)), dtype=np.uint16)
    folder = tmp_path / "wiki"
    data.write_shard(data.shard_name(folder, "wiki", "val", 0), tokens[:5000])
    data.write_shard(data.shard_name(folder, "wiki", "train", 1), tokens[5000:])
    data.write_meta(folder, {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256})
    rows = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man stands in a kitchen.", "ctx_b": "he",
             "ctx": "A man stands in a kitchen. he", "split": "val", "split_type": "indomain", "label": i % 4,
             "endings": ["cuts an onion.", "sings a song.", "opens the door.", "falls asleep."],
             "source_id": f"test~{i}"} for i in range(6)]
    hs_file = tmp_path / "hellaswag.jsonl"
    hs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    result = train(folder, out, "--max_steps=2", "--eval_interval=1", "--val_steps=2", "--hellaswag_interval=1",
                   f"--hellaswag_file={hs_file}", "--sample_tokens=5", "--sample_prompt=The")
    events = utils.read_log(out / "log.jsonl")
    scores = [e for e in events if "hellaswag_acc_norm" in e]
    # steps 0 and 1, and after the last update (step 2): the weights the last checkpoint holds
    assert [e["step"] for e in scores] == [0, 1, 2] and all(0 <= e["hellaswag_acc_norm"] <= 1 for e in scores)
    assert "hellaswag acc_norm" in result.stdout and "/6, completion style" in result.stdout
    samples = [e["sample"] for e in events if "sample" in e]
    assert samples and all(s.startswith("The") for s in samples)
    assert utils.read_log(out / "log.jsonl")[0]["settings"]["vocab_size"] == 50304  # 50257 padded to 64


def test_help_prints_usage_and_settings():
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_gpt2.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "torchrun" in result.stdout and "--max_lr=0.0018" in result.stdout
    assert "--optimizer='muon'  # muon | adamw" in result.stdout  # allowed values, from the constant's comment


def test_resume_with_only_out_dir_takes_the_checkpoints_settings(shakespeare, tmp_path):
    """--resume=True --out_dir=X alone continues the run as it was configured; a changed max_steps is kept and
    its effect on the LR is said; a model change and an unsafe change are refused."""
    args = ["--max_steps=6", "--checkpoint_interval=3", "--warmup_steps=0", "--dropout=0.1"]
    full, split = tmp_path / "full", tmp_path / "split"
    train(shakespeare, full, *args)
    train(shakespeare, split, *args, "--stop_step=3")
    bare = [sys.executable, os.path.join(REPO, "train_gpt2.py"), f"--out_dir={split}", "--resume=True"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(bare, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(full) == losses(split)  # the data, model and schedule of the first run, not the defaults
    result = subprocess.run(bare + ["--max_steps=10"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "at step 6 with its settings; max_steps 6 -> 10" in result.stdout
    assert "max_steps 6 -> 10 moves the LR at step 6 from" in result.stdout and max(losses(split)) == 9
    for change, message in (("--n_embd=64", "different model config"), ("--seed=5", "'seed': (1337, 5)")):
        result = subprocess.run(bare + [change], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_nan_never_costs_the_last_good_checkpoint(shakespeare, tmp_path):
    """An absurd LR: the gradient norm turns NaN (the loss may still be finite at that step). The run stops
    with exit 3 before any non-finite checkpoint is written, and names a checkpoint whose weights are finite."""
    for extra in ([], ["--grad_clip=0"], ["--optimizer=adamw"]):
        out = tmp_path / ("nan" + "".join(extra))
        result = train(shakespeare, out, "--max_steps=30", "--checkpoint_interval=1", "--keep_checkpoints=1",
                       "--max_lr=1e6", "--warmup_steps=0", *extra, check=False)
        assert result.returncode == 3, (extra, result.stderr[-2000:])
        named = result.stderr.split("The last good checkpoint is ")[1].split(", left intact")[0]
        kept = sorted(p for p in os.listdir(out) if p.startswith("ckpt_"))
        assert kept and named == str(out / kept[-1]), (named, kept)
        ckpt = torch.load(named, weights_only=True)
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), extra


def test_one_run_per_out_dir(shakespeare, tmp_path):
    out = tmp_path / "locked"
    holder = utils.lock_folder(str(out))  # another run holds the folder (this test process)
    try:
        result = train(shakespeare, out, "--max_steps=2", check=False)
    finally:
        holder.close()
    assert result.returncode == 1 and f"PID {os.getpid()}" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(out / "log.jsonl")
    train(shakespeare, out, "--max_steps=2")  # released: the next run goes ahead


@pytest.mark.parametrize("bad, name", [("--max_lr=-1", "max_lr"), ("--max_lr=nan", "max_lr"),
                                       ("--val_steps=0", "val_steps"), ("--flop_budget=abc", "flop_budget"),
                                       ("--flop_budget=inf", "flop_budget"),
                                       ("--seed=-1", "seed"), ("--eval_interval=-5", "eval_interval"),
                                       ("--beta2=1.5", "beta2"), ("--optimizer=sgd", "optimizer")])
def test_bad_numbers_exit_2_naming_the_setting(shakespeare, tmp_path, bad, name):
    result = train(shakespeare, tmp_path / "b", bad, check=False)
    assert result.returncode == 2 and f"--{name}" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "b")  # refused before any work


def test_damaged_files_are_survived(shakespeare, tmp_path):
    """A truncated newest checkpoint: resume falls back to the newest one that loads. A torn last log line
    (a full disk, a kill): dropped with a warning. An out_dir that cannot be created: one line, exit 1."""
    out = tmp_path / "run"
    train(shakespeare, out, "--max_steps=4", "--checkpoint_interval=2", "--stop_step=4")
    newest = out / "ckpt_000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "train_lo')
    result = train(shakespeare, out, "--max_steps=6", "--checkpoint_interval=2", "--resume=True")
    assert "skipping" in result.stdout and "ckpt_000004.pt" in result.stdout
    assert "resumed from" in result.stdout and "ckpt_000002.pt at step 2" in result.stdout
    assert "torn last line" in result.stderr and max(losses(out)) == 5
    (tmp_path / "file").write_text("x")
    result = train(shakespeare, tmp_path / "file" / "run", "--max_steps=1", check=False)
    assert result.returncode == 1 and "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_gpt2_tokens_train_offline_without_the_tokenizer(tmp_path):
    """Samples and HellaSwag off: a run on GPT-2 BPE shards never needs tiktoken's files (none are here)."""
    tokens = np.random.default_rng(0).integers(0, 50257, 20_000, dtype=np.uint16)
    folder = tmp_path / "gpt2"
    data.write_shard(data.shard_name(folder, "g", "val", 0), tokens[:4000])
    data.write_shard(data.shard_name(folder, "g", "train", 1), tokens[4000:])
    data.write_meta(folder, {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256})
    empty = tmp_path / "no_bpe_files"
    empty.mkdir()
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(empty), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "train_gpt2.py"), f"--data_dir={folder}",
           f"--out_dir={tmp_path / 'out'}", *TINY, "--max_steps=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiktoken" not in result.stdout + result.stderr


def test_start_lines_say_what_the_run_costs(shakespeare, tmp_path):
    result = train(shakespeare, tmp_path / "eta", "--max_steps=5")
    assert "0.03M parameters" in result.stdout and "256 tokens per step" in result.stdout
    assert "s/step: about" in result.stdout and "for the remaining 4 steps" in result.stdout


def test_command_line_forms_and_suggestions(capsys):
    ns = {"max_lr": 1e-3, "max_steps": 10, "optimizer": "muon"}
    assert utils.apply_overrides(dict(ns), ["--max_lr", "3e-3", "--max_steps=20"]) == \
        {"max_lr": 3e-3, "max_steps": 20, "optimizer": "muon"}
    for argv, message in ((["--max_lrr=1"], "did you mean --max_lr?"), (["--max_lr"], "has no value"),
                          (["--optimizer=sgd"], "allowed values are muon, adamw")):
        with pytest.raises(SystemExit) as e:
            utils.apply_overrides(dict(ns), argv, {"optimizer": ("muon", "adamw")})
        assert e.value.code == 2 and message in capsys.readouterr().err


def first_batch_loss(model_fn, data_dir):
    """The loss of a model on the first batch train_gpt2.py trains on (B=4, T=32, shuffled with its seed)."""
    x, y = data.WindowLoader(str(data_dir), "train", 4, 32, shuffle=True, seed=1337).next_batch()
    with torch.no_grad():
        logits = model_fn(x)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item()


def test_fine_tuning_starts_from_gpt2_weights_in_the_classic_layout(shakespeare, tmp_path):
    """--init_from a Hugging Face GPT-2 folder (a small random one, saved here offline): the first step's loss is
    the loaded model's loss on the same batch (computed with transformers itself), in the weights' vocabulary. A
    modern config asked to start from GPT-2's weights is refused, naming the settings."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                                              vocab_size=56))
    hf.save_pretrained(tmp_path / "hf")
    classic = ["--pos_emb=learned", "--mlp=gelu", "--norm=layernorm", "--bias=True"]
    result = train(shakespeare, tmp_path / "tuned", *classic, f"--init_from={tmp_path / 'hf'}", "--max_steps=2",
                   "--total_batch_size=128")
    assert "from " + str(tmp_path / "hf") in result.stdout
    expected = first_batch_loss(lambda x: hf.eval()(x).logits, shakespeare)
    assert losses(tmp_path / "tuned")[0] == pytest.approx(expected, rel=1e-5)
    result = train(shakespeare, tmp_path / "modern", f"--init_from={tmp_path / 'hf'}", "--max_steps=2", check=False)
    assert result.returncode == 2 and "--pos_emb='rope' (the weights: 'learned')" in result.stderr
    assert "--mlp='swiglu'" in result.stderr and "Traceback" not in result.stderr
    result = train(shakespeare, tmp_path / "wide", *classic, "--n_embd=64", f"--init_from={tmp_path / 'hf'}",
                   "--max_steps=2", check=False)
    assert result.returncode == 2 and "--n_embd=64 (the weights: 32)" in result.stderr


def test_init_from_a_checkpoint_takes_its_weights_only(shakespeare, tmp_path):
    """Another run's checkpoint as initial weights: step 0, a fresh optimizer and schedule, the same model."""
    from model import GPT, GPTConfig
    train(shakespeare, tmp_path / "a", "--max_steps=3")
    ckpt = torch.load(tmp_path / "a" / "ckpt_000003.pt", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    train(shakespeare, tmp_path / "b", f"--init_from={tmp_path / 'a' / 'ckpt_000003.pt'}", "--max_steps=2",
          "--total_batch_size=128")
    assert losses(tmp_path / "b")[0] == pytest.approx(first_batch_loss(lambda x: model.eval()(x, x)[0], shakespeare),
                                                      rel=1e-5)
    result = train(shakespeare, tmp_path / "c", f"--init_from={tmp_path / 'a' / 'ckpt_000003.pt'}", "--n_layer=3",
                   "--max_steps=2", check=False)
    assert result.returncode == 2 and "--n_layer=3 (the weights: 2)" in result.stderr


def test_loss_plot_is_labelled_where_the_curves_are(tmp_path, monkeypatch):
    """A final loss of 1.4-1.6 can be read off loss.png: the log axis is labelled inside the data's range, not
    only at 2, 3, 4, 5; the noisy train curve is drawn smoothed (a moving average) over the raw one."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    log = tmp_path / "log.jsonl"
    curve = [1.45 + 2.8 * math.exp(-s / 60) + 0.05 * math.sin(s) for s in range(400)]
    log.write_text("".join(json.dumps({"step": s, "train_loss": v}) + "\n" for s, v in enumerate(curve)))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert utils.plot_log(str(log), str(tmp_path / "loss.png")) == str(tmp_path / "loss.png")
    ax = figures[0].axes[0]
    figures[0].canvas.draw()
    low, high = min(curve), max(curve)
    labels = [float(t.get_text()) for t in ax.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high]
    assert len(labels) >= 4 and any(v < 2 for v in labels), labels  # 1.5 is labelled
    raw, smooth = ax.get_lines()[:2]
    assert smooth.get_label() == "train_loss (smoothed)" and np.std(np.diff(smooth.get_ydata()[200:])) < \
        0.2 * np.std(np.diff(raw.get_ydata()[200:]))
    matplotlib.pyplot.close("all")


def test_torchrun_with_more_processes_than_gpus_is_one_line_once(monkeypatch, capsys):
    """torchrun --nproc_per_node=8 on a machine with 2 GPUs: rank 0 says it in one line, the others exit quietly
    (8 copies of a CUDA 'invalid device ordinal' traceback before)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device ran"))
    for rank in (0, 5):
        monkeypatch.setattr(os, "environ", dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="8",
                                                LOCAL_WORLD_SIZE="8"))
        with pytest.raises(SystemExit) as e:
            utils.setup_distributed("cuda")
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == ("error: torchrun --nproc_per_node=8, but this machine has 2 GPUs: one process per GPU\n"
                       if rank == 0 else "")


def test_ddp_does_not_broadcast_the_rope_tables(tmp_path):
    """DDP's broadcast_buffers sent rank 0's RoPE tables to every rank every step; they are derived from the config
    on every rank: the wrapped model does not broadcast buffers."""
    import torch.distributed as dist

    import training
    from model import GPT, GPTConfig
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = training.wrap(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)),
                              False, 2, "cpu")
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        assert not getattr(model, "forward_sync_buffers", model.broadcast_buffers)  # torch 2.13 / older
    finally:
        dist.destroy_process_group()
