"""Every model of the repo in one file: the GPT, the recurrent models, loading a checkpoint.

GPT: a GPT-2 compatible decoder-only transformer whose architecture is a set of config switches,
modern by default (RoPE + SwiGLU + RMSNorm + pre-norm + tied embeddings + no biases). The "classic"
style is exactly GPT-2 and loads its weights (GPT.from_pretrained); module names are nanoGPT's."""

import dataclasses
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ==== Part 1: the GPT (its config, building blocks, the model, its optimizer Muon) ====
POS_EMBS = ("rope", "learned", "none")  # rotary on q/k, a learned table, or no positions
MLPS = ("swiglu", "gelu", "silu", "relu2")  # swiglu is gated; the others are plain 2-layer MLPs
NORMS = ("rmsnorm", "layernorm", "none")
NORM_POSS = ("pre", "post")  # pre: x + f(norm(x)) (GPT-2); post: norm(x + f(x)) (the original)
NORM_EPS = 1e-5  # of every norm: GPT-2's LayerNorm epsilon (needed for weight parity)

SIZES = {  # GPT-2's; combine with a style: GPTConfig.preset("gpt2", style="modern")
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
STYLES = {  # architectures
    "modern": dict(pos_emb="rope", mlp="swiglu", norm="rmsnorm", norm_pos="pre",
                   tie_embeddings=True, bias=False),
    "classic": dict(pos_emb="learned", mlp="gelu", norm="layernorm", norm_pos="pre",
                    tie_embeddings=True, bias=True),
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # max context length (tokens)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    pos_emb: str = "rope"  # one of POS_EMBS
    mlp: str = "swiglu"  # one of MLPS
    norm: str = "rmsnorm"  # one of NORMS
    norm_pos: str = "pre"  # one of NORM_POSS
    qk_norm: bool = False  # RMSNorm on each head's q and k (before RoPE)
    tie_embeddings: bool = True  # lm_head.weight is wte.weight
    bias: bool = False  # biases in Linear layers and LayerNorm
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches
    rope_base: float = 10000.0  # RoPE frequency base (theta)
    mlp_hidden: int = 0  # MLP hidden width; 0 = derive (see mlp_hidden_size)

    def __post_init__(self):
        lows = dict(block_size=1, vocab_size=1, n_layer=1, n_head=1, n_embd=1, mlp_hidden=0)
        for name, low in lows.items():
            if getattr(self, name) < low:
                raise ValueError(f"GPTConfig.{name} must be >= {low}, got {getattr(self, name)}")
        for name, known in dict(pos_emb=POS_EMBS, mlp=MLPS, norm=NORMS, norm_pos=NORM_POSS).items():
            if getattr(self, name) not in known:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r} is unknown; "
                                 f"allowed: {', '.join(known)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: pos_emb='rope' needs an even head size (n_embd/n_head), "
                             f"got {self.n_embd}/{self.n_head}={self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def mlp_hidden_size(self):
        # ungated: 4*C as GPT-2 (8*C^2 weights); SwiGLU's three C x H matrices match that at H = 8C/3,
        # rounded up to a multiple of 64 (768 -> 2048; tiny widths overshoot: set mlp_hidden)
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @classmethod
    def preset(cls, name, style="modern", **overrides):
        """GPTConfig.preset("gpt2", style="classic", block_size=512): a size and a style."""
        for what, key, table in (("size", name, SIZES), ("style", style, STYLES)):
            if key not in table:
                raise ValueError(f"GPTConfig.preset: unknown {what} {key!r}; allowed: {', '.join(table)}")
        return cls(**{**STYLES[style], **SIZES[name], **overrides})


def make_norm(config, dim):
    if config.norm == "rmsnorm":
        return RMSNorm(dim)
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=NORM_EPS, bias=config.bias)
    return nn.Identity()


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: nn.RMSNorm's math and state dict. Eager, RMSNormFunction
    (autograd's backward of rms_norm, ~15 small kernels, is 3x slower than LayerNorm's on a CPU)."""

    def __init__(self, dim, eps=NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if torch.compiler.is_compiling():  # inductor fuses rms_norm's autograd itself
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return RMSNormFunction.apply(x, self.weight, self.eps)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with LayerNorm's fused backward kernel: RMSNorm is LayerNorm with mean 0, so that
    backward given mean 0 and RMSNorm's rstd is right but for its mean subtraction's term,
    -rstd * mean(g * weight), cancelled here. In float32 (as CUDA autocast runs norms)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        wide = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
        xw, C = x.to(wide), x.size(-1)
        # three passes over x: its norm (one fused reduction), then two multiplies
        mean_square = torch.linalg.vector_norm(xw, dim=-1, keepdim=True).square_().div_(C)
        rstd = torch.rsqrt(mean_square.add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return (xw * rstd).mul_(weight.to(wide)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        wide, C = rstd.dtype, x.size(-1)
        grad, weight_w = grad.to(wide).contiguous(), weight.to(wide)
        grad_x, grad_w, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x.to(wide), [C], torch.zeros_like(rstd), rstd, weight_w, None, [True, True, False])
        grad_x += rstd * (grad @ weight_w).unsqueeze(-1) / C  # + rstd * mean(g * weight)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


def rope_tables(T, head_size, base):
    """cos, sin tables (T, 1, head_size) for apply_rope, the 1 broadcasting over heads. Pair
    i = (x[i], x[i + hs/2]) turns by pos * base^(-2i/hs); `cos` holds each pair's cosine in both
    halves, `sin` (-sin, +sin): the rotation is one multiply-add, x * cos + swap_halves(x) * sin."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)  # (T, hs/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1).unsqueeze(1), torch.cat([-sin, sin], -1).unsqueeze(1)


def apply_rope(x, cos, sin):
    """Rotate x (B, T, heads, hs) by its positions' angles (GPT-NeoX / Llama layout): q.k then
    depends only on the positions' distance. Done before the transpose for attention, so no pass
    reads or writes with strides; the gradient is the rotation by minus the angle (RotaryFunction)."""
    return RotaryFunction.apply(x, cos.to(x.dtype), sin.to(x.dtype))


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, -sin), None, None


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([x2, x1], dim=-1), sin)


class KVCache:
    """Keys and values of the positions seen so far, per layer, for up to max_len positions;
    allocated at the first update, in the keys' dtype and device (e.g. bf16 under autocast)."""

    def __init__(self, n_layer, max_len):
        self.max_len, self.pos = max_len, 0  # pos: positions stored so far (GPT.forward advances it)
        self.k, self.v = [None] * n_layer, [None] * n_layer

    def update(self, layer, k, v):  # k, v (B, nh, T, hs) of new positions -> those of all so far
        if self.k[layer] is None:
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_empty(B, nh, self.max_len, hs)
            self.v[layer] = v.new_empty(B, nh, self.max_len, hs)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.layer_idx, self.dropout = config.n_head, layer_idx, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k and v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        head_size = config.n_embd // config.n_head
        self.qk_norm = config.qk_norm
        self.q_norm = RMSNorm(head_size) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_size) if config.qk_norm else nn.Identity()
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache=None):
        B, T, C = x.size()
        nh = self.n_head
        qkv = self.c_attn(x).view(B, T, 3 * nh, C // nh)  # the heads of q, k and v side by side
        qk, v = qkv.split([2 * nh, nh], dim=2)  # (B, T, 2nh, hs), (B, T, nh, hs)
        if self.qk_norm:  # per-head RMSNorm, each of q and k with its own gain
            q, k = qk.split(nh, dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2).type_as(v)  # SDPA: one dtype
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k in one pass
        q, k = qk.transpose(1, 2).split(nh, dim=1)  # (B, nh, T, hs) views
        v = v.transpose(1, 2)
        past = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        mask = None  # no cache: is_causal; one new token: it sees all. No mask lets SDPA pick Flash
        if past and T > 1:  # tokens after a cached prefix: is_causal would align the mask top-left
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=past == 0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind, hidden = config.mlp, config.mlp_hidden_size
        n_out = 2 * hidden if config.mlp == "swiglu" else hidden  # swiglu: gate and up in one matmul
        self.c_fc = nn.Linear(config.n_embd, n_out, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "gelu":  # GPT-2's tanh approximation: exact GELU breaks weight parity
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "silu":
            h = F.silu(h)
        else:  # relu2: squared ReLU (Primer, modded-nanogpt)
            h = F.relu(h).square()
        return self.drop(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.post_norm = config.norm_pos == "post"
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, kv_cache=None):
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, rope, kv_cache))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        return x + self.mlp(self.ln_2(x))


def cross_entropy(logits, targets, reduction="mean", ignore_index=-1):
    """Cross-entropy of logits (B, T, V) in float32 whatever the autocast dtype (a bf16 log-softmax
    over 50k classes loses precision); reduction="none" gives (B, T), 0 where ignored."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                           reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def next_token(logits, temperature, top_k, generator):
    """One token id per row, (B, 1), from float logits (B, V): greedy at temperature 0 or top_k 1,
    else a draw from softmax(logits / temperature) among the top_k likeliest (all for None)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        modules["ln_f"] = make_norm(config, config.n_embd)  # post-norm: redundant; kept for keys
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # and again after load_state_dict(assign=True), which unties
            self.lm_head.weight = self.transformer.wte.weight
            self.register_load_state_dict_post_hook(
                lambda m, _keys: setattr(m.lm_head, "weight", m.transformer.wte.weight))
        if config.pos_emb == "rope":  # tables derived from the config: non-persistent, not saved
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual outputs: the stream's variance O(1) in depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if module is self.lm_head and self.config.tie_embeddings:
            return  # same tensor as wte: initialised once, as an embedding
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def forward(self, idx, targets=None, ignore_index=-1, kv_cache=None, reduction="mean"):
        """(logits, loss). With targets: logits (B, T, V) and cross_entropy's float32 loss (mean, or
        per token with reduction="none"). Without: the last position's logits (B, 1, V) and None."""
        T = idx.size(1)
        pos0 = kv_cache.pos if kv_cache is not None else 0  # absolute position of idx[:, 0]
        if pos0 + T > self.config.block_size:
            raise ValueError(f"{pos0 + T} tokens exceed block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(torch.arange(pos0, pos0 + T, device=idx.device))
        rope = None
        if self.config.pos_emb == "rope":
            rope = (self.rope_cos[pos0:pos0 + T], self.rope_sin[pos0:pos0 + T])  # (T, 1, hs) each
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is None:  # inference: only the last position's logits are needed
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        logits = self.lm_head(x)  # (B, T, V)
        return logits, cross_entropy(logits, targets, reduction, ignore_index)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_token=None,
                 generator=None, n_vocab=None):
        """Extend idx (B, T) by up to max_new_tokens tokens from next_token, ids below n_vocab only;
        with eos_token, stop once every row has it. Past block_size, each step recomputes the last
        block_size without the KV cache (as a cropping loop would). Call model.eval() first."""
        cache = KVCache(self.config.n_layer, self.config.block_size)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if idx.size(1) > self.config.block_size:
                logits, _ = self(idx[:, -self.config.block_size:])
            else:  # feed only the tokens not yet in the cache (the whole prompt on the first step)
                logits, _ = self(idx[:, cache.pos:], kv_cache=cache)
            next_tok = next_token(logits[:, -1, :n_vocab].float(), temperature, top_k, generator)
            if eos_token is not None:
                next_tok = next_tok.masked_fill(done[:, None], eos_token)
                done |= next_tok[:, 0] == eos_token
            idx = torch.cat([idx, next_tok], dim=1)
            if eos_token is not None and bool(done.all()):
                break
        return idx

    def configure_optimizers(self, optimizer="muon", weight_decay=0.1, learning_rate=6e-4,
                             betas=(0.9, 0.95), eps=1e-8, device_type="cpu", muon_split_qkv=False):
        """Optimizers covering every parameter once: AdamW (weight decay on 2-D+ tensors only), and
        with muon, Muon for the blocks' 2-D matrices (muon_split_qkv: c_attn as q, k and v apart,
        as modded-nanogpt). One learning_rate for all; each param group has a `kind`."""
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer={optimizer!r} is unknown; allowed: adamw, muon")
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        muon_groups = []
        if optimizer == "muon":
            hidden = {name: p for name, p in params.items()
                      if name.startswith("transformer.h.") and p.dim() == 2}
            qkv = [n for n in hidden if muon_split_qkv and n.endswith("attn.c_attn.weight")]
            if qkv:
                muon_groups.append(dict(params=[hidden.pop(n) for n in qkv], pieces=3, kind="qkv"))
            muon_groups.append(dict(params=list(hidden.values()), kind="hidden"))
        in_muon = {id(p) for g in muon_groups for p in g["params"]}
        decay = [p for p in params.values() if p.dim() >= 2 and id(p) not in in_muon]
        no_decay = [p for p in params.values() if p.dim() < 2]
        groups = [dict(params=decay, weight_decay=weight_decay, kind="matrices"),
                  dict(params=no_decay, weight_decay=0.0, kind="gains")]
        groups = [g for g in groups if g["params"]]
        for group in muon_groups + groups:  # the LR schedule scales each one's (training.set_lr)
            group["initial_lr"] = learning_rate
        # fused AdamW (one kernel for all tensors; CUDA, and CPU since torch 2.4: ~5% faster steps)
        # needs every parameter on that one device type: a partly offloaded model is unfused
        kinds = {p.device.type for p in params.values()}
        fused = len(kinds) == 1 and kinds <= {"cuda", "cpu"} and device_type in kinds
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)]
        if muon_groups:
            optimizers.insert(0, Muon(muon_groups, lr=learning_rate, weight_decay=weight_decay))
        return optimizers

    def flops_per_token(self):
        """Training FLOPs per token as nanoGPT (PaLM appendix B): 6N + 12 n_layer n_embd block_size
        (attention: all of T x T), N = the parameters of the blocks, ln_f and lm_head (tied too)."""
        cfg = self.config
        n = sum(p.numel() for p in self.transformer.h.parameters())
        n += sum(p.numel() for p in self.transformer.ln_f.parameters())
        n += self.lm_head.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_sec, device):
        """Model FLOPs utilisation against the GPU's peak bf16 rate; None off CUDA, unknown GPUs."""
        device = torch.device(device)
        peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        return None if peak is None else self.flops_per_token() * tokens_per_sec / peak

    # Hugging Face's GPT-2 keeps these as Conv1D weights, (in, out): transposed to/from nn.Linear
    HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_hf_state_dict(cls, sd, config):
        """GPT(config) holding a Hugging Face GPT-2 state dict (GPT2LMHeadModel or GPT2Model)."""
        _check_gpt2_compatible(config)
        model = cls(config)
        ours = {}
        for key, tensor in sd.items():
            if re.search(r"\.h\.\d+\.attn\.(bias|masked_bias)$", key):
                continue  # HF's causal-mask buffers, not weights
            if not key.startswith(("transformer.", "lm_head.")):
                key = "transformer." + key  # GPT2Model has no "transformer." prefix
            if key.endswith(cls.HF_TRANSPOSED):
                tensor = tensor.t()
            ours[key] = tensor
        if "lm_head.weight" not in ours and config.tie_embeddings:
            ours["lm_head.weight"] = ours["transformer.wte.weight"]
        model.load_state_dict(ours)  # strict: any missing or unexpected key is an error
        return model

    def to_hf_state_dict(self):
        """The state dict in Hugging Face GPT2LMHeadModel's layout (Conv1D weights as (in, out))."""
        _check_gpt2_compatible(self.config)
        return {k: (v.t().contiguous() if k.endswith(self.HF_TRANSPOSED) else v)
                for k, v in self.state_dict().items()}

    @classmethod
    def from_pretrained(cls, name, dropout=0.0):
        """GPT-2's weights by `transformers`: a name in SIZES (from the Hugging Face hub or its
        cache) or a GPT2LMHeadModel's folder. Their vocabulary stays (GPT-2: 50257, unpadded)."""
        if name not in SIZES and not os.path.isdir(name):
            raise ValueError(f"from_pretrained: unknown model {name!r}; allowed: "
                             f"{', '.join(SIZES)}, or a folder of Hugging Face GPT-2 weights")
        try:
            from transformers import GPT2LMHeadModel  # imported here: training never needs it
        except ImportError as e:
            raise RuntimeError("GPT.from_pretrained needs it: pip install transformers") from e
        try:
            hf = GPT2LMHeadModel.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"could not load {name!r} from the Hugging Face hub or its cache "
                               f"(offline?): {e}") from e
        c = hf.config
        if c.activation_function != "gelu_new" or (c.n_inner or 4 * c.n_embd) != 4 * c.n_embd:
            raise ValueError(f"from_pretrained: {name!r} is not GPT-2's layout (activation "
                             f"{c.activation_function}, MLP width {c.n_inner})")
        config = GPTConfig(**{**STYLES["classic"], "tie_embeddings": c.tie_word_embeddings},
                           n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                           vocab_size=c.vocab_size, block_size=c.n_positions, dropout=dropout)
        return cls.from_hf_state_dict(hf.state_dict(), config)


def _check_gpt2_compatible(config):
    gpt2 = dict(STYLES["classic"], qk_norm=False, mlp_hidden_size=4 * config.n_embd)
    wrong = [f"{k}={getattr(config, k)!r} (GPT-2: {v!r})" for k, v in gpt2.items()
             if k != "tie_embeddings" and getattr(config, k) != v]  # HF unties too
    if wrong:
        raise ValueError("the GPT-2 weight layout needs the classic style; config has "
                         + ", ".join(wrong))


# peak dense bf16 tensor-core FLOP/s (FP32 accumulate; V100: fp16), from NVIDIA datasheets; whole
# words of torch.cuda.get_device_name(), first match wins ("H100 PCIe" before "H100"; "L4" != "L40S")
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
              ("H200", 989e12), ("A100", 312e12), ("RTX 5090", 209e12), ("RTX 4090", 165e12),
              ("L4", 121e12), ("V100", 125e12))


def peak_flops(device_name):
    """Peak dense bf16 FLOP/s for a GPU name like "NVIDIA H100 80GB HBM3", or None if unknown."""
    for key, flops in PEAK_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, re.I):
            return flops
    return None


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update and state, made cheap: the matrices of one shape are orthogonalised
    by Newton-Schulz (NS) in one batched call; under DDP each rank does a share (as modded-nanogpt).
    For p (A x B) with gradient g and momentum buffer m:
        m <- momentum * m + (1 - momentum) * g;  u = g + momentum * (m - g)  (Nesterov; else u = m)
        p <- p * (1 - lr * weight_decay) - lr * lr_scale(A, B) * NS(u)
    A group's `pieces` = k treats each (k * A) x B parameter as k A x B matrices (q, k and v)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5,
                 eps=1e-7, pieces=1, adjust_lr_fn="match_rms_adamw"):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, eps=eps, pieces=pieces, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.size(0) % group["pieces"]:
                    raise ValueError(f"Muon takes 2-D parameters whose rows split into "
                                     f"{group['pieces']} pieces, got shape {tuple(p.shape)}")
            lr_scale(group, 1, 1)  # an unknown adjust_lr_fn is refused here, not at the first step

    def __setstate__(self, state):
        # torch.optim.Muon's state: our options added, its adjust_lr_fn (None: "original") kept
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            lr_scale(group, 1, 1)

    @torch.no_grad()
    def step(self):
        # 1. momentum for every parameter (every rank keeps all the state: rank 0 checkpoints it)
        blocks = {}  # (shape, device, ns_steps, eps) -> [(param, group, piece index, update block)]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:  # allocated once, not a zero-filled tensor per parameter per step
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
            for p, u in zip(params, updates):
                for i, block in enumerate(u.chunk(group["pieces"], dim=0)):
                    key = (tuple(block.shape), p.device, group["ns_steps"], group["eps"])
                    blocks.setdefault(key, []).append((p, group, i, block))
        # 2. orthogonalise each shape's matrices in one batched call, split across ranks
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        done = {}  # id(param) -> list of its orthogonalised blocks
        for (shape, _, ns_steps, eps), items in blocks.items():
            stack = torch.stack([block for *_, block in items])  # (n, A, B)
            per_rank = -(-len(items) // world)  # ceil(n / world); the last rank's share is zero-padded
            if per_rank * world > len(items):
                stack = torch.cat([stack, stack.new_zeros(per_rank * world - len(items), *shape)])
            mine = stack[rank * per_rank:(rank + 1) * per_rank]
            ortho = zeropower_via_newtonschulz5(mine, ns_steps, eps)
            if world > 1:  # every rank gets every update (in bf16 on CUDA: half the bytes)
                gathered = ortho.new_empty(per_rank * world, *shape)
                dist.all_gather_into_tensor(gathered, ortho.contiguous())
                ortho = gathered
            for (p, group, i, _), matrix in zip(items, ortho):
                done.setdefault(id(p), [None] * group["pieces"])[i] = matrix
        # 3. decoupled weight decay, then the scaled update
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in done]
            if not params:
                continue
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            for p in params:
                A, B = done[id(p)][0].shape
                update = torch.cat(done[id(p)]) if group["pieces"] > 1 else done[id(p)][0]
                p.add_(update.to(p.dtype), alpha=-group["lr"] * lr_scale(group, A, B))


def lr_scale(group, A, B):
    """Muon's LR factor for an A x B matrix by the group's adjust_lr_fn, as torch.optim.Muon's."""
    kind = group["adjust_lr_fn"]
    if kind == "match_rms_adamw":  # ours: the update gets AdamW's RMS, so one LR serves both
        return 0.2 * math.sqrt(max(A, B))
    if kind in (None, "original"):
        return math.sqrt(max(1, A / B))
    raise ValueError(f"Muon: adjust_lr_fn={kind!r} in the optimizer state is unknown; "
                     f"allowed: 'match_rms_adamw', 'original' (or None)")


def native_bf16(device):
    """Whether `device` multiplies bfloat16 in hardware: CUDA from Ampere on. Pre-Ampere GPUs (V100,
    T4) emulate it slowly, which torch.cuda.is_bf16_supported() counts unless told not to."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def zeropower_via_newtonschulz5(G, steps=5, eps=1e-7):
    """(n, A, B) -> (n, A, B): each matrix to ~U V^T of its SVD (singular values into ~[0.7, 1.2])
    by torch.optim.Muon's quintic Newton-Schulz X <- p(X X^T) X, p(S) = a + b S + c S^2. In bf16
    where native, else float32, where a wide X (m x k, k >= 2m) takes the Gram form: all steps are
    one m x m polynomial P of S = X X^T (S <- S p(S)^2: they commute), so X is touched twice, not
    ten times: the same to ~1e-6, 2.2x faster for the MLP's 128 x 768 on a CPU (bf16: 2x error)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if native_bf16(G.device) else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: the m x m Gram matrix is the smaller one
        X = X.mT
    norm = X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # X / norm: spectral norm <= 1
    if X.dtype == torch.float32 and X.size(-1) >= 2 * X.size(-2):
        S, P = (X @ X.mT) / norm.square(), None  # the scaling goes to the m x m matrices, not to X
        for k in range(steps):
            Z = torch.baddbmm(S, S, S, beta=b, alpha=c)
            Z.diagonal(dim1=-2, dim2=-1).add_(a)  # p(S) = a I + b S + c S^2
            P = Z if P is None else Z @ P
            if k < steps - 1:
                S = S @ (Z @ Z)
        X = (P / norm) @ X
    else:
        X = X / norm
        for _ in range(steps):
            S = X @ X.mT
            X = torch.baddbmm(X, torch.baddbmm(S, S, S, beta=b, alpha=c), X, beta=a)
    return X.mT if tall else X


# ==== Part 2: the recurrent models of EXPERIMENTS.md §4 and §5 (trained by train_lstm.py) ====
# lstm: embedding -> multi-layer LSTM -> head, the baseline. nested_lstm (§4): the LSTM (level 1)
# then residual FFN levels 2.. with "surprise" heads, stepped every C_k optimizer steps (gradients
# accumulated, LR scaled 1/C_k). context_vector (§5): layers that carry a context vector c on.
# forward(idx, targets=None, state=None, reset_token=None) -> (logits, loss, new_state, aux):
#   logits and loss as GPT's; state = tuple of (n_layer, B, width) tensors (None = zeros; the caller
#   detaches new_state); reset_token: an id (EOT) before which a row's state is zeroed (documents);
#   aux: extra scalars, all logged; those in model.aux_weights are added to the loss, weighted.


@dataclass
class LSTMConfig:
    model: str = "nested_lstm"         # lstm | nested_lstm | context_vector
    vocab_size: int = 283              # §4: char-level WikiText has 283 symbols
    n_embd: int = 128                  # token embedding width
    n_hidden: int = 256                # LSTM width; context_vector: width of each layer's hidden h
    n_layer: int = 2                   # stacked LSTM layers; context_vector: stacked context layers
    dropout: float = 0.0               # on the embedding, between LSTM layers and before the head
    tie_embeddings: bool = False       # share wte and lm_head (needs n_embd == width fed to the head)
    chunk_sizes: tuple = (1, 16, 256)  # nested_lstm: optimizer steps between updates, one per level
    ffn_hidden: int = 192              # nested_lstm: hidden width of each slow level's FFN
    surprise_weights: tuple = (0.05, 0.01)  # nested_lstm: loss weight of each slow level's surprise head
    context_dim: int = 256             # context_vector: width of the carried context vector
    # defaults = §4 (1.23M params at vocab 283). §5: context_vector, vocab_size=1000, n_embd=256,
    # n_hidden=512, context_dim=256, n_layer=6, tie_embeddings=True: 3.41M (§5's ungated: 2.74M)

    def __post_init__(self):
        if self.model not in RECURRENT_MODELS:
            raise ValueError(f"model={self.model!r}; known: {', '.join(RECURRENT_MODELS)}")
        small = [f"{k}={v}" for k, v in vars(self).items() if type(v) is int and v < 1]
        if small:
            raise ValueError(f"{', '.join(small)}: sizes must be >= 1")


class RecurrentLM(nn.Module):
    """What the three models share: embedding, head, init, state, parameter levels."""

    def __init__(self, cfg, head_width):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(head_width, cfg.vocab_size, bias=False)
        nn.init.normal_(self.wte.weight, std=0.02)
        if cfg.tie_embeddings:
            if cfg.n_embd != head_width:
                raise ValueError(f"tie_embeddings needs n_embd ({cfg.n_embd}) "
                                 f"== the head's input width ({head_width})")
            self.lm_head.weight = self.wte.weight  # and again after load_state_dict(assign=True)
            self.register_load_state_dict_post_hook(
                lambda m, _keys: setattr(m.lm_head, "weight", m.wte.weight))
        self.aux_weights = {}  # aux name -> weight in the training loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def level_params(self):
        """Parameters by update level: level 1 (all but the slow levels) steps every step."""
        slow = {id(p) for level in self.levels for p in level.parameters()}
        fast = [p for p in self.parameters() if id(p) not in slow]
        return [fast] + [list(level.parameters()) for level in self.levels]

    def head(self, y, targets):
        logits = self.lm_head(self.drop(y))  # (B, T, V)
        return logits, (cross_entropy(logits, targets) if targets is not None else None)

    def init_state(self, batch_size, device):
        return tuple(torch.zeros(self.config.n_layer, batch_size, w, device=device)
                     for w in self.state_widths)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, n_vocab=None):
        """Extend idx (B, T) by max_new_tokens tokens drawn as GPT.generate draws them: the prompt
        in one forward, then each new token alone with the state carried (no context limit)."""
        logits, _, state, _ = self(idx)
        for k in range(max_new_tokens):
            next_tok = next_token(logits[:, -1, :n_vocab].float(), temperature, top_k, generator)
            idx = torch.cat([idx, next_tok], dim=1)
            if k + 1 < max_new_tokens:  # the last token is returned, never fed
                logits, _, state, _ = self(next_tok, state=state)
        return idx


class LSTMLM(RecurrentLM):
    def __init__(self, cfg):
        super().__init__(cfg, cfg.n_hidden)
        self.lstm = nn.LSTM(cfg.n_embd, cfg.n_hidden, cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.state_widths = (cfg.n_hidden, cfg.n_hidden)  # (h, c)
        self.levels = nn.ModuleList()  # between the LSTM and the head: NestedLSTM's slow levels

    def forward(self, idx, targets=None, state=None, reset_token=None):
        """nn.LSTM cannot zero a row's state inside its fused loop: the window is cut at every
        column holding a reset_token (rare: document boundaries)."""
        h, c = state if state is not None else self.init_state(idx.size(0), idx.device)
        x = self.drop(self.wte(idx))  # (B, T, n_embd)
        if reset_token is None:
            y, (h, c) = self.lstm(x, (h, c))  # y (B, T, n_hidden)
        else:
            is_reset = idx == reset_token  # (B, T)
            cuts = torch.nonzero(is_reset.any(0)).flatten().tolist()
            bounds = sorted(set([0, x.size(1)] + cuts))
            pieces = []
            for a, b in zip(bounds[:-1], bounds[1:]):
                keep = (~is_reset[:, a]).to(h.dtype).view(1, -1, 1)  # (1, B, 1)
                out, (h, c) = self.lstm(x[:, a:b], (h * keep, c * keep))
                pieces.append(out)
            y = torch.cat(pieces, 1)
        aux = {}
        if targets is not None and len(self.levels):
            with torch.no_grad():  # the fast path's per-token surprise, a detached target
                fast = cross_entropy(self.lm_head(y), targets, reduction="none")
            mask = targets != -1
            aux["fast_loss"] = fast[mask].mean()  # level 1 alone: shows what the slow levels add
        for k, level in enumerate(self.levels):
            y, predicted = level(y)
            if targets is not None:
                aux[f"surprise{k + 2}"] = F.mse_loss(predicted[mask], fast[mask])
        return *self.head(y, targets), (h.float(), c.float()), aux  # float32 states under autocast


class SlowLevel(nn.Module):
    """A residual FFN block on the LSTM output, plus its surprise head, which predicts from the
    FFN's hidden activation the per-token cross-entropy of level 1 alone (the LSTM output through
    the head, no gradient); the MSE makes the LSTM represent how predictable the next token is."""

    def __init__(self, width, ffn_hidden, vocab_size):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, ffn_hidden)
        self.c_proj = nn.Linear(ffn_hidden, width)
        self.surprise = nn.Linear(ffn_hidden, 1)
        # a new level starts as the identity: it can only add to level 1
        nn.init.zeros_(self.c_proj.weight)
        nn.init.zeros_(self.c_proj.bias)
        nn.init.constant_(self.surprise.bias, math.log(vocab_size))  # a uniform guess's, in nats

    def forward(self, y):
        a = F.gelu(self.c_fc(self.ln(y)))  # (B, T, ffn_hidden)
        return y + self.c_proj(a), self.surprise(a).squeeze(-1).float()  # (B, T, C), (B, T)


class NestedLSTM(LSTMLM):
    def __init__(self, cfg):
        super().__init__(cfg)
        chunks, weights = tuple(cfg.chunk_sizes), tuple(cfg.surprise_weights)
        if len(chunks) < 1 or chunks[0] != 1 or any(int(c) < 1 for c in chunks):
            raise ValueError(f"chunk_sizes must start with 1 (level 1 steps every step), got {chunks}")
        if len(weights) != len(chunks) - 1:
            raise ValueError(f"surprise_weights needs one weight per slow level "
                             f"({len(chunks) - 1}), got {weights}")
        self.levels = nn.ModuleList(SlowLevel(cfg.n_hidden, cfg.ffn_hidden, cfg.vocab_size)
                                    for _ in chunks[1:])
        self.aux_weights = {f"surprise{k + 2}": float(w) for k, w in enumerate(weights)}


class ContextLayer(nn.Module):
    """For each token t, from u_t (the layer below) and c_{t-1} (this layer's context vector):
        h_t = tanh(W_u u_t + W_c c_{t-1} + b)                        (n_hidden)
        z_t = sigmoid(W_z h_t + b_z),  g_t = tanh(W_g h_t + b_g)      (context_dim each)
        c_t = (1 - z_t) * c_{t-1} + z_t * g_t                        (context_dim)
    c_t goes to the next token and up. Without the gate z a tanh recurrence trained on persistent
    states locks into one attractor, and a fresh state (evaluation) is far worse."""

    def __init__(self, n_in, n_hidden, context_dim):
        super().__init__()
        self.c_in = nn.Linear(n_in, n_hidden)
        self.c_ctx = nn.Linear(context_dim, n_hidden, bias=False)
        self.c_out = nn.Linear(n_hidden, 2 * context_dim)  # gate and candidate

    def forward(self, u, c, keep=None):  # u (B, T, n_in), c (B, context_dim), keep (B, T) or None
        pre = self.c_in(u)  # W_u u for the whole window in one matmul: (B, T, n_hidden)
        outs = []
        for t in range(u.size(1)):
            if keep is not None:
                c = c * keep[:, t:t + 1]
            z, g = self.c_out(torch.tanh(pre[:, t] + self.c_ctx(c))).chunk(2, dim=-1)
            z = torch.sigmoid(z)
            c = (1 - z) * c + z * torch.tanh(g)
            outs.append(c)
        return torch.stack(outs, 1), c  # (B, T, context_dim), (B, context_dim)


class ContextVectorLM(RecurrentLM):
    """Stacked layers with residual connections, u_{l+1} = u_l + c_l once widths match: without
    them a 6-layer tanh stack stays at the unigram loss for hundreds of steps."""

    def __init__(self, cfg):
        super().__init__(cfg, cfg.context_dim)
        widths = [cfg.n_embd] + [cfg.context_dim] * (cfg.n_layer - 1)
        self.h = nn.ModuleList(ContextLayer(w, cfg.n_hidden, cfg.context_dim) for w in widths)
        self.state_widths = (cfg.context_dim,)
        self.levels = nn.ModuleList()  # one level: every parameter steps every step

    def forward(self, idx, targets=None, state=None, reset_token=None):
        (ctx,) = state if state is not None else self.init_state(idx.size(0), idx.device)
        keep = None if reset_token is None else (idx != reset_token).float()  # (B, T)
        u = self.drop(self.wte(idx))  # (B, T, n_embd)
        new_ctx = []
        for layer, c in zip(self.h, ctx):
            out, c = layer(u, c, keep)  # (B, T, context_dim)
            u = u + out if u.size(-1) == out.size(-1) else out
            new_ctx.append(c.float())
        return *self.head(u, targets), (torch.stack(new_ctx),), {}


RECURRENT_MODELS = {"lstm": LSTMLM, "nested_lstm": NestedLSTM, "context_vector": ContextVectorLM}


def build_recurrent(cfg):
    return RECURRENT_MODELS[cfg.model](cfg)


# ==== Part 3: a checkpoint back to its model (sample.py, export_hf.py, hellaswag.py) ====
# A checkpoint file is input from anyone: its model_config may describe terabytes while its weights
# weigh kilobytes. So the model is built on the meta device (no storage), the weights checked against
# it, and then handed over: what the file holds is allocated, never what its config claims.
DERIVED_SLACK_BYTES = 64 << 20  # what tables computed from the config (RoPE's) may add to weights


def gpt_from_checkpoint(ckpt, refusal):
    """from_checkpoint for a script of GPTs only: ValueError "holds <what>; <refusal>" otherwise."""
    config = config_from_checkpoint(ckpt)
    if not isinstance(config, GPTConfig):
        raise ValueError(f"holds {describe(config)}; {refusal}")
    return from_checkpoint(ckpt)


def describe(config):
    """What a checkpoint of this config holds, in words for messages."""
    if isinstance(config, LSTMConfig):
        return f"a recurrent model ({config.model}) of train_lstm.py"
    return "a GPT of train_gpt2.py"


def config_from_checkpoint(ckpt):
    """The GPTConfig, or LSTMConfig (whose model_config names a "model"), of a loaded checkpoint:
    each field of its default's type, numbers finite. ValueError naming what does not fit."""
    values = ckpt.get("model_config") if isinstance(ckpt, dict) else None
    if not isinstance(values, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError("not a checkpoint of train_gpt2.py or train_lstm.py (no model and model_config)")
    cls = LSTMConfig if "model" in values else GPTConfig
    kinds = {f.name: type(f.default) for f in dataclasses.fields(cls)}
    typed = {}
    for name, value in values.items():
        if name not in kinds:
            raise ValueError(f"its model_config has {name!r}, which {cls.__name__} does not know")
        kind = kinds[name]
        if (kind, type(value)) in ((float, int), (tuple, list)):  # as JSON may have written them
            value = kind(value)
        numbers = value if kind is tuple else (value,) if kind is float else ()
        if type(value) is not kind or not all(type(v) in (int, float) and math.isfinite(v) for v in numbers):
            wanted = {tuple: "a tuple of finite numbers", float: "a finite number", int: "an integer",
                      str: "a string", bool: "True or False"}.get(kind, kind.__name__)
            raise ValueError(f"its model_config has {name}={value!r:.80}, not {wanted}")
        typed[name] = value
    try:
        return cls(**typed)
    except (TypeError, ValueError) as e:
        raise ValueError(f"its model_config: {e}") from None


def from_checkpoint(ckpt):
    """The model of a loaded checkpoint of train_gpt2.py or train_lstm.py, in eval mode on the CPU,
    floating-point weights in float32, tied ones tied. ValueError naming what does not fit."""
    config = config_from_checkpoint(ckpt)
    what, weights = describe(config), ckpt["model"]
    misfit = f"{what} whose weights do not fit its model_config:"
    # modules are Python objects even on the meta device (~10 KB a tensor): a layer count no state
    # dict this size could fill (each layer has a tensor at least) is refused before any is built
    levels = len(config.chunk_sizes) if getattr(config, "model", None) == "nested_lstm" else 0
    for name, count in (("n_layer", config.n_layer), ("len(chunk_sizes)", levels)):
        if count > len(weights):
            raise ValueError(f"{misfit} {name}={count}, but the weights are {len(weights)} tensors")
    try:
        with torch.device("meta"):
            net = GPT(config) if isinstance(config, GPTConfig) else build_recurrent(config)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what} whose model_config does not build: {e}") from None
    expected = net.state_dict(keep_vars=True)
    for keys, kind in (([k for k in expected if k not in weights], "lacks"),
                       ([k for k in weights if k not in expected], "has an unexpected")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"{misfit} the state dict {kind} {keys[0]}{more}")
    for key, want in expected.items():
        got = weights[key]
        if not isinstance(got, torch.Tensor):
            raise ValueError(f"{misfit} {key!r} is no named tensor")
        if got.shape != want.shape:
            raise ValueError(f"{misfit} {key} is {tuple(got.shape)}, "
                             f"the model_config needs {tuple(want.shape)}")
        if got.layout != torch.strided or got.is_floating_point() != want.is_floating_point():
            raise ValueError(f"{misfit} {key} is a {got.layout} {got.dtype} tensor, "
                             f"the model wants {want.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise ValueError(f"{what} whose weights are not finite: {key} holds NaN or inf values")
    rope_bytes = sum(b.numel() * b.element_size() for b in net.buffers())  # its only buffers
    weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    if rope_bytes > weight_bytes + DERIVED_SLACK_BYTES:
        raise ValueError(f"{what} whose model_config has block_size={config.block_size}: its RoPE "
                         f"tables would take {rope_bytes >> 20} MiB, its weights are only "
                         f"{weight_bytes >> 20} MiB")
    net.load_state_dict({k: weights[k].to(device="cpu", dtype=want.dtype) for k, want in expected.items()},
                        assign=True)  # which unties lm_head: the models' load hooks tie it again
    if rope_bytes:  # non-persistent buffers are in no checkpoint: computed again, for real
        net.rope_cos, net.rope_sin = rope_tables(config.block_size, config.n_embd // config.n_head,
                                                 config.rope_base)
        if not bool(torch.isfinite(net.rope_sin).all()):  # a negative rope_base: NaN angles
            raise ValueError(f"{what} whose model_config has rope_base={config.rope_base}: its RoPE "
                             f"tables are not finite")
    return net.to("cpu").eval()  # .to() also refreshes nn.LSTM's cached _flat_weights
