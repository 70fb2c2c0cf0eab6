"""bench.py: runs on the CPU, prints its table, writes its JSON, lists CUDA-only variants as n/a, and times
a real training step (checked against a step written out here). Never asserts a timing."""
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import bench
import data
import hellaswag
from model import GPT, GPTConfig

TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--vocab_size=64",
        "--micro_batch_size=2", "--steps=3", "--warmup=1"]


def test_cli_table_json_na_loader_hellaswag_profile(tmp_path, repo_dir):
    shards = tmp_path / "shards"
    data.write_shard(str(shards / "t_train_000000.bin"), np.arange(5000) % 64, 64)
    out = tmp_path / "bench.json"
    variants = "base,eager,compile,sdpa_efficient,adamw,classic,float32"
    cmd = [sys.executable, os.path.join(repo_dir, "bench.py"), *TINY, "--total_batch_size=64",
           f"--variants={variants}", f"--data_dir={shards}", "--loader_batches=5", "--hellaswag=True",
           "--hellaswag_examples=4", "--hellaswag_batch_size=2", f"--json_out={out}", "--profile=True",
           "--profile_steps=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    table = res.stdout[res.stdout.rindex("variant"):]  # the final table
    for name in variants.split(",") + ["loader", "hellaswag"]:
        assert f"\n{name}" in table
    assert "n/a: train_gpt2.py compiles on CUDA only" in table

    report = json.loads(out.read_text())
    assert report["grad_accum_steps"] == 2  # 64 tokens / (2 x 16)
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == variants.split(",") + ["loader", "hellaswag"]
    assert rows["compile"]["status"] == "n/a" and "CUDA" in rows["compile"]["reason"]
    assert rows["sdpa_efficient"]["status"] in ("ok", "n/a")  # SDPA itself says which kernels run here
    for name in ("base", "adamw", "classic"):
        r = rows[name]
        assert r["status"] == "ok" and r["loss_finite"]
        assert r["mfu"] is None  # no MFU off CUDA
        assert r["ms_min"] <= r["ms_q1"] <= r["ms_median"] <= r["ms_q3"] <= r["ms_max"]
        assert r["tokens_per_s"] == pytest.approx(64 / (r["ms_median"] / 1000))
        assert r["peak_mem_mb"] is None  # CUDA only
    assert rows["base"]["optimizer"] == "muon" and rows["adamw"]["optimizer"] == "adamw"  # train_gpt2's default
    assert rows["classic"]["arch"] == "classic" and rows["base"]["arch"] == "modern"
    assert rows["eager"]["same_as"] == "base" and rows["float32"]["same_as"] == "base"  # the CPU base: measured once
    assert rows["loader"]["tokens_per_s"] > 0
    try:  # the HellaSwag row scores GPT-2 tokens: without tiktoken's files it says why it is n/a
        data.tiktoken_encoding("gpt2")
        assert rows["hellaswag"]["status"] == "ok" and rows["hellaswag"]["examples_per_s"] > 0
    except SystemExit:
        assert rows["hellaswag"]["status"] == "n/a" and "gpt2" in rows["hellaswag"]["reason"]

    profile = report["profile"]  # the first variant, by kernel group; the groups add up to the total
    assert profile["variant"] == "base" and "profile of base" in res.stdout
    assert sum(profile["ms_per_step"].values()) == pytest.approx(profile["total_ms"])
    assert profile["ms_per_step"]["matmul"] > 0 and profile["ms_per_step"]["optimizer"] > 0
    assert profile["ms_per_step"]["norms"] > 0 and profile["ms_per_step"]["attention"] > 0
    assert any(name == "aten::mm" for name, _ in profile["top"])


def test_profile_groups_kernels_by_name_and_enclosing_op():
    group = bench.kernel_group
    assert group(["sm90_xmma_gemm_bf16bf16_bf16f32", "aten::mm"], "cuda") == "matmul"
    assert group(["aten::bmm", "aten::matmul", "Optimizer.step#Muon.step"], "cpu") == "optimizer"
    assert group(["aten::mul", "RMSNormFunctionBackward", "autograd::engine::evaluate_function"], "cpu") == "norms"
    assert group(["triton_red_fused__log_softmax_nll_loss_forward_3", "CompiledFunction"], "cuda") == "loss"
    assert group(["pytorch_flash::flash_fwd_kernel", "aten::_flash_attention_forward"], "cuda") == "attention"
    assert group(["triton_poi_fused_add_cat_clone_mul_neg_slice_transpose_view_9"], "cuda") == "elementwise"
    assert group(["autograd::engine::evaluate_function: MulBackward0"], "cpu") == "other"


def test_bad_settings_exit_with_a_message(repo_dir):
    with pytest.raises(SystemExit) as e:
        bench.parse_variant("eager+fast", bench.base_setup("cpu", ""))
    assert e.value.code == 2
    res = subprocess.run([sys.executable, os.path.join(repo_dir, "bench.py"), "--stepz=3"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "stepz" in res.stderr


def test_variants_and_presets():
    base = bench.base_setup("cpu", "")
    assert base == dict(compile=False, dtype="float32", sdpa="auto", optimizer="muon", arch="modern")  # train_gpt2
    assert bench.parse_variant("compile+bfloat16+sdpa_math+classic", base) == dict(
        compile=True, dtype="bfloat16", sdpa="math", optimizer="muon", arch="classic")
    assert bench.unavailable(dict(base, compile=True), "cpu") is not None
    assert bench.unavailable(base, "cpu") is None


def test_synthetic_hellaswag_has_the_schema():
    examples = bench.synthetic_hellaswag(5, torch.Generator().manual_seed(0))
    for style in ("completion", "harness"):
        assert all(hellaswag.check_example(ex, style) is None for ex in examples)


def test_timed_step_is_train_gpt2_step(monkeypatch):
    """bench times training.train_step, train_gpt2.py's step, itself; and that step (2 micro-steps of
    accumulation, clipping, AdamW) is the one written out by hand here."""
    calls = []
    real = bench.training.train_step
    monkeypatch.setattr(bench.training, "train_step", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(bench, "micro_batch_size", 2)
    monkeypatch.setattr(bench, "block_size", 8)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    step, _ = bench.setup_step(bench.base_setup("cpu", ""), cfg, 2, "cpu", "cpu")
    assert torch.isfinite(step(0)) and len(calls) == 1 and calls[0]["accum_steps"] == 2

    torch.manual_seed(0)
    batches = [(torch.randint(32, (2, 8)), torch.randint(32, (2, 8))) for _ in range(2)]
    torch.manual_seed(1)
    model = GPT(cfg)
    ref = GPT(cfg)
    ref.load_state_dict(model.state_dict())
    opts = model.configure_optimizers("adamw", weight_decay=0.1, learning_rate=1e-2)
    feed = iter(batches)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, norm = real(model, opts, lambda: next(feed), 1.0, accum_steps=2, scaler=scaler,
                      autocast=nullcontext(), device="cpu", grad_clip=0.05)  # 1.0 x the groups' 1e-2

    params = dict(ref.named_parameters())
    decay = [p for p in params.values() if p.dim() >= 2]
    ref_opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1),
                                 dict(params=[p for p in params.values() if p.dim() < 2], weight_decay=0.0)],
                                lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    losses = [torch.nn.functional.cross_entropy(ref(x, y)[0].view(-1, 32), y.view(-1)) for x, y in batches]
    mean = (losses[0] + losses[1]) / 2
    mean.backward()
    ref_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
    assert ref_norm > 0.05 and norm.item() == pytest.approx(ref_norm.item(), rel=1e-5)  # clipping is active
    for p in params.values():
        p.grad *= 0.05 / (ref_norm + 1e-6)
    ref_opt.step()

    assert loss.item() == pytest.approx(mean.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, params[name], rtol=1e-5, atol=1e-6)


def test_gpu_check_stops_at_once_without_a_gpu(tmp_path, repo_dir):
    """scripts/gpu_check.sh on a machine without CUDA: one line and a non-zero exit before any work (it ran the 124M
    bench on the CPU for minutes, then ran out of memory)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run(["bash", os.path.join(repo_dir, "scripts", "gpu_check.sh")], capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, OUT=str(tmp_path / "out"),
                                                              PYTHON=sys.executable))
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU that torch can use here: run it on a machine with one"]
    assert result.stdout == "" and os.listdir(tmp_path / "out") == []
