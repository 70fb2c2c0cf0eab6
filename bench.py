"""Time train_gpt2.py's training step, and the loader and HellaSwag scoring alone: one table, optional JSON.

    python bench.py                                          # CPU: the tiny config below; CUDA: GPT-2 124M, B=32, T=1024
    python bench.py --variants=eager,muon --steps=50         # pick rows
    python bench.py --variants=compile+bfloat16,compile+float32 --json_out=bench.json
    python bench.py --data_dir=data/fineweb10B --hellaswag=True   # add a loader row and a HellaSwag row

Each variant changes the device's base configuration (the one train_gpt2.py would use: CUDA = compiled, bf16
autocast, SDPA's own choice of kernel, fused AdamW; CPU = eager, float32, fused AdamW) along one axis;
join names with "+" to change several (e.g. compile+float32). Variants:
  eager, compile                            torch.compile of the training model (train_gpt2.py: CUDA only)
  float32, bfloat16                         autocast dtype
  sdpa_flash, sdpa_efficient, sdpa_math     force one scaled_dot_product_attention kernel
  adamw, adamw_fused, muon                  AdamW unfused (torch's default: foreach on CUDA), fused, Muon + AdamW
A variant the device cannot run is listed as n/a with the reason. Steps run on synthetic tokens (uniform
over vocab_size): the loss is meaningless, the work is the real step's. Timing: warm-up steps first (they
include compilation), then `steps` steps each timed alone (CUDA events around each step, no host sync in
between; perf_counter on CPU); the table gives the median and the interquartile range. Peak memory: CUDA
torch.cuda.max_memory_allocated; CPU the process's peak resident set (VmHWM, reset per variant through
/proc/self/clear_refs), which includes Python and torch themselves.
"""
import dataclasses
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

import data
import train_gpt2
import utils
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# settings (all overridable with --name=value)
preset = "auto"               # auto (gpt2 on CUDA, tiny elsewhere) | tiny (the values below) | gpt2 (124M, B=32, T=1024)
# model (model.py's GPTConfig, train_gpt2.py's names); tiny = nanoGPT's Tiny Shakespeare char CPU run
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64               # T, tokens
vocab_size = 128              # synthetic tokens are drawn uniformly below this (char Shakespeare: 66 -> 128)
pos_emb = "rope"              # rope | learned | none
mlp = "swiglu"                # swiglu | gelu | silu | relu2
norm = "rmsnorm"              # rmsnorm | layernorm | none
norm_pos = "pre"              # pre | post
qk_norm = False
tie_embeddings = True
bias = False
dropout = 0.0
# step
micro_batch_size = 12         # B, sequences per forward pass
total_batch_size = 0          # tokens per optimizer step (a multiple of B*T); 0 = one micro-batch, no accumulation
learning_rate = 1e-3          # constant; it does not change the work of a step
weight_decay = 0.1
grad_clip = 1.0               # 0 = no clipping (as train_gpt2.py)
# run
device = ""                   # "" = cuda, then mps, then cpu
dtype = ""                    # base autocast dtype: "" = train_gpt2.py's choice (bf16 on CUDA, float32 on CPU)
variants = ""                 # comma list (see above); "" = all of them
steps = 20                    # timed steps per variant
warmup = 5                    # untimed steps first (compilation happens in the first one)
seed = 1337
data_dir = None               # shard folder: adds a row timing data.WindowLoader alone on the train split
loader_batches = 200          # batches timed in the loader row
hellaswag = False             # adds a row timing hellaswag.score_examples on synthetic examples (GPT-2 tokens)
hellaswag_examples = 64       # synthetic examples scored (after one warm-up batch)
hellaswag_batch_size = 16     # examples per forward pass (4 rows each), as hellaswag.py
json_out = None               # also write the table here (atomically)

PRESETS = {"tiny": {},
           "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, micro_batch_size=32)}
ALL_VARIANTS = ("eager", "compile", "float32", "bfloat16", "sdpa_flash", "sdpa_efficient", "sdpa_math",
                "adamw", "adamw_fused", "muon")
AXES = {"eager": ("compile", False), "compile": ("compile", True),
        "float32": ("dtype", "float32"), "bfloat16": ("dtype", "bfloat16"),
        "sdpa_flash": ("sdpa", "flash"), "sdpa_efficient": ("sdpa", "efficient"), "sdpa_math": ("sdpa", "math"),
        "adamw": ("optimizer", "adamw"), "adamw_fused": ("optimizer", "adamw_fused"), "muon": ("optimizer", "muon")}
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pos_emb", "mlp", "norm", "norm_pos",
                "qk_norm", "tie_embeddings", "bias", "dropout")


def preset_values(name, device_type, argv):
    """(preset chosen, settings it sets): auto = gpt2 on CUDA, tiny elsewhere; names given in argv win."""
    chosen = ("gpt2" if device_type == "cuda" else "tiny") if name == "auto" else name
    if chosen not in PRESETS:
        raise SystemExit(f"error: --preset={name}: expected auto, {', '.join(PRESETS)}")
    given = {a.removeprefix("--").partition("=")[0] for a in argv}
    return chosen, {k: v for k, v in PRESETS[chosen].items() if k not in given}


# -----------------------------------------------------------------------------
# variants: what each row runs, and whether this device can run it


def base_setup(device_type, dtype):
    """The configuration train_gpt2.py would use on this device."""
    return dict(compile=device_type == "cuda", dtype=utils.pick_dtype(dtype, device_type), sdpa="auto",
                optimizer="adamw_fused")  # model.configure_optimizers fuses AdamW on CUDA and CPU alike


def parse_variant(name, base):
    setup = dict(base)
    for part in name.split("+"):
        if part not in AXES:
            raise SystemExit(f"error: --variants: unknown variant {part!r}; known: {', '.join(ALL_VARIANTS)} "
                             f"(join with + to combine)")
        axis, value = AXES[part]
        setup[axis] = value
    return setup


def sdpa_context(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}
    return nullcontext() if kind == "auto" else sdpa_kernel(backends[kind])


def unavailable(setup, device_type, dev, head_size):
    """None if this device can run `setup`, else the reason why not."""
    if setup["compile"] and device_type != "cuda":
        return "train_gpt2.py compiles on CUDA only"
    if setup["dtype"] == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16"
    if setup["dtype"] == "float16" and device_type == "cpu":
        return "float16 autocast is for GPUs"
    if setup["optimizer"] == "adamw_fused" and device_type not in ("cuda", "cpu"):
        return f"fused AdamW does not run on {device_type}"
    if setup["sdpa"] != "auto":  # ask SDPA itself: kernels depend on the GPU, dtype and head size
        dt = torch.float32 if setup["dtype"] == "float32" else getattr(torch, setup["dtype"])
        q = torch.randn(1, 1, 8, head_size, device=dev, dtype=dt)
        try:
            with sdpa_context(setup["sdpa"]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        except RuntimeError as e:
            return f"SDPA refuses the {setup['sdpa']} kernel here ({str(e).split('.')[0][:70]})"
    return None


def make_optimizers(raw_model, kind, device_type):
    """model.configure_optimizers, with AdamW's fused flag forced for the adamw / adamw_fused rows."""
    optimizers = raw_model.configure_optimizers("muon" if kind == "muon" else "adamw", weight_decay,
                                                learning_rate, (0.9, 0.95), 1e-8, device_type)
    if kind in ("adamw", "adamw_fused"):
        groups = [dict(params=g["params"], weight_decay=g["weight_decay"]) for g in optimizers[-1].param_groups]
        optimizers[-1] = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                           fused=kind == "adamw_fused")
    return optimizers


# -----------------------------------------------------------------------------
# memory


def reset_peak_memory(device_type):
    if device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device_type):
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource  # elsewhere: the process's lifetime peak (ru_maxrss is bytes on macOS, kB on Linux)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def memory_kind(device_type):
    if device_type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "peak RSS of the process (VmHWM)" if os.path.exists("/proc/self/clear_refs") else "ru_maxrss (lifetime)"


# -----------------------------------------------------------------------------
# the training step


def make_step(model, raw_model, optimizers, scaler, autocast, batches, grad_accum_steps, dev):
    """train_gpt2.py's own optimizer step (train_gpt2.train_step) over pre-made batches: the loader is
    timed in its own row. Returns step(i) -> the step's loss on the device."""
    def step(i):
        feed = iter(batches[(i * grad_accum_steps + k) % len(batches)] for k in range(grad_accum_steps))
        loss, _ = train_gpt2.train_step(model, raw_model, optimizers, scaler, lambda: next(feed), grad_accum_steps,
                                        learning_rate, autocast, dev, grad_clip)
        return loss
    return step


def time_steps(step, n, device_type, first=0):
    """Milliseconds of each of n calls step(first + k): CUDA events (no host sync between steps), or perf_counter."""
    if device_type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for k, (start, end) in enumerate(events):
            start.record()
            step(first + k)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for k in range(n):
        t0 = time.perf_counter()
        step(first + k)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def summary(times_ms):
    q1, median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1 else times_ms * 3
    return dict(ms_median=median, ms_q1=q1, ms_q3=q3, ms_min=min(times_ms), ms_max=max(times_ms))


def bench_variant(name, setup, model_config, grad_accum_steps, dev, device_type):
    torch.manual_seed(seed)
    if setup["compile"]:
        torch.compiler.reset()  # a fresh start per variant: never past dynamo's recompile limit (it would fall back to eager)
    reset_peak_memory(device_type)
    raw_model = GPT(model_config).to(dev)
    optimizers = make_optimizers(raw_model, setup["optimizer"], device_type)
    model = torch.compile(raw_model) if setup["compile"] else raw_model
    scaler = torch.amp.GradScaler(device_type, enabled=setup["dtype"] == "float16")
    autocast = utils.autocast_context(device_type, setup["dtype"])
    B, T = micro_batch_size, block_size
    generator = torch.Generator().manual_seed(seed)
    batches = []  # a few distinct CPU batches, copied to the device each micro-step as train_gpt2.py does
    for _ in range(min(grad_accum_steps, 4)):
        tokens = torch.randint(0, model_config.vocab_size, (B, T + 1), generator=generator)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    step = make_step(model, raw_model, optimizers, scaler, autocast, batches, grad_accum_steps, dev)
    with sdpa_context(setup["sdpa"]):
        t0 = time.perf_counter()
        time_steps(step, warmup, device_type)
        if device_type == "cuda":
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        times = time_steps(step, steps, device_type, first=warmup)
        final_loss = step(warmup + steps).item()  # one more step, to check the loss is finite
    tokens_per_step = B * T * grad_accum_steps
    row = dict(variant=name, status="ok", **setup, **summary(times), warmup_s=warmup_s,
               peak_mem_mb=peak_memory_mb(device_type), loss_finite=bool(torch.isfinite(torch.tensor(final_loss))))
    row["tokens_per_s"] = tokens_per_step / (row["ms_median"] / 1000)
    mfu = raw_model.estimate_mfu(row["tokens_per_s"], dev)
    row["mfu"] = None if mfu is None else mfu
    del model, raw_model, optimizers, step, batches
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return row


# -----------------------------------------------------------------------------
# the loader and HellaSwag scoring alone


def bench_loader(dev, device_type):
    path = os.path.abspath(data_dir)
    try:
        loader = data.WindowLoader(path, "train", micro_batch_size, block_size, shuffle=True, seed=seed)
    except data.ShardError as e:
        raise SystemExit(f"error: --data_dir={data_dir}: {e}") from None
    for _ in range(min(5, loader_batches)):
        loader.next_batch()
    times = []
    for _ in range(loader_batches):
        t0 = time.perf_counter()
        x, y = loader.next_batch()
        if device_type == "cuda":  # what train_gpt2.py does with each batch before the forward
            x, y = x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    row = dict(variant="loader", status="ok", **summary(times))
    row["tokens_per_s"] = micro_batch_size * block_size / (row["ms_median"] / 1000)
    return row


def synthetic_hellaswag(n, rng):
    """n examples in HellaSwag's schema (ctx, ctx_a, ctx_b, activity_label, endings, label) with random words,
    of HellaSwag-like lengths (context ~40 words, endings ~20)."""
    words = ("the a man woman is are then he she they it and to of with on in at person ball water car dog "
             "takes puts walks runs jumps shows talks holds begins continues camera screen kitchen").split()
    pick = lambda k: " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=rng))
    examples = []
    for _ in range(n):
        ctx_a, ctx_b = pick(30).capitalize() + ".", pick(8)
        examples.append(dict(activity_label="Synthetic", ctx_a=ctx_a, ctx_b=ctx_b, ctx=ctx_a + " " + ctx_b,
                             endings=[pick(15 + int(k)) for k in torch.randint(10, (4,), generator=rng)],
                             label=int(torch.randint(4, (1,), generator=rng))))
    return examples


def bench_hellaswag(model_config, dev, device_type, dtype_name):
    import hellaswag as hs  # imported here: only this row needs it
    try:
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without a cache
        return dict(variant="hellaswag", status="n/a", reason=f"no GPT-2 tokenizer ({type(e).__name__})")
    torch.manual_seed(seed)
    config = dataclasses.replace(model_config, vocab_size=max(model_config.vocab_size, 50304))  # GPT-2 ids
    net = GPT(config).to(dev)
    examples = synthetic_hellaswag(hellaswag_examples + hellaswag_batch_size, torch.Generator().manual_seed(seed))
    autocast = utils.autocast_context(device_type, dtype_name)
    hs.score_examples(net, examples[:hellaswag_batch_size], enc, dev, autocast_ctx=autocast,
                      batch_size=hellaswag_batch_size)  # warm-up
    t0 = time.perf_counter()
    hs.score_examples(net, examples[hellaswag_batch_size:], enc, dev, autocast_ctx=autocast,
                      batch_size=hellaswag_batch_size)  # returns Python lists: synchronised already
    seconds = time.perf_counter() - t0
    return dict(variant="hellaswag", status="ok", dtype=dtype_name, examples_per_s=hellaswag_examples / seconds,
                ms_median=1000 * seconds / hellaswag_examples * hellaswag_batch_size,
                note=f"{hellaswag_examples} synthetic examples, {hellaswag_batch_size} per forward, vocab "
                     f"{config.vocab_size}")


# -----------------------------------------------------------------------------
# the table


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows, header):
    print(header)
    cols = ("variant", "compile", "dtype", "sdpa", "optimizer", "ms/step", "IQR", "tokens/s", "MFU", "peak MB")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append((r["variant"], f"n/a: {r['reason']}"))
            continue
        if r["variant"] == "loader":
            lines.append(("loader", "", "", "", "", fmt(r["ms_median"], ".2f"), f"{r['ms_q1']:.2f}-{r['ms_q3']:.2f}",
                          fmt(r["tokens_per_s"], ",.0f"), "-", "-"))
            continue
        if r["variant"] == "hellaswag":
            lines.append(("hellaswag", "", r["dtype"], "", "", fmt(r["ms_median"], ".1f"), "-",
                          f"{r['examples_per_s']:.1f} ex/s", "-", "-"))
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        same = f" (={r['same_as']})" if r.get("same_as") else ""
        lines.append((r["variant"] + same, str(r["compile"]), r["dtype"], r["sdpa"], r["optimizer"],
                      f"{r['ms_median']:.2f}", f"{r['ms_q1']:.2f}-{r['ms_q3']:.2f}", f"{r['tokens_per_s']:,.0f}",
                      mfu, f"{r['peak_mem_mb']:.0f}"))
    full = [l for l in lines if len(l) > 2]
    widths = [max([len(c)] + [len(l[i]) for l in full] + ([len(l[0]) for l in lines] if i == 0 else []))
              for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for l in lines:
        print("  ".join(v.ljust(w) for v, w in zip(l, widths)) if len(l) > 2 else f"{l[0].ljust(widths[0])}  {l[1]}")


# -----------------------------------------------------------------------------


def main(settings, argv):
    dev = utils.pick_device(device)
    device_type = dev.split(":")[0]
    chosen, values = preset_values(preset, device_type, argv)
    for name, value in values.items():
        globals()[name] = settings[name] = value
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as train_gpt2.py
    tokens_per_micro = micro_batch_size * block_size
    if total_batch_size and total_batch_size % tokens_per_micro:
        raise SystemExit(f"error: total_batch_size {total_batch_size} is not a multiple of micro_batch_size "
                         f"{micro_batch_size} x block_size {block_size} = {tokens_per_micro}")
    grad_accum_steps = max(1, total_batch_size // tokens_per_micro)
    if steps < 1 or warmup < 0:
        raise SystemExit(f"error: --steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    try:
        model_config = GPTConfig(**{k: settings[k] for k in MODEL_FIELDS})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    base = base_setup(device_type, dtype)
    names = [v.strip() for v in variants.split(",") if v.strip()] or list(ALL_VARIANTS)
    setups = [(name, parse_variant(name, base)) for name in names]  # all parsed before any work

    n_params = GPT(model_config).num_params()  # on the CPU: just the count
    header = (f"{utils.run_header(dev)['device']} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
              f"preset {chosen}: {n_params / 1e6:.2f}M params, {model_config.n_layer}L {model_config.n_head}H "
              f"{model_config.n_embd}C, B={micro_batch_size} T={block_size} x {grad_accum_steps} accumulation = "
              f"{tokens_per_micro * grad_accum_steps:,} tokens/step | {warmup} warm-up + {steps} timed steps | "
              f"memory: {memory_kind(device_type)}")
    print(header)
    rows, done = [], {}
    for name, setup in setups:
        reason = unavailable(setup, device_type, dev, model_config.n_embd // model_config.n_head)
        key = tuple(sorted(setup.items()))
        if reason:
            row = dict(variant=name, status="n/a", reason=reason, **setup)
        elif key in done:  # e.g. "eager" and "float32" are the same run on a CPU
            row = dict(done[key], variant=name, same_as=done[key]["variant"])
        else:
            try:
                row = done[key] = bench_variant(name, setup, model_config, grad_accum_steps, dev, device_type)
            except torch.OutOfMemoryError:  # e.g. float32 or sdpa_math at the 124M size on a small GPU
                row = dict(variant=name, status="n/a", reason="out of memory", **setup)
            if device_type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {name}: " + (f"{row['ms_median']:.2f} ms/step" if row["status"] == "ok" else row["reason"]),
              flush=True)
    if data_dir:
        rows.append(bench_loader(dev, device_type))
    if hellaswag:
        rows.append(bench_hellaswag(model_config, dev, device_type, base["dtype"]))
    print()
    print_table(rows, header)
    if json_out:
        utils.atomic_write_json(json_out, dict(header=header, settings=settings, preset=chosen, device=dev,
                                               grad_accum_steps=grad_accum_steps, params=n_params,
                                               memory=memory_kind(device_type), rows=rows))
        print(f"wrote {json_out}")
    return rows


if __name__ == "__main__":
    main(utils.apply_overrides(globals(), sys.argv[1:], {"dtype": utils.DTYPES}), sys.argv[1:])
