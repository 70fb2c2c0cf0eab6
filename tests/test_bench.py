"""bench.py: runs on the CPU, prints its table, writes its JSON, lists CUDA-only variants as n/a, and times
a real training step (checked against a step written out here). Never asserts a timing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import data
import hellaswag
from model import GPT, GPTConfig

TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--vocab_size=64",
        "--micro_batch_size=2", "--steps=3", "--warmup=1"]


def test_cli_table_json_na_loader_hellaswag_profile(tmp_path, repo_dir, gpt2_enc):
    shards = tmp_path / "shards"
    data.write_shard(str(shards / "t_train_000000.bin"), np.arange(5000) % 64, 64)
    out = tmp_path / "bench.json"
    variants = "base,eager,compile,sdpa_efficient,adamw,adamw_unfused,classic,float32"
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
    for name in ("base", "adamw", "adamw_unfused", "classic"):
        r = rows[name]
        assert r["status"] == "ok" and r["loss_finite"]
        assert r["mfu"] is None  # no MFU off CUDA
        assert r["ms_min"] <= r["ms_q1"] <= r["ms_median"] <= r["ms_q3"] <= r["ms_max"]
        assert r["tokens_per_s"] == pytest.approx(64 / (r["ms_median"] / 1000))
        assert r["peak_mem_mb"] > 0
    assert rows["base"]["optimizer"] == "muon" and rows["adamw"]["optimizer"] == "adamw"  # train_gpt2's default
    assert rows["classic"]["arch"] == "classic" and rows["base"]["arch"] == "modern"
    assert rows["eager"]["same_as"] == "base" and rows["float32"]["same_as"] == "base"  # the CPU base: measured once
    assert rows["loader"]["tokens_per_s"] > 0
    assert rows["hellaswag"]["status"] == "ok" and rows["hellaswag"]["examples_per_s"] > 0

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
    assert bench.preset_values("auto", "cpu", [])[0] == "tiny"
    chosen, values = bench.preset_values("auto", "cuda", ["--block_size=512"])
    assert chosen == "gpt2" and values["n_layer"] == 12 and values["micro_batch_size"] == 32
    assert "block_size" not in values  # the command line wins over the preset
    assert bench.unavailable(dict(base, compile=True), "cpu") is not None
    assert bench.unavailable(base, "cpu") is None


def test_synthetic_hellaswag_has_the_schema():
    examples = bench.synthetic_hellaswag(5, torch.Generator().manual_seed(0))
    for style in ("completion", "harness"):
        assert all(hellaswag.check_example(ex, style) is None for ex in examples)


def test_timed_step_is_train_gpt2_step(monkeypatch):
    """Two micro-steps of accumulation, clipping and AdamW, against the same step written out by hand."""
    monkeypatch.setattr(bench, "grad_clip", 0.05)  # small, so clipping really acts
    monkeypatch.setattr(bench, "learning_rate", 1e-2)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    torch.manual_seed(0)
    batches = [(torch.randint(32, (2, 8)), torch.randint(32, (2, 8))) for _ in range(2)]
    torch.manual_seed(1)
    model = GPT(cfg)
    ref = GPT(cfg)
    ref.load_state_dict(model.state_dict())

    opts = bench.make_optimizers(model, "adamw", "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = bench.make_step(model, model, opts, scaler, torch.autocast("cpu", enabled=False), batches, 2, "cpu")
    loss = step(0)

    params = dict(ref.named_parameters())
    decay = [p for p in params.values() if p.dim() >= 2]
    ref_opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1),
                                 dict(params=[p for p in params.values() if p.dim() < 2], weight_decay=0.0)],
                                lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    losses = [torch.nn.functional.cross_entropy(ref(x, y)[0].view(-1, 32), y.view(-1)) for x, y in batches]
    mean = (losses[0] + losses[1]) / 2
    mean.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
    assert norm > 0.05  # clipping is active
    for p in params.values():
        p.grad *= 0.05 / (norm + 1e-6)
    ref_opt.step()

    assert loss.item() == pytest.approx(mean.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, params[name], rtol=1e-5, atol=1e-6)
