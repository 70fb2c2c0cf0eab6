"""train_lstm.py and the recurrent models of model.py: persistent states, slow levels, exact resume and resume
with the checkpoint's settings, DDP, char level, and the reliability of a run (NaN, lock, bad input).

Runs of train_lstm.py happen in this process (runpy, fresh module globals each time) except the DDP one,
which needs torchrun. Every model is tiny; the data are synthetic shards written here or the tests' own
char-level play (conftest's char_shards); WikiText-2's valid.txt, when ../shared has it, only adds coverage.
"""
import collections
import math
import os
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

import corpus
import data
import train_lstm
import training
import utils
from model import LSTMConfig, build_recurrent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "train_lstm.py")
TINY = ["--device=cpu", "--dtype=float32", "--n_embd=16", "--n_hidden=32", "--n_layer=1", "--ffn_hidden=16",
        "--log_interval=1", "--checkpoint_interval=0", "--warmup_steps=2", "--max_lr=1e-2", "--min_lr=1e-3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(folder, train, val, vocab_size, tokenizer="synthetic"):
    data.write_shard(os.path.join(folder, f"t_train_{0:06d}.bin"), np.asarray(train), vocab_size)
    data.write_shard(os.path.join(folder, f"t_val_{0:06d}.bin"), np.asarray(val), vocab_size)
    data.write_meta(folder, {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot": None, "itos": None})
    return str(folder)


def random_data(folder, seed, n_train=3000, n_val=600, vocab_size=9):
    rng = np.random.default_rng(seed)
    return make_data(folder, rng.integers(0, vocab_size, n_train), rng.integers(0, vocab_size, n_val), vocab_size)


def run_script(*args):
    """Run train_lstm.py in this process with --name=value args (fresh module globals every time)."""
    old = sys.argv
    sys.argv = [SCRIPT, *args]
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        sys.argv = old


def train(*args):
    """run_script, returning the exit status: 0 = finished, 1 = SystemExit with a message, else its code."""
    try:
        run_script(*args)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def failure(*args):
    """(exit status, message) of a run that must fail: a SystemExit's text or, for sys.exit(n), stderr's."""
    try:
        run_script(*args)
    except SystemExit as e:
        return (e.code, None) if isinstance(e.code, int) else (1, str(e.code))
    raise AssertionError("the run did not fail")


def train_losses(out_dir):
    return {e["step"]: e["train_loss"] for e in utils.read_log(os.path.join(out_dir, "log.jsonl"))
            if "train_loss" in e}


def lrs(out_dir):
    return {e["step"]: e["lr"] for e in utils.read_log(os.path.join(out_dir, "log.jsonl")) if "lr" in e}


def evals(out_dir):
    return [e for e in utils.read_log(os.path.join(out_dir, "log.jsonl")) if "val_loss" in e]


def ckpt(out_dir, step):
    return utils.load_checkpoint(os.path.join(out_dir, f"ckpt_{step:06d}.pt"))


def finite(checkpoint):
    return all(torch.isfinite(t).all() for t in checkpoint["model"].values())


# -----------------------------------------------------------------------------
# the models and the training step


@pytest.mark.parametrize("name", ["lstm", "nested_lstm", "context_vector"])
def test_reset_token_is_exact_per_token(name):
    """forward(..., reset_token=r) equals feeding one token at a time and zeroing the state before each r."""
    torch.manual_seed(0)
    cfg = LSTMConfig(model=name, vocab_size=11, n_embd=8, n_hidden=12, n_layer=2, ffn_hidden=8, context_dim=6,
                     chunk_sizes=(1, 2), surprise_weights=(0.1,))
    model = build_recurrent(cfg).eval()
    idx = torch.randint(0, 10, (3, 9))
    idx[0, 3], idx[1, 3], idx[2, 6], idx[0, 0] = 10, 10, 10, 10  # reset token 10 at shared and lone columns
    state0 = tuple(torch.randn_like(s) for s in model.init_state(3, "cpu"))
    logits, _, state, _ = model(idx, state=state0, reset_token=10)
    ref_state, ref_logits = state0, []
    for t in range(idx.size(1)):
        keep = (idx[:, t] != 10).float().view(1, -1, 1)
        out, _, ref_state, _ = model(idx[:, t:t + 1], state=tuple(s * keep for s in ref_state))
        ref_logits.append(out)
    torch.testing.assert_close(logits, torch.cat(ref_logits, 1), rtol=1e-5, atol=1e-5)
    for a, b in zip(state, ref_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    no_reset, _, _, _ = model(idx, state=state0)
    assert not torch.allclose(no_reset, logits)  # the resets did something


def test_persistent_state_learns_across_batch_boundaries(tmp_path):
    """A fixed random sequence of period 37 repeated: with block_size 4 the first targets of every window
    need the tokens of the previous window, so carried states reach a far lower loss than states zeroed
    at every batch (train and eval)."""
    period = np.random.default_rng(0).integers(0, 12, size=37)
    data_dir = make_data(tmp_path, np.tile(period, 60), np.tile(period, 40)[5:], 12)
    common = [f"--data_dir={data_dir}", *TINY, "--model=lstm", "--n_hidden=48", "--micro_batch_size=8",
              "--block_size=4", "--max_steps=200", "--eval_interval=1000", "--lr_schedule=constant",
              "--log_interval=50"]
    losses = {}
    for carry in (True, False):
        out = str(tmp_path / f"carry{carry}")
        assert train(*common, f"--out_dir={out}", f"--carry_state={carry}") == 0
        losses[carry] = evals(out)[-1]["val_loss"]
    # reset floor: the first target of a window follows one token (each symbol occurs ~3 times in the
    # period: ~log 3 nats), the second two: about (1.1 + 0.2) / 4 = 0.33 nats per token. Measured: 0.04 vs 0.36
    assert losses[True] < 0.15, losses
    assert losses[False] > 0.3, losses


def test_slow_levels_step_every_chunk_with_scaled_lr(tmp_path):
    """Level k's parameters move only after steps 2, 5 (C=3) / 3, 7 (C=4); the first move is max_lr / C per
    element (Adam's first step), and it follows the sum of the chunk's gradients (recomputed here)."""
    rng = np.random.default_rng(1)
    data_dir = make_data(tmp_path, rng.integers(0, 9, 4000), rng.integers(0, 9, 500), 9)
    out = str(tmp_path / "out")
    lr = 1e-2
    assert train(f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--model=nested_lstm", "--chunk_sizes=1,3,4",
                 "--surprise_weights=0.5,0.2", "--micro_batch_size=4", "--block_size=6", "--max_steps=8",
                 "--checkpoint_interval=1", "--keep_checkpoints=0", "--eval_interval=1000", "--optimizer=adam",
                 "--lr_schedule=constant", "--warmup_steps=0", f"--max_lr={lr}", "--weight_decay=0",
                 "--grad_clip=0") == 0
    torch.manual_seed(1337)  # the script's init, rebuilt independently
    first = ckpt(out, 1)
    cfg = LSTMConfig(**first["model_config"])
    init = build_recurrent(cfg).state_dict()
    weights = [init] + [ckpt(out, s)["model"] for s in range(1, 9)]
    for k, chunk, moves in ((1, 3, {2, 5}), (2, 4, {3, 7})):
        names = [n for n in init if n.startswith(f"levels.{k - 1}.")]
        for step in range(8):
            moved = any(not torch.equal(weights[step][n], weights[step + 1][n]) for n in names)
            assert moved == (step in moves), (k, step)
        first_move = chunk - 1
        delta = torch.cat([(weights[first_move + 1][n] - weights[first_move][n]).flatten() for n in names])
        assert abs(delta.abs().max().item() - lr / chunk) < 1e-3 * lr / chunk
    assert all(not torch.equal(weights[s]["lstm.weight_hh_l0"], weights[s + 1]["lstm.weight_hh_l0"]) for s in range(8))

    # level 3's chunk sum: the grads of steps 0-2 saved in ckpt 3 + step 3's grads recomputed here = m / (1 - b1)
    before, after = ckpt(out, 3), ckpt(out, 4)
    model = build_recurrent(cfg)
    model.load_state_dict(before["model"])
    loader = data.StreamLoader(data_dir, "train", 4, 6, vocab_size=9)
    loader.load_state_dict(before["loader"])
    x, y, _ = loader.next_batch()
    _, loss, _, aux = model(x, y, state=tuple(before["state"]))
    (loss + sum(w * aux[n] for n, w in model.aux_weights.items())).backward()
    params = list(model.levels[1].parameters())
    saved = before["slow_grads"][1]
    assert any(s.abs().sum() > 0 for s in saved)  # the partial sum really is in the checkpoint
    exp_avg = after["optimizers"][2]["state"]
    ids = after["optimizers"][2]["param_groups"][0]["params"] + after["optimizers"][2]["param_groups"][1]["params"]
    by_id = {i: exp_avg[i]["exp_avg"] for i in ids}
    decay = [p for p in params if p.dim() >= 2] + [p for p in params if p.dim() < 2]  # the trainer's group order
    order = [next(j for j, q in enumerate(params) if q is p) for p in decay]
    for i, j in zip(ids, order, strict=True):
        expected = saved[j] + params[j].grad
        torch.testing.assert_close(by_id[i] / 0.1, expected, rtol=1e-4, atol=1e-7)
    assert all(g.abs().sum() == 0 for g in after["slow_grads"][1])  # emptied after its step


def test_float16_overflow_stays_out_of_the_slow_sums_without_a_host_sync(monkeypatch):
    """add_to_chunk_sums: a step whose gradients overflowed (in a slow level or in level 1) adds nothing to
    any slow level's sum, a finite step adds its gradients, and the check stays on the device: no bool(),
    item() or tolist() of a tensor while it runs."""
    levels = [[torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))],
              [torch.nn.Parameter(torch.zeros(4))]]
    sums = [[torch.zeros_like(p) for p in params] for params in levels]
    expected = [[torch.zeros_like(p) for p in params] for params in levels]
    cases = [(1.0, 1.0, True), (float("inf"), 1.0, False), (1.0, float("inf"), False), (2.0, 1.0, True)]
    for slow_value, fast_value, adds in cases:
        grads = [[torch.full_like(p, slow_value) for p in params] for params in levels]
        grads[0][0][1] = 0.5  # not all equal, so the norm below is not just a count
        for params, gs in zip(levels, grads, strict=True):
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
        with monkeypatch.context() as m:
            for name in ("__bool__", "item", "tolist"):
                m.setattr(torch.Tensor, name, lambda *a: pytest.fail("host sync"))
            norm = train_lstm.add_to_chunk_sums(levels, sums, torch.tensor(fast_value), skip_overflow=True)
        naive = fast_value + math.sqrt(sum(float((g.double() ** 2).sum()) for gs in grads for g in gs))
        assert (math.isinf(naive) and math.isinf(norm.item())) or math.isclose(norm.item(), naive, rel_tol=1e-6)
        if adds:
            expected = [[e + g for e, g in zip(es, gs, strict=True)] for es, gs in zip(expected, grads, strict=True)]
        for es, ss in zip(expected, sums, strict=True):
            for e, s in zip(es, ss, strict=True):
                assert torch.equal(e, s), (slow_value, fast_value)
        assert all(p.grad is None for params in levels for p in params)  # cleared for the next step


# -----------------------------------------------------------------------------
# resume: exact, with the checkpoint's settings, and what it refuses


def test_exact_resume_mid_chunk(tmp_path):
    """8 steps straight vs stop before step 4 (mid-chunk for C=3 and C=5) + resume: identical losses,
    identical weights, states and val metrics; dropout on, so the RNG must be restored too."""
    rng = np.random.default_rng(2)
    data_dir = make_data(tmp_path, rng.integers(0, 9, 3000), rng.integers(0, 9, 600), 9)
    common = [f"--data_dir={data_dir}", *TINY, "--model=nested_lstm", "--chunk_sizes=1,3,5", "--n_layer=2",
              "--dropout=0.1", "--micro_batch_size=3", "--block_size=5", "--max_steps=8", "--eval_interval=3",
              "--reset_on_eot=True", "--eot_token=0"]  # token 0 as EOT: states zeroed mid-window too
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train(*common, f"--out_dir={a}") == 0
    assert train(*common, f"--out_dir={b}", "--stop_step=4") == 0
    assert sorted(train_losses(b)) == [0, 1, 2, 3]
    assert any(g.abs().sum() > 0 for g in ckpt(b, 4)["slow_grads"][1])  # a chunk half accumulated
    assert train(*common, f"--out_dir={b}", "--resume=True") == 0
    assert train_losses(a) == train_losses(b) and len(train_losses(a)) == 8
    assert evals(a) == evals(b)
    ca, cb = ckpt(a, 8), ckpt(b, 8)
    for name in ca["model"]:
        assert torch.equal(ca["model"][name], cb["model"][name]), name
    for sa, sb in zip(ca["state"], cb["state"], strict=True):
        assert torch.equal(sa, sb)


def test_resume_with_only_out_dir_goes_on_with_the_checkpoints_settings(tmp_path):
    """Stop before step 4, then resume with nothing but --out_dir and --resume: the run takes every setting
    from its checkpoint (model, streams, LR, device, intervals), so it matches a straight run exactly."""
    data_dir = random_data(tmp_path / "data", 5)
    common = [f"--data_dir={data_dir}", *TINY, "--model=lstm", "--n_layer=2", "--dropout=0.1",
              "--micro_batch_size=3", "--block_size=5", "--max_steps=8", "--eval_interval=3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train(*common, f"--out_dir={a}") == 0
    assert train(*common, f"--out_dir={b}", "--stop_step=4") == 0
    assert train(f"--out_dir={b}", "--resume=True") == 0
    assert train_losses(a) == train_losses(b) and len(train_losses(a)) == 8
    assert evals(a) == evals(b)
    ca, cb = ckpt(a, 8), ckpt(b, 8)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    first, resumed = [e for e in utils.read_log(os.path.join(b, "log.jsonl")) if e.get("event") == "start"]
    assert resumed["settings"] == {**first["settings"], "resume": True, "stop_step": -1}


def test_resume_refuses_a_change_of_model_streams_or_data(tmp_path, capsys):
    data_dir = random_data(tmp_path / "data", 6)
    other_data = random_data(tmp_path / "other", 7)
    out = str(tmp_path / "out")
    common = [*TINY, "--model=lstm", "--micro_batch_size=3", "--block_size=5", "--max_steps=6", "--eval_interval=1000"]
    assert train(f"--data_dir={data_dir}", f"--out_dir={out}", *common, "--stop_step=3") == 0
    for change in ("--n_hidden=48", "--model=context_vector", "--micro_batch_size=4", "--block_size=4",
                   f"--data_dir={other_data}", "--seed=1"):
        capsys.readouterr()
        assert train(f"--out_dir={out}", "--resume=True", change) == 2, change
        err = capsys.readouterr().err
        assert err.startswith("error: ") and change[2:].split("=")[0] in err and len(err.splitlines()) == 1, err
    assert train(f"--out_dir={out}", "--resume=True", "--eval_interval=2") == 0  # a safe change is kept
    assert sorted(train_losses(out)) == list(range(6))
    assert [e["step"] for e in evals(out)] == [0, 4, 6]


def test_resume_says_when_a_new_max_steps_moves_the_lr(tmp_path, capsys):
    """Raising max_steps on resume stretches the cosine: one line says how the LR at the resume step moves
    (the figures checked against the cosine written here), and the run goes on under the new schedule."""
    data_dir = random_data(tmp_path / "data", 8)
    out = str(tmp_path / "out")
    assert train(f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--model=lstm", "--micro_batch_size=2",
                 "--block_size=4", "--max_steps=8", "--eval_interval=1000", "--stop_step=4") == 0
    capsys.readouterr()
    assert train(f"--out_dir={out}", "--resume=True", "--max_steps=16") == 0
    printed = capsys.readouterr().out

    def cosine(step, max_steps, warmup=2, high=1e-2, low=1e-3):  # TINY's schedule
        return low + 0.5 * (high - low) * (1 + math.cos(math.pi * (step - warmup) / (max_steps - 1 - warmup)))
    old, new = cosine(4, 8), cosine(4, 16)
    assert new > old * 1.3
    assert f"max_steps 8 -> 16 moves the LR at step 4 from {old:.3e} to {new:.3e}" in printed, printed
    logged = lrs(out)
    assert math.isclose(logged[3], cosine(3, 8)) and math.isclose(logged[4], new) and math.isclose(logged[15], 1e-3)


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    data_dir = random_data(tmp_path / "data", 9)
    common = [f"--data_dir={data_dir}", *TINY, "--model=lstm", "--micro_batch_size=3", "--block_size=5",
              "--max_steps=6", "--eval_interval=1000", "--checkpoint_interval=2", "--keep_checkpoints=0"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train(*common, f"--out_dir={a}") == 0
    assert train(*common, f"--out_dir={b}", "--stop_step=4") == 0
    newest = os.path.join(b, "ckpt_000004.pt")
    os.truncate(newest, os.path.getsize(newest) // 2)  # a full disk, say
    capsys.readouterr()
    assert train(f"--out_dir={b}", "--resume=True") == 0
    printed = capsys.readouterr().out
    assert re.search(r"skipping .*ckpt_000004\.pt", printed) and "ckpt_000002.pt at step 2" in printed, printed
    assert train_losses(a) == train_losses(b) and len(train_losses(b)) == 6
    assert finite(ckpt(b, 4)) and ckpt(b, 6)["step"] == 6  # rewritten whole on the way


# -----------------------------------------------------------------------------
# DDP and real training


def test_ddp_two_ranks_match_one_process(tmp_path):
    """torchrun 2 x gloo with 2 streams each == one process with the same 4 global streams: same losses,
    same gathered states (each rank ran its own streams r*2..r*2+1 on its own device)."""
    rng = np.random.default_rng(3)
    data_dir = make_data(tmp_path, rng.integers(0, 9, 3000), rng.integers(0, 9, 600), 9)
    common = [f"--data_dir={data_dir}", *TINY, "--model=nested_lstm", "--chunk_sizes=1,2", "--surprise_weights=0.1",
              "--block_size=6", "--max_steps=5", "--eval_interval=1000"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train(*common, f"--out_dir={one}", "--micro_batch_size=4") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          SCRIPT, *common, f"--out_dir={two}", "--micro_batch_size=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    start = [e for e in utils.read_log(os.path.join(two, "log.jsonl")) if e.get("event") == "start"][0]
    assert start["world_size"] == 2
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == sorted(l2) == list(range(5))
    for s in l1:
        assert math.isclose(l1[s], l2[s], rel_tol=1e-5), (s, l1[s], l2[s])
    for s1, s2 in zip(ckpt(one, 5)["state"], ckpt(two, 5)["state"], strict=True):
        assert s2.shape[1] == 4
        torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-5)
    assert math.isclose(evals(one)[-1]["val_loss"], evals(two)[-1]["val_loss"], rel_tol=1e-5)


def test_char_level_bpc_falls_and_the_start_line_says_what_it_costs(tmp_path, char_shards, capsys):
    """The tests' own play at char level: 120 steps of a tiny nested LSTM take val bits per character from the
    uniform guess to well below the entropy of the play's letter frequencies (computed here: the model uses
    context), and the train loss falls. The run says at once how big it is (parameters, tokens per step)
    and, after its first steps, how long the whole run will take."""
    out = str(tmp_path / "out")
    assert train(f"--data_dir={char_shards}", f"--out_dir={out}", *TINY, "--n_hidden=64", "--chunk_sizes=1,4,16",
                 "--micro_batch_size=16", "--block_size=32", "--max_steps=120", "--eval_interval=40",
                 "--val_steps=20", "--max_lr=2e-2", "--log_interval=10") == 0
    text = corpus.play(300_000)  # what char_shards holds: 90% train, 10% val
    split = int(0.9 * len(text))
    counts = collections.Counter(text[:split])
    unigram_bits = -sum(math.log2(counts[c] / split) for c in text[split:]) / (len(text) - split)
    bpc = [e["val_bpc"] for e in evals(out)]
    assert [e["step"] for e in evals(out)] == [0, 40, 80, 120]
    assert abs(bpc[0] - math.log2(data.read_meta(char_shards)["vocab_size"])) < 0.3  # a near-uniform guess
    assert bpc[3] < bpc[2] < bpc[1] < bpc[0] and bpc[3] < unigram_bits - 1.0, (bpc, unigram_bits)
    losses = train_losses(out)
    assert losses[119] < losses[0] - 1.5
    printed = capsys.readouterr().out
    params = sum(t.numel() for t in ckpt(out, 120)["model"].values())  # no tied weights here
    assert printed.startswith(f"nested_lstm: {params:,} parameters | 512 tokens per step"), printed[:200]
    lines = printed.splitlines()
    estimate = next(k for k, line in enumerate(lines) if "s/step: about" in line)  # after the first step
    assert re.fullmatch(r"step      0 \| \d+\.\d\d s/step: about \d+ (s|min) for the remaining 119 steps "
                        r"\(evaluations not counted\)", lines[estimate]), lines[estimate]


def test_char_level_wikitext_bpc_falls(tmp_path, shared_dir):
    """Extra coverage on a real corpus: prepare_wikitext.py's char shards of WikiText-2 valid.txt (90/10)."""
    text = os.path.join(shared_dir, "data", "wikitext-2", "valid.txt")
    if not os.path.exists(text):
        pytest.skip(f"{text} is missing")
    data_dir = str(tmp_path / "wt2_char")
    prep = subprocess.run([sys.executable, os.path.join(REPO, "prepare_wikitext.py"), f"--text_file={text}",
                           "--tokenizer=char", f"--out_dir={data_dir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-2000:]
    out = str(tmp_path / "out")
    assert train(f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--n_hidden=64", "--chunk_sizes=1,4,16",
                 "--micro_batch_size=16", "--block_size=32", "--max_steps=60", "--eval_interval=30",
                 "--val_steps=20", "--max_lr=5e-3", "--log_interval=10") == 0
    bpc = [e["val_bpc"] for e in evals(out)]
    assert abs(bpc[0] - math.log2(data.read_meta(data_dir)["vocab_size"])) < 0.3
    assert bpc[-1] < bpc[1] < bpc[0] and bpc[-1] < bpc[0] - 2.0, bpc


# -----------------------------------------------------------------------------
# reliability: a NaN never costs the last good model, one run per out_dir, one line for any bad input


def test_nan_keeps_a_finite_checkpoint_and_names_it(tmp_path, capsys):
    """max_lr 1e6 with a checkpoint every step and only the newest kept: the run exits 3 and names a
    checkpoint that really is good: still there (pruning never removed it) and finite in every weight."""
    data_dir = random_data(tmp_path / "data", 10)
    out = str(tmp_path / "out")
    assert train(f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--model=lstm", "--micro_batch_size=4",
                 "--block_size=8", "--max_steps=30", "--eval_interval=1000", "--checkpoint_interval=1",
                 "--keep_checkpoints=1", "--max_lr=1e6", "--warmup_steps=0") == utils.EXIT_DIVERGED
    err = capsys.readouterr().err
    named = re.search(r"NaN or inf at step (\d+); stopping\. The last good checkpoint is (\S+ckpt_(\d+)\.pt)", err)
    assert named, err
    assert utils.checkpoint_paths(out) == [named[2]] and int(named[3]) <= int(named[1])
    assert finite(utils.load_checkpoint(named[2]))
    assert [e for e in utils.read_log(os.path.join(out, "log.jsonl")) if "event" in e][-1]["event"] == "diverged"


@pytest.mark.parametrize("poison", ["gradient", "weight"])
def test_a_nan_gradient_or_weight_under_a_finite_loss_never_reaches_a_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                  poison):
    """At step 2 a gradient turns NaN (or, after the optimizer step, a weight turns inf) while the loss is
    still finite: the run stops before writing ckpt 3 and names ckpt 2, which is finite."""
    calls = []
    if poison == "gradient":
        real_clip = training.clip_grads

        def clip(params, max_norm):
            params = list(params)
            calls.append(None)
            if len(calls) == 3:
                params[0].grad.fill_(float("nan"))
            return real_clip(params, max_norm)
        monkeypatch.setattr(training, "clip_grads", clip)
    else:
        real_step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            result = real_step(self, *args, **kwargs)
            calls.append(None)
            if len(calls) == 3:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].fill_(float("inf"))
            return result
        monkeypatch.setattr(torch.optim.AdamW, "step", step)
    data_dir = random_data(tmp_path / "data", 11)
    out = str(tmp_path / "out")
    assert train(f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--model=lstm", "--micro_batch_size=2",
                 "--block_size=4", "--max_steps=6", "--eval_interval=1000", "--checkpoint_interval=1",
                 "--keep_checkpoints=1") == utils.EXIT_DIVERGED
    assert len(calls) == 3
    assert all(math.isfinite(loss) for loss in train_losses(out).values())
    err = capsys.readouterr().err
    assert f"is NaN or inf at step {2 if poison == 'gradient' else 3}; " in err, err
    assert f"The last good checkpoint is {os.path.join(out, 'ckpt_000002.pt')}, left intact" in err, err
    assert utils.checkpoint_paths(out) == [os.path.join(out, "ckpt_000002.pt")] and finite(ckpt(out, 2))


def test_a_second_run_into_a_locked_out_dir_is_refused_naming_the_pid(tmp_path):
    data_dir = random_data(tmp_path / "data", 12)
    out = str(tmp_path / "out")
    args = [f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--model=lstm", "--micro_batch_size=2",
            "--block_size=4", "--max_steps=3", "--eval_interval=1000"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, utils\nlock = utils.lock_folder(sys.argv[1])\n"
                               "print('locked', flush=True)\ntime.sleep(120)", out],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, message = failure(*args)
        assert code == 1 and f"PID {holder.pid}" in message and out in message, message
        assert os.listdir(out) == [".lock"]  # nothing written into the other run's folder
    finally:
        holder.kill()
        holder.wait()
    assert train(*args) == 0  # the OS released the lock with the process that held it


@pytest.mark.parametrize("arg", [
    "--max_lr=-1", "--max_lr=nan", "--max_lr=inf", "--min_lr=-1e-4", "--seed=-1", "--val_steps=-1",
    "--eval_interval=0", "--log_interval=-10", "--checkpoint_interval=-1", "--keep_checkpoints=-1",
    "--warmup_steps=-1", "--decay_steps=-5", "--patience=-1", "--stop_step=-2", "--grad_clip=nan",
    "--weight_decay=-0.1", "--dropout=1", "--beta2=1.5", "--micro_batch_size=0", "--block_size=0",
    "--max_steps=0", "--n_hidden=0", "--chunk_sizes=2,16", "--chunk_sizes=1,x", "--chunk_sizes=1,0",
    "--surprise_weights=0.1", "--surprise_weights=0.1,-1", "--eot_token=-1", "--eot_token=abc",
    "--model=gru", "--lr_schedule=linear", "--optimizer=sgd", "--dtype=float8",
])
def test_bad_settings_exit_2_naming_the_setting_before_any_work(tmp_path, capsys, arg):
    data_dir = random_data(tmp_path / "data", 13)
    out = tmp_path / "out"
    assert train(f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--max_steps=3", arg) == 2
    err = capsys.readouterr().err
    name = arg[2:].split("=")[0]
    assert err.startswith(f"error: --{name}") and len(err.splitlines()) == 1, err
    assert not out.exists()  # refused before any work


def test_bad_combinations_and_inputs_are_one_line_errors(tmp_path, capsys):
    data_dir = random_data(tmp_path / "data", 14)
    common = [f"--data_dir={data_dir}", *TINY, "--model=lstm", "--micro_batch_size=2", "--block_size=4",
              "--max_steps=3", "--eval_interval=1000"]
    out = f"--out_dir={tmp_path / 'out'}"
    for args, name in [(["--reset_on_eot=True"], "reset_on_eot"),  # meta.json has no EOT id, none was given
                       (["--tie_embeddings=True", "--n_embd=8"], "tie_embeddings"),
                       (["--dtype=float16"], "dtype")]:  # no float16 LSTM on CPU
        capsys.readouterr()
        assert train(*common, out, *args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --{name}") and len(err.splitlines()) == 1, err
    code, message = failure(*common, out, "--micro_batch_size=5000")
    assert code == 1 and "too few" in message
    code, message = failure(f"--data_dir={tmp_path / 'nothing'}", out)
    assert code == 1 and "meta.json" in message
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        f.write('["not", "an", "object"]')
    code, message = failure(*common, out)
    assert code == 1 and os.path.join(data_dir, "meta.json") in message and "\n" not in message
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, message = failure(*common, f"--out_dir={blocker / 'out'}")  # a folder that cannot be made
    assert code == 1 and message.startswith(f"error: cannot write {blocker / 'out'}") and "\n" not in message
