"""The CUDA path: bf16 autocast, torch.compile, fused AdamW, Muon, Flash Attention, KV cache, NCCL.

Skipped without a GPU (CI has none); scripts/gpu_check.sh runs these on a GPU machine.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**overrides):
    cfg = dict(n_layer=2, n_head=4, n_embd=256, block_size=256, vocab_size=1024)
    return GPT(GPTConfig(**{**cfg, **overrides})).cuda()


def batch(B=4, T=256, V=1024, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randint(0, V, (B, T + 1), device="cuda", generator=g)
    return x[:, :-1], x[:, 1:]


def test_bf16_autocast_close_to_float32():
    torch.manual_seed(0)
    model = small()
    x, y = batch()
    _, loss32 = model(x, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss16 = model(x, y)
    assert logits.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 2e-2
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    eager = small()
    compiled_raw = small()
    compiled_raw.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_raw)
    losses = {}
    for name, model, raw in (("eager", eager, eager), ("compiled", compiled, compiled_raw)):
        opt, = raw.configure_optimizers("adamw", 0.1, 1e-3, (0.9, 0.95), 1e-8, "cuda")
        assert opt.defaults["fused"] is True  # every parameter is on CUDA
        out = []
        for step in range(3):
            x, y = batch(seed=step)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        losses[name] = out
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=2e-2)


def test_muon_step_on_cuda():
    model = small()
    muon, adamw = model.configure_optimizers("muon", 0.1, 1e-3, (0.9, 0.95), 1e-8, "cuda")
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    x, y = batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    muon.step()
    adamw.step()
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


def test_flash_attention_runs_the_training_shapes():
    """Restricted to the Flash backend, SDPA raises if it cannot use it: so the model's call must qualify."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = small(n_embd=768, n_head=12, block_size=1024)
    x, y = batch(B=2, T=1024)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, y)
        loss.backward()
    assert torch.isfinite(loss)


def test_kv_cache_generation_equals_naive_greedy_on_cuda():
    torch.manual_seed(0)
    model = small().eval()
    idx = torch.randint(0, 1024, (2, 5), device="cuda")
    cached = model.generate(idx, 20, top_k=1)
    naive = idx
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model(naive)
            naive = torch.cat([naive, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, naive)


def test_train_gpt2_one_process_nccl_compiled_bf16(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1000, 200_000, dtype=np.uint16)
    data.write_shard(data.shard_name(tmp_path, "rand", "val", 0), tokens[:20_000])
    data.write_shard(data.shard_name(tmp_path, "rand", "train", 1), tokens[20_000:])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(REPO, "train_gpt2.py"), f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}",
           "--n_layer=2", "--n_head=4", "--n_embd=256", "--block_size=256", "--vocab_size=1024",
           "--micro_batch_size=8", "--total_batch_size=4096", "--max_steps=20", "--warmup_steps=2",
           "--eval_interval=10", "--val_steps=2", "--hellaswag_interval=0", "--sample_tokens=0", "--log_interval=5"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bfloat16" in result.stdout and "world 1" in result.stdout
    assert os.path.exists(tmp_path / "out" / "ckpt_000020.pt")
