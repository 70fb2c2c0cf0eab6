"""Tests for the GPT in model.py, the recurrent models' generate and from_checkpoint (CPU, offline, tiny models)."""

import copy
import dataclasses
import io
import itertools
import re
import shutil
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from model import (
    GPT,
    MLPS,
    NORM_POSS,
    NORMS,
    POS_EMBS,
    RECURRENT_MODELS,
    SIZES,
    STYLES,
    GPTConfig,
    KVCache,
    LSTMConfig,
    Muon,
    RMSNorm,
    apply_rope,
    build_recurrent,
    config_from_checkpoint,
    from_checkpoint,
    peak_flops,
    rope_tables,
    zeropower_via_newtonschulz5,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    cfg = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPTConfig(**cfg)


def sharpen(model, std=0.3, seed=0):
    """Re-draw weights with a large std so logits are far apart and greedy argmax is never a near-tie."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return model


# ---- config ----

@pytest.mark.parametrize("kw, field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(pos_emb="alibi"), "pos_emb"),
    (dict(mlp="geglu"), "mlp"),
    (dict(norm="batchnorm"), "norm"),
    (dict(norm_pos="sandwich"), "norm_pos"),
    (dict(n_embd=6, n_head=2, pos_emb="rope"), "head size"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layer=0), "n_layer"),
])
def test_bad_config_raises_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


def test_odd_head_size_is_fine_without_rope():
    GPT(tiny(n_embd=6, n_head=2, pos_emb="learned"))


def test_presets():
    assert set(SIZES) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"} and set(STYLES) == {"modern", "classic"}
    c = GPTConfig.preset("gpt2-medium", style="classic", block_size=256)
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.pos_emb, c.bias) == (24, 16, 1024, 256, "learned", True)
    assert GPTConfig.preset("gpt2") == GPTConfig()  # the dataclass defaults are the modern 124M
    with pytest.raises(ValueError, match="size"):
        GPTConfig.preset("gpt3")
    with pytest.raises(ValueError, match="style"):
        GPTConfig.preset("gpt2", style="retro")


@pytest.mark.parametrize("style", ["modern", "classic"])
def test_124m_param_count(style):
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(GPTConfig.preset("gpt2", style=style))
    assert 123e6 <= model.num_params() <= 125.5e6


def test_classic_124m_matches_known_gpt2_count():
    # GPT-2 small as published by OpenAI/HF (vocab 50257, tied head): 124,439,808 parameters
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2", style="classic", vocab_size=50257))
    assert model.num_params() == 124_439_808


def test_swiglu_hidden_matches_gelu_params():
    c = GPTConfig.preset("gpt2")
    assert c.mlp_hidden_size == 2048  # 3 * 768 * 2048 == 2 * 768 * 3072
    assert GPTConfig(mlp="gelu").mlp_hidden_size == 3072 and GPTConfig(mlp_hidden=100).mlp_hidden_size == 100


# ---- parity with Hugging Face GPT-2 ----

def hf_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # GPT-2's 0.02 init makes near-zero logits that hide small mistakes (e.g. exact GELU)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_hf_gpt2_parity_and_round_trip():
    hf = hf_model()
    cfg = GPTConfig(**STYLES["classic"], n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=100)
    ours = GPT.from_hf_state_dict(hf.state_dict(), cfg).eval()
    idx = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = ours(idx, targets=idx)
        last, loss = ours(idx)
    assert (logits - ref).abs().max() < 1e-4
    assert loss is None and last.shape == (2, 1, 100) and (last[:, 0] - ref[:, -1]).abs().max() < 1e-4
    # saving back to the HF layout gives the HF model's own tensors, and loads strictly
    back = ours.to_hf_state_dict()
    for k, v in hf.state_dict().items():
        if k in back:
            assert torch.equal(back[k], v), k
    missing, unexpected = hf.load_state_dict(back, strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) and "c_attn" not in k for k in missing)


def test_hf_conversion_accepts_gpt2model_keys_and_rejects_modern():
    hf = hf_model()
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    cfg = GPTConfig(**STYLES["classic"], n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=100)
    ours = GPT.from_hf_state_dict(sd, cfg)
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)
    with pytest.raises(ValueError, match="pos_emb"):
        GPT.from_hf_state_dict(sd, GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=100))


def test_from_pretrained_fails_clearly(monkeypatch):
    transformers = pytest.importorskip("transformers")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", offline)  # no network in tests
    with pytest.raises(RuntimeError, match="offline"):
        GPT.from_pretrained("gpt2")
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(RuntimeError, match="pip install transformers"):
        GPT.from_pretrained("gpt2")
    with pytest.raises(ValueError, match="gpt2-xl"):
        GPT.from_pretrained("gpt5")


# ---- switches ----

def test_rope_score_depends_only_on_offset():
    hs = 16
    cos, sin = rope_tables(200, hs, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hs, generator=g), torch.randn(hs, generator=g)

    def score(m, n):  # q at position m, k at position n
        qr = apply_rope(q.view(1, 1, 1, hs), cos[m:m + 1], sin[m:m + 1])
        kr = apply_rope(k.view(1, 1, 1, hs), cos[n:n + 1], sin[n:n + 1])
        return (qr * kr).sum().item()

    for m, n, shift in [(5, 2, 17), (9, 9, 100), (3, 40, 55)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # but it does depend on the offset
    # a rotation: norms are unchanged
    qr = apply_rope(q.view(1, 1, 1, hs), cos[7:8], sin[7:8])
    assert qr.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_rope_matches_the_pairwise_rotation():
    """apply_rope on (B, T, heads, hs) == rotating each pair (x[i], x[i + hs/2]) at position t by t * base^(-2i/hs)."""
    B, T, H, hs, base = 2, 7, 3, 8, 10000.0
    x = torch.randn(B, T, H, hs, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cos, sin = rope_tables(T, hs, base)
    out = apply_rope(x, cos.double(), sin.double())
    ref = torch.empty_like(x)
    for t in range(T):
        for i in range(hs // 2):
            angle = torch.tensor(t * base ** (-2 * i / hs), dtype=torch.float64)
            a, b = x[:, t, :, i], x[:, t, :, i + hs // 2]
            ref[:, t, :, i] = a * angle.cos() - b * angle.sin()
            ref[:, t, :, i + hs // 2] = b * angle.cos() + a * angle.sin()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_torch_forward_and_backward(dtype):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours, ref = RMSNorm(16), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(16) + 0.5)
        ref.weight.copy_(ours.weight)
    y = ours(x)
    y.backward(grad)
    gx, gw = x.grad.clone(), ours.weight.grad.clone()
    x.grad = None
    x32 = x.detach().float().requires_grad_()  # the reference in float32, as autocast would run it
    y_ref = ref(x32)
    y_ref.backward(grad.float())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert y.dtype == dtype and ours.state_dict().keys() == ref.state_dict().keys()
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(gx.float(), x32.grad, **tol)
    torch.testing.assert_close(gw, ref.weight.grad, **tol)


@pytest.mark.parametrize("norm_pos", NORM_POSS)
def test_norm_placement_computes_what_it_says(norm_pos):
    model = sharpen(GPT(tiny(norm_pos=norm_pos, norm="layernorm", n_layer=1))).eval()
    block, x = model.transformer.h[0], torch.randn(2, 5, 32)
    with torch.no_grad():
        if norm_pos == "pre":
            h = x + block.attn(block.ln_1(x))
            ref = h + block.mlp(block.ln_2(h))
        else:
            h = block.ln_1(x + block.attn(x))
            ref = block.ln_2(h + block.mlp(h))
        assert torch.allclose(block(x), ref, atol=1e-6)


def test_pre_and_post_norm_differ_on_the_same_weights():
    pre = sharpen(GPT(tiny(norm_pos="pre"))).eval()
    post = GPT(tiny(norm_pos="post")).eval()
    post.load_state_dict(pre.state_dict())  # same keys: only the wiring differs
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert not torch.allclose(pre(idx, targets=idx)[0], post(idx, targets=idx)[0], atol=1e-2)


def test_every_switch_combination_runs_forward_and_backward():
    idx = torch.randint(0, 16, (2, 8))
    for pos_emb, mlp, norm, norm_pos, qk_norm, tie, bias in itertools.product(
            POS_EMBS, MLPS, NORMS, NORM_POSS, (False, True), (False, True), (False, True)):
        cfg = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, pos_emb=pos_emb, mlp=mlp,
                        norm=norm, norm_pos=norm_pos, qk_norm=qk_norm, tie_embeddings=tie, bias=bias)
        model = GPT(cfg)
        logits, loss = model(idx, targets=idx)
        loss.backward()
        assert logits.shape == (2, 8, 16) and torch.isfinite(loss), cfg
        for name, p in model.named_parameters():  # every parameter is used (DDP would complain otherwise)
            assert p.grad is not None and torch.isfinite(p.grad).all(), (cfg, name)
        assert (model.lm_head.weight is model.transformer.wte.weight) == tie
        assert hasattr(model.transformer, "wpe") == (pos_emb == "learned")
        assert any("q_norm" in n for n, _ in model.named_parameters()) == qk_norm
        assert any(n.endswith(".bias") for n, _ in model.named_parameters()) == bias


def test_switches_change_the_parameters_they_should():
    def names(**kw):
        return {n for n, _ in GPT(tiny(**kw)).named_parameters()}
    assert not any(n.endswith("bias") for n in names(bias=False, norm="layernorm"))
    assert "transformer.h.0.ln_1.bias" in names(bias=True, norm="layernorm")
    assert not any("ln_" in n for n in names(norm="none"))
    swiglu = GPT(tiny(mlp="swiglu")).transformer.h[0].mlp
    assert swiglu.c_fc.out_features == 2 * swiglu.c_proj.in_features


def test_qk_norm_float32_output_under_mixed_precision():
    # CUDA autocast runs rms_norm in float32 while v stays bf16; SDPA needs one dtype. Simulate on CPU.
    class Float32Norm(torch.nn.RMSNorm):
        def forward(self, x):
            return super().forward(x.float())
    model = GPT(tiny(qk_norm=True, n_layer=1))
    attn = model.transformer.h[0].attn
    attn.q_norm, attn.k_norm = Float32Norm(16), Float32Norm(16)
    model = model.to(torch.bfloat16)
    idx = torch.randint(0, 64, (1, 8))
    assert model(idx, targets=idx)[0].dtype == torch.bfloat16
    assert model.generate(idx, 3).shape == (1, 11)


def test_dropout_only_in_training():
    model = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 64, (2, 8))
    model.train()
    assert not torch.equal(model(idx, targets=idx)[0], model(idx, targets=idx)[0])
    model.eval()
    assert torch.equal(model(idx, targets=idx)[0], model(idx, targets=idx)[0])


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_causality(pos_emb):
    model = sharpen(GPT(tiny(pos_emb=pos_emb))).eval()
    idx = torch.randint(0, 64, (1, 12))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 64
    with torch.no_grad():
        a, _ = model(idx, targets=idx)
        b, _ = model(changed, targets=changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_init_scales():
    model = GPT(GPTConfig(n_layer=8, n_embd=128, n_head=4, vocab_size=1000, block_size=64, bias=True, mlp="gelu"))
    sd = dict(model.named_parameters())
    assert sd["transformer.h.0.attn.c_attn.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["transformer.h.0.mlp.c_proj.weight"].std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert sd["transformer.wte.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert all(p.abs().sum() == 0 for n, p in sd.items() if n.endswith("attn.c_attn.bias"))


# ---- loss ----

def test_ignore_index_and_float32_loss():
    model = GPT(tiny())
    idx = torch.randint(0, 64, (2, 10))
    targets = torch.randint(0, 64, (2, 10))
    keep = torch.rand(2, 10) < 0.5
    keep[0, 0] = True
    for ignore in (-1, -100):
        masked = targets.masked_fill(~keep, ignore)
        logits, loss = model(idx, targets=masked, ignore_index=ignore)
        ref = F.cross_entropy(logits[keep].double(), targets[keep])
        assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, targets=targets)
    assert loss.dtype == torch.float32


def test_without_targets_gives_last_position_only():
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        full, _ = model(idx, targets=idx)
        last, loss = model(idx)
    assert loss is None and last.shape == (3, 1, 64)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ---- generation ----

def naive_greedy(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:], targets=idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_kv_cache_generate_equals_naive_loop(pos_emb):
    model = sharpen(GPT(tiny(pos_emb=pos_emb, qk_norm=pos_emb == "rope"))).eval()
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = naive_greedy(model, idx, 20)  # 25 > block_size 16: covers the context-full fallback
    assert torch.equal(model.generate(idx, 20, temperature=0), ref)
    assert torch.equal(model.generate(idx, 20, top_k=1), ref)


def test_kv_cache_logits_match_and_work_is_linear():
    model = sharpen(GPT(tiny(pos_emb="rope"))).eval()
    idx = torch.randint(0, 64, (2, 16))
    fed = []
    model.transformer.wte.register_forward_hook(lambda m, inp, out: fed.append(inp[0].size(1)))
    with torch.no_grad():
        full, _ = model(idx, targets=idx)
        cache = KVCache(model.config.n_layer, model.config.block_size)
        for chunk in (idx[:, :4], idx[:, 4:5], idx[:, 5:11], idx[:, 11:]):  # prefill, one token, several tokens
            step, _ = model(chunk, targets=chunk, kv_cache=cache)
            assert torch.allclose(step, full[:, cache.pos - chunk.size(1):cache.pos], atol=1e-5)
    fed.clear()
    model.generate(idx[:, :4], 10, temperature=0)
    assert fed == [4] + [1] * 9  # the prompt once, then one token per step


def test_sampling_reproducible_and_top_k():
    model = sharpen(GPT(tiny()), std=0.1).eval()
    idx = torch.randint(0, 64, (1, 3))
    def gen(seed, **kw):
        return model.generate(idx, 12, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(gen(0), gen(0))
    assert not torch.equal(gen(0), gen(1))
    out = gen(3, top_k=3, temperature=2.0)
    with torch.no_grad():
        logits, _ = model(out[:, :-1], targets=out[:, :-1])
    for t in range(3, out.size(1)):
        assert out[0, t] in torch.topk(logits[0, t - 1], 3).indices


def test_generate_never_draws_padded_vocabulary_ids():
    model = sharpen(GPT(tiny()), std=0.3).eval()  # vocab 64; pretend the tokenizer has only 10 ids
    with torch.no_grad():
        model.lm_head.weight[10:] += 5.0  # the padding rows would win every draw
    idx = torch.randint(0, 10, (4, 3))
    assert (model.generate(idx, 20, n_vocab=10)[:, 3:] < 10).all()
    assert (model.generate(idx, 20)[:, 3:] >= 10).any()


def test_eos_stops_early():
    model = sharpen(GPT(tiny())).eval()
    idx = torch.randint(0, 64, (1, 4))
    greedy = model.generate(idx, 10, temperature=0)
    eos = greedy[0, 6].item()  # the third generated token
    first = (greedy[0, 4:] == eos).nonzero()[0].item()
    out = model.generate(idx, 10, temperature=0, eos_token=eos)
    assert torch.equal(out, greedy[:, :4 + first + 1])


def test_eos_pads_rows_that_finished_first():
    model = sharpen(GPT(tiny())).eval()
    g = torch.Generator().manual_seed(5)
    for _ in range(20):  # find two prompts whose greedy continuations reach a common token at different steps
        idx = torch.randint(0, 64, (2, 4), generator=g)
        greedy = model.generate(idx, 12, temperature=0)
        common = set(greedy[0, 4:].tolist()) & set(greedy[1, 4:].tolist())
        firsts = {t: [(greedy[r, 4:] == t).nonzero()[0].item() for r in (0, 1)] for t in common}
        firsts = {t: f for t, f in firsts.items() if f[0] != f[1]}
        if firsts:
            break
    else:
        pytest.skip("no suitable prompts found")
    eos, (f0, f1) = next(iter(firsts.items()))
    out = model.generate(idx, 12, temperature=0, eos_token=eos)
    assert out.size(1) == 4 + max(f0, f1) + 1  # stops when the later row is done
    for r, f in ((0, f0), (1, f1)):
        assert torch.equal(out[r, :4 + f + 1], greedy[r, :4 + f + 1])
        assert (out[r, 4 + f:] == eos).all()  # finished row is padded with eos


# ---- tying ----

def test_tied_weights_survive_state_dict_round_trips():
    model = GPT(tiny())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for assign in (False, True):
        fresh = GPT(tiny())
        fresh.load_state_dict(sd, assign=assign)
        assert fresh.lm_head.weight is fresh.transformer.wte.weight
        assert torch.equal(fresh.lm_head.weight, model.transformer.wte.weight)
        assert fresh.num_params() == model.num_params()
    moved = GPT(tiny()).to(torch.float64)
    assert moved.lm_head.weight is moved.transformer.wte.weight


def test_tied_weights_under_ddp(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = GPT(tiny())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = model.configure_optimizers(learning_rate=1e-2)[0]
        idx = torch.randint(0, 64, (2, 8))
        _, loss = ddp(idx, targets=idx)
        loss.backward()
        opt.step()
        assert model.lm_head.weight is model.transformer.wte.weight
        fresh = GPT(tiny())
        fresh.load_state_dict({k.removeprefix("module."): v for k, v in ddp.state_dict().items()})
        assert fresh.lm_head.weight is fresh.transformer.wte.weight
        assert torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)
    finally:
        dist.destroy_process_group()


# ---- optimizers ----

@pytest.mark.parametrize("tie", [True, False])
def test_adamw_groups(tie):
    model = GPT(tiny(tie_embeddings=tie, bias=True, norm="layernorm", qk_norm=True))
    (opt,) = model.configure_optimizers("adamw", weight_decay=0.1, learning_rate=3e-4)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]  # all on the CPU: CPU's fused kernel
    decay, no_decay = opt.param_groups
    params = list(model.parameters())  # each tensor once
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in params if p.dim() == 1}
    assert {id(p) for p in decay["params"]} == {id(p) for p in params if p.dim() >= 2}
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)


def test_muon_groups():
    model = GPT(tiny(tie_embeddings=True))
    muon, adamw = model.configure_optimizers("muon", weight_decay=0.1, learning_rate=0.02)
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    adam_names = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert sorted(adam_names) == sorted(set(names.values()) - muon_names)  # the rest, each once (tied wte once)
    assert all(g["lr"] == 0.02 for o in (muon, adamw) for g in o.param_groups)
    idx = torch.randint(0, 64, (2, 8))
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    model(idx, targets=idx)[1].backward()
    muon.step(), adamw.step()
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)
    with pytest.raises(ValueError, match="optimizer"):
        model.configure_optimizers("sgd")


def naive_newton_schulz(G, steps=5, eps=1e-7):
    """One matrix at a time in float32, written from the Muon post's quintic iteration (a, b, c) as given."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float().T if G.size(0) > G.size(1) else G.float()
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.size(0) > G.size(1) else X


def test_batched_newton_schulz_matches_one_matrix_at_a_time_and_orthogonalises():
    G = torch.randn(5, 48, 16, generator=torch.Generator().manual_seed(0))
    batched = zeropower_via_newtonschulz5(G)
    for g, out in zip(G, batched):
        torch.testing.assert_close(out, naive_newton_schulz(g), atol=1e-5, rtol=1e-5)
    singular = torch.linalg.svdvals(batched)
    assert singular.min() > 0.5 and singular.max() < 1.5  # near-orthogonal, as the iteration promises


def muon_matrices(model):
    return [p for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]


def test_muon_matches_torch_optim_muon(monkeypatch):
    """Our batched Muon takes torch.optim.Muon's steps (momentum, Nesterov, decoupled decay, RMS-matched LR).
    torch's own Newton-Schulz runs in bfloat16; it gets the float32 reference here, so the two agree to float32
    rounding (ours takes the Gram form for wide matrices), far below the size of the steps taken."""
    import torch.optim._muon as torch_muon
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", lambda g, coefficients, steps, eps:
                        naive_newton_schulz(g, steps, eps))
    ours = GPT(tiny(n_layer=3))
    ref = GPT(tiny(n_layer=3))
    ref.load_state_dict(ours.state_dict())
    muon = ours.configure_optimizers("muon", weight_decay=0.1, learning_rate=1e-2)[0]
    torch_opt = torch.optim.Muon(muon_matrices(ref), lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in muon_matrices(ours)]
    for _ in range(3):
        for model, opt in ((ours, muon), (ref, torch_opt)):
            model(idx[:, :-1], targets=idx[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b, a0 in zip(muon_matrices(ours), muon_matrices(ref), before):
        assert (a - a0).abs().max() > 1e-2  # steps much larger than the tolerance below
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    fresh = GPT(tiny(n_layer=3)).configure_optimizers("muon")[0]  # a state dict saved by torch.optim.Muon loads
    fresh.load_state_dict(torch_opt.state_dict())
    assert fresh.param_groups[0]["pieces"] == 1 and len(fresh.state) == len(muon_matrices(ref))


def test_muon_split_qkv_orthogonalises_q_k_and_v_apart():
    model = GPT(tiny(n_layer=1))
    muon = model.configure_optimizers("muon", weight_decay=0.0, learning_rate=1e-2, muon_split_qkv=True)[0]
    w = model.transformer.h[0].attn.c_attn.weight
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    grad = w.grad.clone()
    muon.step()
    # first step, Nesterov: the momentum buffer is 0.05 g and the update u = g + 0.95 (m - g) = 0.0975 g
    expected = torch.cat([naive_newton_schulz(0.0975 * g) for g in grad.chunk(3)])
    C = w.size(1)  # each block is C x C: scale 0.2 sqrt(C)
    torch.testing.assert_close(before - w.detach(), 1e-2 * 0.2 * C ** 0.5 * expected, atol=1e-6, rtol=1e-4)


def muon_rank(rank, world, init_file, out_file):
    """One rank of test_muon_shards_matrices_across_ranks: 3 layers, so each shape's 3 matrices split 2 + 1."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=3))
    muon = model.configure_optimizers("muon", weight_decay=0.1, learning_rate=1e-2)[0]
    for step in range(2):
        for p in muon_matrices(model):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 100 + p.numel()))
        muon.step()
    if rank == 0:
        torch.save([p.detach() for p in muon_matrices(model)], out_file)
    torch.distributed.barrier()  # gloo's teardown aborts a rank whose peer left first
    torch.distributed.destroy_process_group()


def test_muon_shards_matrices_across_ranks(tmp_path):
    """Under DDP each rank orthogonalises its share (padded when the count does not divide) and all-gathers:
    the result is what one process computes alone."""
    torch.multiprocessing.spawn(muon_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "two.pt")), nprocs=2)
    muon_rank(0, 1, str(tmp_path / "init1"), str(tmp_path / "one.pt"))
    for a, b in zip(torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ---- FLOPs / MFU ----

def test_flops_per_token_matches_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64))
    idx = torch.randint(0, 256, (1, 64))
    # the math backend decomposes attention into matmuls the counter sees (the fused CPU kernel is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, targets=idx)[1].backward()
    measured = counter.get_total_flops() / idx.numel()  # matmuls incl. attention, forward + backward
    assert measured == pytest.approx(model.flops_per_token(), rel=0.01)  # formula also counts norm gains


def test_peak_flops_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA L40S") is None and peak_flops("Some GPU") is None
    model = GPT(tiny())
    assert model.estimate_mfu(1e5, "cpu") is None and model.estimate_mfu(1e5, torch.device("cpu")) is None


# ---- torch.compile ----

def test_torch_compile_whole_graph_forward_and_backward():
    """The model compiles as one graph (no breaks: the custom RMSNorm and RoPE functions trace), and the compiled
    forward and backward give eager's loss and gradients."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile (inductor) on CPU needs a C compiler; none found")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16, qk_norm=True))
    idx = torch.randint(0, 32, (2, 16))
    compiled = torch.compile(model, fullgraph=True)
    logits, loss = compiled(idx, targets=idx)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_logits, ref_loss = model(idx, targets=idx)
    ref_loss.backward()
    assert torch.allclose(logits, ref_logits, atol=1e-5) and torch.allclose(loss, ref_loss, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4)


# ---- numerics of the multi-GPU paths ----

def test_rmsnorm_function_keeps_float64():
    """Float64 in, float64 math: gradcheck of the hand-written backward passes (it failed when the function
    computed in float32 whatever the input)."""
    from model import RMSNormFunction
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), (x, w))
    ref = torch.nn.functional.rms_norm(x, (8,), w, 1e-5)
    assert RMSNormFunction.apply(x, w, 1e-5).dtype == torch.float64
    torch.testing.assert_close(RMSNormFunction.apply(x, w, 1e-5), ref, atol=1e-12, rtol=1e-12)


def test_muon_allocates_its_momentum_buffers_once(monkeypatch):
    model = GPT(tiny(n_layer=2))
    muon = model.configure_optimizers("muon", learning_rate=1e-2)[0]
    calls, real = [], torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: calls.append(None) or real(*a, **k))
    for _ in range(3):
        for p in muon_matrices(model):
            p.grad = torch.randn_like(p)
        muon.step()
    assert len(calls) == len(muon_matrices(model))  # the first step's buffers, nothing after


def test_muon_honours_torch_muons_adjust_lr_fn(monkeypatch):
    """A torch.optim.Muon state dict with torch's default scaling ("original", saved as None) keeps it: our
    next steps equal torch's. An adjust_lr_fn we do not know is refused, naming the field."""
    import torch.optim._muon as torch_muon
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", lambda g, coefficients, steps, eps:
                        naive_newton_schulz(g, steps, eps))
    ref = GPT(tiny(n_layer=2))
    ours = GPT(tiny(n_layer=2))
    ours.load_state_dict(ref.state_dict())
    torch_opt = torch.optim.Muon(muon_matrices(ref), lr=1e-2, weight_decay=0.1)  # adjust_lr_fn=None
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    ref(idx[:, :-1], targets=idx[:, 1:])[1].backward()
    torch_opt.step()
    torch_opt.zero_grad(set_to_none=True)
    ours.load_state_dict(ref.state_dict())
    muon = ours.configure_optimizers("muon", weight_decay=0.1, learning_rate=1e-2)[0]
    muon.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # load_state_dict shares the tensors
    assert muon.param_groups[0]["adjust_lr_fn"] is None
    before = [p.detach().clone() for p in muon_matrices(ours)]
    for model, opt in ((ours, muon), (ref, torch_opt)):
        model(idx[:, :-1], targets=idx[:, 1:])[1].backward()
        opt.step()
    for a, b, a0 in zip(muon_matrices(ours), muon_matrices(ref), before):
        assert (a - a0).abs().max() > 1e-3
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    state = torch_opt.state_dict()
    state["param_groups"][0]["adjust_lr_fn"] = "spectral"
    with pytest.raises(ValueError, match="adjust_lr_fn='spectral'"):
        muon.load_state_dict(state)


def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    """A V100 or T4 'supports' bf16 by emulation: training picks float16 + GradScaler there, and Muon's
    Newton-Schulz stays in float32."""
    import utils
    from model import native_bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert utils.pick_dtype("", "cuda") == "float16"
    assert not native_bf16(torch.device("cuda")) and not native_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert utils.pick_dtype("", "cuda") == "bfloat16" and native_bf16(torch.device("cuda"))


# ---- recurrent models: generate ----

def recurrent(name, **kw):
    cfg = dict(model=name, vocab_size=11, n_embd=8, n_hidden=12, n_layer=2, ffn_hidden=8, context_dim=8,
               chunk_sizes=(1, 2), surprise_weights=(0.1,))
    return LSTMConfig(**dict(cfg, **kw))


def naive_recurrent_greedy(model, idx, n):
    """The whole growing sequence through the model from a zero state at every step: no state carried."""
    for _ in range(n):
        logits, _, _, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def lively(model, seed=0):
    """Every weight N(0, 1): a random recurrent model whose greedy text depends on its state (sharpen's gains of
    ~1 make it settle on one token)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("name", RECURRENT_MODELS)
def test_recurrent_generate_equals_naive_loop(name):
    model = lively(build_recurrent(recurrent(name))).eval()
    idx = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = naive_recurrent_greedy(model, idx, 30)
        forgetful = idx
        for _ in range(30):  # what a generate that dropped the state would give: something else
            logits, _, _, _ = model(forgetful[:, -1:])
            forgetful = torch.cat([forgetful, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert len(set(ref[:, 5:].flatten().tolist())) >= 3 and not torch.equal(forgetful, ref)
    assert torch.equal(model.generate(idx, 30, temperature=0), ref)
    assert torch.equal(model.generate(idx, 30, top_k=1), ref)
    fed = []
    model.wte.register_forward_hook(lambda m, inp, out: fed.append(inp[0].size(1)))
    model.generate(idx, 10, temperature=0)
    assert fed == [5] + [1] * 9  # the prompt in one forward, then one token per step with the state carried


@pytest.mark.parametrize("name", RECURRENT_MODELS)
def test_recurrent_sampling_reproducible_top_k_and_n_vocab(name):
    model = sharpen(build_recurrent(recurrent(name)), std=0.1).eval()
    idx = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(0))

    def gen(seed, **kw):
        return model.generate(idx, 15, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(gen(0), gen(0)) and not torch.equal(gen(0), gen(1))
    out = gen(3, top_k=3, temperature=2.0)
    with torch.no_grad():
        logits, _, _, _ = model(out[:, :-1])
    for t in range(3, out.size(1)):
        for row in range(2):
            assert out[row, t] in torch.topk(logits[row, t - 1], 3).indices
    with torch.no_grad():
        model.lm_head.weight[6:] += 5.0  # ids 6.. would win every draw: pretend the tokenizer has 6
    assert (gen(0, n_vocab=6)[:, 3:] < 6).all() and (gen(0)[:, 3:] >= 6).any()


# ---- from_checkpoint: a checkpoint back to its model ----

def through_a_file(ckpt):
    """The checkpoint as the scripts get it: saved, and loaded with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def checkpoint_of(model):
    return dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config), step=0)


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=False, qk_norm=True),
                                dict(STYLES["classic"]), dict(STYLES["classic"], tie_embeddings=False)])
def test_from_checkpoint_gives_back_the_gpt(kw):
    ours = sharpen(GPT(tiny(**kw))).eval()
    loaded = from_checkpoint(through_a_file(checkpoint_of(ours)))
    assert type(loaded) is GPT and not loaded.training and loaded.config == ours.config
    tensors = dict(itertools.chain(loaded.named_parameters(), loaded.named_buffers()))
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors.values())
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == ours.config.tie_embeddings
    assert loaded.num_params() == ours.num_params()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(idx, idx)[0], ours(idx, idx)[0])  # RoPE's tables computed again, the same
    assert torch.equal(loaded.generate(idx[:, :3], 20, temperature=0), ours.generate(idx[:, :3], 20, temperature=0))


TIED = [("context_vector", dict(tie_embeddings=True)), ("lstm", dict(n_hidden=8, tie_embeddings=True))]


@pytest.mark.parametrize("name, kw", [(name, {}) for name in RECURRENT_MODELS] + TIED)
def test_from_checkpoint_gives_back_the_recurrent_model(name, kw):
    ours = sharpen(build_recurrent(recurrent(name, **kw))).eval()
    ckpt = checkpoint_of(ours)
    ckpt["model_config"].update(chunk_sizes=[1, 2], surprise_weights=[0.1])  # as lists, as JSON would have them
    loaded = from_checkpoint(through_a_file(ckpt))
    assert type(loaded) is type(ours) and not loaded.training and loaded.config == ours.config
    assert loaded.config.chunk_sizes == (1, 2) and loaded.config.surprise_weights == (0.1,)
    assert (loaded.lm_head.weight is loaded.wte.weight) == ours.config.tie_embeddings
    assert loaded.num_params() == ours.num_params()
    idx = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (logits, _, state, _), (ref, _, ref_state, _) = loaded(idx), ours(idx)
    assert torch.equal(logits, ref) and all(torch.equal(a, b) for a, b in zip(state, ref_state))


def test_from_checkpoint_refuses_a_huge_config_before_building_it():
    """A few kilobytes of weights under a model_config of ~0.8 TB (n_layer=64, n_embd=16384): refused, naming the
    first key or setting that does not fit, in milliseconds (the test of sample.py measures the memory)."""
    small = checkpoint_of(GPT(tiny(n_layer=2, n_embd=16)))
    for config, message in [
        (dict(n_layer=64, n_embd=16384, n_head=128), "n_layer=64, but the weights are 15 tensors"),
        (dict(n_embd=16384, n_head=128), "transformer.wte.weight is (64, 16), the model_config needs (64, 16384)"),
        (dict(block_size=1 << 40), "block_size=1099511627776: its RoPE tables would take"),
    ]:
        start = time.perf_counter()
        with pytest.raises(ValueError) as info:
            from_checkpoint(dict(small, model_config=dict(small["model_config"], **config)))
        assert time.perf_counter() - start < 1
        assert str(info.value).startswith("a GPT of train_gpt2.py whose ") and message in str(info.value)


def spoil(key, value):
    return lambda sd, config: sd.__setitem__(key, value)


@pytest.mark.parametrize("change, message", [
    (lambda sd, config: sd.pop("transformer.ln_f.weight"), "the state dict lacks transformer.ln_f.weight"),
    (spoil("extra.weight", torch.zeros(1)), "the state dict has an unexpected extra.weight"),
    (spoil("transformer.h.0.mlp.c_fc.weight", torch.zeros(3, 3)),
     "transformer.h.0.mlp.c_fc.weight is (3, 3), the model_config needs (256, 32)"),
    (spoil("transformer.ln_f.weight", torch.ones(32, dtype=torch.long)), "transformer.ln_f.weight is a torch.strided "
                                                                         "torch.int64 tensor, the model wants"),
    (spoil("transformer.ln_f.weight", [1.0] * 32), "'transformer.ln_f.weight' is no named tensor"),
    (spoil("transformer.h.1.attn.c_proj.weight", torch.full((32, 32), float("nan"))),
     "not finite: transformer.h.1.attn.c_proj.weight holds NaN or inf"),
    (spoil("transformer.wte.weight", torch.full((64, 32), float("-inf"))), "transformer.wte.weight holds NaN or inf"),
    (lambda sd, config: config.update(new_knob=1), "model_config has 'new_knob', which GPTConfig does not know"),
    (lambda sd, config: config.update(n_layer="2"), "n_layer='2', not an integer"),
    (lambda sd, config: config.update(n_head=True), "n_head=True, not an integer"),
    (lambda sd, config: config.update(rope_base=float("inf")), "rope_base=inf, not a finite number"),
    (lambda sd, config: config.update(n_head=3), "n_embd=32 must be divisible by n_head=3"),
    (lambda sd, config: config.update(rope_base=-2.0), "rope_base=-2.0: its RoPE tables are not finite"),
])
def test_from_checkpoint_names_what_does_not_fit(change, message):
    ckpt = checkpoint_of(GPT(tiny()))
    change(ckpt["model"], ckpt["model_config"])
    with pytest.raises(ValueError) as info:
        from_checkpoint(ckpt)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("ckpt, message", [
    ({"weights": torch.zeros(2)}, "not a checkpoint of train_gpt2.py or train_lstm.py"),
    (dict(model={}, model_config="gpt"), "not a checkpoint of train_gpt2.py or train_lstm.py"),
    (dict(model={}, model_config=dict(model="transformer")), "model='transformer'; known: lstm, nested_lstm"),
    (dict(model={}, model_config=dict(model="lstm", n_hidden=0)), "n_hidden=0: sizes must be >= 1"),
    (dict(model={}, model_config=dict(model="lstm", chunk_sizes="1,2")), "chunk_sizes='1,2', not a tuple"),
    (dict(model={f"w{i}": torch.zeros(1) for i in range(3)},
          model_config=dict(model="nested_lstm", chunk_sizes=[2, 16])),
     "nested_lstm) of train_lstm.py whose model_config does not build: chunk_sizes must start with 1"),
    (dict(model={}, model_config=dict(model="nested_lstm")), "nested_lstm) of train_lstm.py whose weights do not "
                                                             "fit its model_config: n_layer=2, but the weights are 0"),
])
def test_from_checkpoint_refuses_what_is_no_model(ckpt, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        from_checkpoint(ckpt)
    if "does not build" not in message and "weights" not in message:  # the config alone says it
        with pytest.raises(ValueError, match=re.escape(message)):
            config_from_checkpoint(ckpt)
