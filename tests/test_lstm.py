"""train_lstm.py and the recurrent models of model.py: stream layout, persistent states, slow levels, exact resume, DDP, char level.

Runs of train_lstm.py happen in this process (runpy, fresh module globals each time) except the DDP one,
which needs torchrun. Every model is tiny; the data are synthetic shards written here, or WikiText-2's
valid.txt prepared by prepare_wikitext.py.
"""
import json
import math
import os
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import write_meta, write_shard
from model import LSTMConfig, build_recurrent
from utils import load_checkpoint, read_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "train_lstm.py")
TINY = ["--device=cpu", "--dtype=float32", "--n_embd=16", "--n_hidden=32", "--n_layer=1", "--ffn_hidden=16",
        "--log_interval=1", "--checkpoint_interval=0", "--warmup_steps=2", "--max_lr=1e-2", "--min_lr=1e-3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(folder, train, val, vocab_size, tokenizer="synthetic"):
    write_shard(os.path.join(folder, f"t_train_{0:06d}.bin"), np.asarray(train), vocab_size)
    write_shard(os.path.join(folder, f"t_val_{0:06d}.bin"), np.asarray(val), vocab_size)
    write_meta(folder, {"tokenizer": tokenizer, "vocab_size": vocab_size, "eot": None, "itos": None})
    return str(folder)


def run_script(*args):
    """Run train_lstm.py in this process with --name=value args (fresh module globals every time)."""
    old = sys.argv
    sys.argv = [SCRIPT, *args]
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        sys.argv = old


def train(*args):
    """run_script, returning the exit status: 0 = finished, 1 = SystemExit with a message."""
    try:
        run_script(*args)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def train_losses(out_dir):
    return {e["step"]: e["train_loss"] for e in read_log(os.path.join(out_dir, "log.jsonl")) if "train_loss" in e}


def evals(out_dir):
    return [e for e in read_log(os.path.join(out_dir, "log.jsonl")) if "val_loss" in e]


def ckpt(out_dir, step):
    return load_checkpoint(os.path.join(out_dir, f"ckpt_{step:06d}.pt"))


# -----------------------------------------------------------------------------


def test_stream_loader_layout(tmp_path):
    """Rank r's rows are global streams r*B.., each contiguous across batches and shard boundaries,
    segments disjoint, restart flagged when the segments are used up."""
    from train_lstm import StreamLoader
    n = 1000
    tokens = np.arange(n) % 60000
    write_shard(os.path.join(tmp_path, "t_train_000000.bin"), tokens[:377])  # streams cross this boundary
    write_shard(os.path.join(tmp_path, "t_train_000001.bin"), tokens[377:])
    B, T, world = 3, 7, 2
    seg = n // (B * world)
    seen = set()
    for rank in range(world):
        loader = StreamLoader(str(tmp_path), "train", B, T, rank, world)
        windows = (seg - 1) // T
        for k in range(windows + 1):
            x, y, restarted = loader.next_batch()
            assert x.dtype == torch.int64 and x.shape == (B, T)
            k_eff = k % windows
            assert restarted == (k == windows)
            for b in range(B):
                start = (rank * B + b) * seg + k_eff * T
                assert x[b].tolist() == list(range(start, start + T))
                assert y[b].tolist() == list(range(start + 1, start + T + 1))
                assert start + T + 1 <= (rank * B + b + 1) * seg  # never reads into the next stream
                if k < windows:
                    seen.update(range(start, start + T))
    assert len(seen) == B * world * ((seg - 1) // T) * T  # no token shared by two streams or windows


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
    for a, b in zip(state, ref_state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    no_reset, _, _, _ = model(idx, state=state0)
    assert not torch.allclose(no_reset, logits)  # the resets did something


def test_persistent_state_learns_across_batch_boundaries(tmp_path):
    """A fixed random sequence of period 37 repeated: with block_size 4 the first targets of every window
    need the tokens of the previous window, so carried states reach a far lower loss than states zeroed
    at every batch (train and eval)."""
    period = np.random.default_rng(0).integers(0, 12, size=37)
    data = make_data(tmp_path, np.tile(period, 60), np.tile(period, 40)[5:], 12)
    common = [f"--data_dir={data}", *TINY, "--model=lstm", "--n_hidden=48", "--micro_batch_size=8",
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
    data = make_data(tmp_path, rng.integers(0, 9, 4000), rng.integers(0, 9, 500), 9)
    out = str(tmp_path / "out")
    lr = 1e-2
    assert train(f"--data_dir={data}", f"--out_dir={out}", *TINY, "--model=nested_lstm", "--chunk_sizes=1,3,4",
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
    from train_lstm import StreamLoader
    before, after = ckpt(out, 3), ckpt(out, 4)
    model = build_recurrent(cfg)
    model.load_state_dict(before["model"])
    loader = StreamLoader(data, "train", 4, 6, vocab_size=9)
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
    for i, j in zip(ids, order):
        expected = saved[j] + params[j].grad
        torch.testing.assert_close(by_id[i] / 0.1, expected, rtol=1e-4, atol=1e-7)
    assert all(g.abs().sum() == 0 for g in after["slow_grads"][1])  # emptied after its step


def test_exact_resume_mid_chunk(tmp_path):
    """8 steps straight vs stop before step 4 (mid-chunk for C=3 and C=5) + resume: identical losses,
    identical weights, states and val metrics; dropout on, so the RNG must be restored too."""
    rng = np.random.default_rng(2)
    data = make_data(tmp_path, rng.integers(0, 9, 3000), rng.integers(0, 9, 600), 9)
    common = [f"--data_dir={data}", *TINY, "--model=nested_lstm", "--chunk_sizes=1,3,5", "--n_layer=2",
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
    for sa, sb in zip(ca["state"], cb["state"]):
        assert torch.equal(sa, sb)


def test_ddp_two_ranks_match_one_process(tmp_path):
    """torchrun 2 x gloo with 2 streams each == one process with the same 4 global streams: same losses,
    same gathered states (each rank ran its own streams r*2..r*2+1 on its own device)."""
    rng = np.random.default_rng(3)
    data = make_data(tmp_path, rng.integers(0, 9, 3000), rng.integers(0, 9, 600), 9)
    common = [f"--data_dir={data}", *TINY, "--model=nested_lstm", "--chunk_sizes=1,2", "--surprise_weights=0.1",
              "--block_size=6", "--max_steps=5", "--eval_interval=1000"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train(*common, f"--out_dir={one}", "--micro_batch_size=4") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          SCRIPT, *common, f"--out_dir={two}", "--micro_batch_size=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    start = [e for e in read_log(os.path.join(two, "log.jsonl")) if e.get("event") == "start"][0]
    assert start["world_size"] == 2
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == sorted(l2) == list(range(5))
    for s in l1:
        assert math.isclose(l1[s], l2[s], rel_tol=1e-5), (s, l1[s], l2[s])
    for s1, s2 in zip(ckpt(one, 5)["state"], ckpt(two, 5)["state"]):
        assert s2.shape[1] == 4
        torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-5)
    assert math.isclose(evals(one)[-1]["val_loss"], evals(two)[-1]["val_loss"], rel_tol=1e-5)


def test_char_level_wikitext_bpc_falls(tmp_path, shared_dir):
    """prepare_wikitext.py's char shards of WikiText-2 valid.txt (90/10): 60 steps of a tiny nested LSTM
    take val bits per character well down from the uniform guess, and the train loss falls."""
    text = os.path.join(shared_dir, "data", "wikitext-2", "valid.txt")
    if not os.path.exists(text):
        pytest.skip(f"{text} is missing")
    data = str(tmp_path / "wt2_char")
    prep = subprocess.run([sys.executable, os.path.join(REPO, "prepare_wikitext.py"), f"--text_file={text}",
                           "--tokenizer=char", f"--out_dir={data}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-2000:]
    out = str(tmp_path / "out")
    assert train(f"--data_dir={data}", f"--out_dir={out}", *TINY, "--n_hidden=64", "--chunk_sizes=1,4,16",
                 "--micro_batch_size=16", "--block_size=32", "--max_steps=60", "--eval_interval=30",
                 "--val_steps=20", "--max_lr=5e-3", "--log_interval=10") == 0
    vocab = json.load(open(os.path.join(data, "meta.json")))["vocab_size"]
    bpc = [e["val_bpc"] for e in evals(out)]
    assert [e["step"] for e in evals(out)] == [0, 30, 60]
    assert abs(bpc[0] - math.log2(vocab)) < 0.3  # an untrained model is a near-uniform guess
    assert bpc[-1] < bpc[1] < bpc[0] and bpc[-1] < bpc[0] - 2.0, bpc
    losses = train_losses(out)
    assert losses[59] < losses[0] - 1.0
    assert os.path.exists(os.path.join(out, "ckpt_000060.pt"))


def test_divergence_and_bad_settings_exit_nonzero(tmp_path, capsys):
    rng = np.random.default_rng(4)
    data = make_data(tmp_path, rng.integers(0, 9, 2000), rng.integers(0, 9, 400), 9)
    common = [f"--data_dir={data}", *TINY, "--model=lstm", "--micro_batch_size=2", "--block_size=4",
              "--eval_interval=1000"]
    # Adam moves every weight by ~lr per step: at 3e37 they overflow to inf within a few steps, the loss is NaN
    assert train(*common, f"--out_dir={tmp_path / 'x'}", "--max_steps=30", "--max_lr=3e37", "--grad_clip=0",
                 "--warmup_steps=0", "--lr_schedule=constant", "--checkpoint_interval=1") == 3
    err = capsys.readouterr().err
    found = re.search(r"NaN or inf at step (\d+) .* checkpoint is .*ckpt_(\d+)\.pt", err)
    assert found and int(found[2]) <= int(found[1]), err  # the named checkpoint predates the bad step
    assert [e["event"] for e in read_log(os.path.join(tmp_path, "x", "log.jsonl")) if "event" in e][-1] == "diverged"
    with pytest.raises(SystemExit, match="chunk_sizes"):
        run_script(*common, f"--out_dir={tmp_path / 'y'}", "--model=nested_lstm", "--chunk_sizes=2,16")
    with pytest.raises(SystemExit, match="too few"):
        run_script(*common, f"--out_dir={tmp_path / 'y'}", "--micro_batch_size=5000")
    with pytest.raises(SystemExit, match="meta.json"):
        run_script(f"--data_dir={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'y'}")
    with pytest.raises(SystemExit, match="eot"):  # meta.json has no EOT id and none was given
        run_script(*common, f"--out_dir={tmp_path / 'y'}", "--reset_on_eot=True")
    with pytest.raises(SystemExit, match="tie_embeddings"):
        run_script(*common, f"--out_dir={tmp_path / 'y'}", "--tie_embeddings=True", "--n_embd=8")
