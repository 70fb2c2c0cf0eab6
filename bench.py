"""Time train_gpt2.py's training step, the data loader and HellaSwag scoring; profile a step.

    python bench.py                                    # CPU: the tiny preset; CUDA: GPT-2 124M, B=32, T=1024
    python bench.py --variants=base,classic,adamw      # rows side by side
    python bench.py --profile=True                     # ms per step by kernel group, and the top kernels
    python bench.py --data_dir=data/fineweb10B --hellaswag=True   # add a loader row and a HellaSwag row

A variant changes train_gpt2.py's configuration on this device (the modern GPT and Muon; compiled
bf16 on CUDA, eager float32 on CPU) along AXES; "+" joins several (classic+adamw). A step is
training.train_step on synthetic tokens; after the warm-up (compilation) each is timed alone (CUDA
events with no host sync between them, or perf_counter): median and interquartile range.
"""
import collections
import dataclasses
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import hellaswag as hs  # "hellaswag" is a setting here
import training
import utils
from model import GPT, MLPS, NORM_POSS, NORMS, POS_EMBS, STYLES, GPTConfig

# -----------------------------------------------------------------------------
# settings (all overridable with --name=value)
preset = "auto"               # auto (gpt2 on CUDA, tiny elsewhere) | tiny (below) | gpt2 (124M, B=32, T=1024)
# model: GPTConfig's fields, at its defaults but these (tiny: nanoGPT's Shakespeare char run)
globals().update(utils.fields_of(GPTConfig))
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64               # T, tokens
vocab_size = 128              # synthetic tokens: uniform below this (char Shakespeare: 65 -> 128)
# step
optimizer = "muon"            # muon | adamw: the base variant's (train_gpt2.py's default)
micro_batch_size = 12         # B, sequences per forward pass
total_batch_size = 0          # tokens per optimizer step (a multiple of B*T); 0 = one micro-batch
learning_rate = 1e-3          # constant; it does not change the work of a step
weight_decay = 0.1
grad_clip = 1.0               # 0 = no clipping (as train_gpt2.py)
# run
device = ""                   # "" = cuda, then mps, then cpu
dtype = ""                    # base autocast; "" = as train_gpt2.py (utils.pick_dtype): bf16 on CUDA, float32 on CPU
variants = "base"             # comma list of AXES names, each joined with + as it needs
steps = 20                    # timed steps per variant
warmup = 5                    # untimed steps first (compilation happens in the first one)
seed = 1337
profile = False               # also profile the first variant: ms/step by kernel group, top kernels
profile_steps = 5             # steps profiled (after the warm-up)
data_dir = None               # shard folder: adds a row timing data.WindowLoader alone on the train split
loader_batches = 200          # batches timed in the loader row
hellaswag = False             # adds a row timing hellaswag.score_examples on synthetic examples (GPT-2 tokens)
hellaswag_examples = 64       # synthetic examples scored (after one warm-up batch)
hellaswag_batch_size = 16     # examples per forward pass (4 rows each), as hellaswag.py
json_out = None               # also write the table (and the profile) here, atomically

CHOICES = dict(preset=("auto", "tiny", "gpt2"), pos_emb=POS_EMBS, mlp=MLPS, norm=NORMS,
               norm_pos=NORM_POSS, dtype=utils.DTYPES, optimizer=("muon", "adamw"))
PRESETS = {"tiny": {}, "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                                    vocab_size=50304, micro_batch_size=32)}
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH}
AXES = {"base": {}, "eager": dict(compile=False), "compile": dict(compile=True),
        "float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
        **{f"sdpa_{k}": dict(sdpa=k) for k in SDPA},
        # the rest of the model is AdamW's
        "muon": dict(optimizer="muon"), "adamw": dict(optimizer="adamw"),
        "modern": dict(arch="modern"), "classic": dict(arch="classic")}  # model.STYLES
# the profile's kernel groups, matched on lower-cased kernel / op names in this order
GROUPS = (("optimizer", ("optimizer.", "adam", "muon", "foreach", "multi_tensor")),
          ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
          ("loss", ("nll", "log_softmax", "cross_entropy")),
          ("norms", ("rsqrt", "layer_norm", "rms_norm", "rmsnorm")),
          ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas",
                      "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")))


def base_setup(device_type, dtype):
    """The configuration train_gpt2.py would use on this device."""
    return dict(compile=device_type == "cuda", dtype=utils.pick_dtype(dtype, device_type),
                sdpa="auto", optimizer=optimizer, arch="modern")


def parse_variant(name, base):
    setup = dict(base)
    for part in name.split("+"):
        utils.require(part in AXES, f"--variants: unknown variant {part!r}; known: {', '.join(AXES)}")
        setup.update(AXES[part])
    return setup


def unavailable(setup, device_type):
    """Why this device cannot run `setup`, or None. SDPA's kernels are tried, not predicted."""
    if setup["compile"] and device_type != "cuda":
        return "train_gpt2.py compiles on CUDA only"
    if setup["dtype"] == "float16" and device_type == "cpu":
        return "float16 autocast is for GPUs"
    return None


# -----------------------------------------------------------------------------
# the training step, timed


def setup_step(setup, model_config, grad_accum_steps, dev, device_type):
    """(step(i) -> loss, raw model): train_step of a fresh model on premade batches (no loader)."""
    torch.manual_seed(seed)
    if setup["compile"]:
        torch.compiler.reset()  # a fresh start per variant: never past dynamo's recompile limit
    if setup["arch"] == "classic":
        model_config = dataclasses.replace(model_config, **STYLES["classic"])
    raw_model = GPT(model_config).to(dev)
    optimizers = raw_model.configure_optimizers(setup["optimizer"], weight_decay, learning_rate,
                                                device_type=device_type)
    model = torch.compile(raw_model) if setup["compile"] else raw_model
    scaler = torch.amp.GradScaler(device_type, enabled=setup["dtype"] == "float16")
    autocast = utils.autocast_context(device_type, setup["dtype"])
    generator = torch.Generator().manual_seed(seed)
    shape = (min(grad_accum_steps, 4), micro_batch_size, block_size + 1)
    tokens = torch.randint(model_config.vocab_size, shape, generator=generator)
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]

    def step(i):
        feed = iter(batches[(i * grad_accum_steps + k) % len(batches)]
                    for k in range(grad_accum_steps))
        return training.train_step(model, optimizers, lambda: next(feed), 1.0,
                                   accum_steps=grad_accum_steps, scaler=scaler,
                                   autocast=autocast, device=dev, grad_clip=grad_clip)[0]
    return step, raw_model


def time_steps(step, n, device_type, first=0):
    """Milliseconds of each of n calls step(first + k): CUDA events, then a sync; or perf_counter."""
    if device_type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
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


def summary(times_ms, tokens):
    q1, median, q3 = (statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1
                      else times_ms * 3)
    return dict(ms_median=median, ms_q1=q1, ms_q3=q3, ms_min=min(times_ms), ms_max=max(times_ms),
                tokens_per_s=tokens / (median / 1000))


def bench_variant(name, setup, model_config, grad_accum_steps, dev, device_type):
    if device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step, raw_model = setup_step(setup, model_config, grad_accum_steps, dev, device_type)
    with nullcontext() if setup["sdpa"] == "auto" else sdpa_kernel(SDPA[setup["sdpa"]]):
        t0 = time.perf_counter()
        time_steps(step, warmup, device_type)
        warmup_s = time.perf_counter() - t0
        times = time_steps(step, steps, device_type, first=warmup)
        loss_finite = bool(torch.isfinite(step(warmup + steps)))  # one more step, to check the loss
    peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda" else None
    tokens = micro_batch_size * block_size * grad_accum_steps
    row = dict(variant=name, status="ok", **setup, **summary(times, tokens), warmup_s=warmup_s,
               loss_finite=loss_finite, peak_mem_mb=peak_mem_mb)
    row["mfu"] = raw_model.estimate_mfu(row["tokens_per_s"], dev)
    return row


# -----------------------------------------------------------------------------
# where the time goes: torch.profiler over a few steps, grouped


def kernel_group(names, device_type):
    """A kernel's (CUDA) or op's (CPU) group from its name and those of the ops around it, innermost
    first: a multiply inside RMSNormFunctionBackward is norm work, one in Optimizer.step not."""
    lowered = [n.lower() for n in names]
    for group, keys in GROUPS:
        if any(k in n for n in (lowered if group == "optimizer" else lowered[:1]) for k in keys):
            return group
    for group, keys in GROUPS[1:]:
        if any(k in n for n in lowered[1:] for k in keys):
            return group
    return "elementwise" if device_type == "cuda" or lowered[0].startswith("aten::") else "other"


def profile_variant(name, setup, model_config, grad_accum_steps, dev, device_type):
    """ms per step by kernel group and the top 8 (CUDA: GPU kernel time; CPU: each op's own)."""
    step, _ = setup_step(setup, model_config, grad_accum_steps, dev, device_type)
    time_steps(step, warmup, device_type)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        time_steps(step, profile_steps, device_type, first=warmup)
    groups, kernels = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU or event.is_async:
            continue
        names, parent = [event.name], event.cpu_parent
        while parent is not None:
            names.append(parent.name)
            parent = parent.cpu_parent
        items = ([(k.name, k.duration) for k in event.kernels] if device_type == "cuda"
                 else [(event.name, event.self_cpu_time_total)])
        for kernel, us in items:
            groups[kernel_group([kernel] + names, device_type)] += us / 1000 / profile_steps
            kernels[kernel] += us / 1000 / profile_steps
    total = sum(groups.values())
    what = "CUDA kernel time" if device_type == "cuda" else "CPU time of each op itself"
    print(f"\nprofile of {name}: {what}, ms per step over {profile_steps} steps")
    for g, ms in groups.most_common():
        print(f"  {g:<12} {ms:8.2f}  {100 * ms / total:5.1f}%")
    print(f"  {'total':<12} {total:8.2f}\n  top kernels:")
    print("\n".join(f"  {ms:8.2f}  {k[:110]}" for k, ms in kernels.most_common(8)))
    return dict(variant=name, ms_per_step=dict(groups.most_common()), total_ms=total,
                top=kernels.most_common(8))


# -----------------------------------------------------------------------------
# the loader and HellaSwag scoring alone


def bench_loader(dev, device_type):
    try:
        loader = data.WindowLoader(os.path.abspath(data_dir), "train", micro_batch_size, block_size,
                                   shuffle=True, seed=seed)
    except data.ShardError as e:
        raise SystemExit(f"error: --data_dir={data_dir}: {e}") from None
    for _ in range(min(5, loader_batches)):  # warm-up
        loader.next_batch()

    def fetch(_):
        x, y = loader.next_batch()
        if device_type == "cuda":  # what train_gpt2.py does with each batch before the forward
            x, y = (t.pin_memory().to(dev, non_blocking=True) for t in (x, y))
            torch.cuda.synchronize()
    times = time_steps(fetch, loader_batches, "cpu")  # perf_counter: the host's time, also on CUDA
    return dict(variant="loader", status="ok", **summary(times, micro_batch_size * block_size))


def synthetic_hellaswag(n, rng):
    """n examples in HellaSwag's schema, random words (context ~40 of them, endings ~20)."""
    words = ("the a man woman is are then he she they it and to of with on in at person ball water "
             "car dog takes puts walks runs jumps shows talks holds begins continues camera screen "
             "kitchen").split()

    def pick(k):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=rng))
    examples = []
    for _ in range(n):
        ctx_a, ctx_b = pick(30).capitalize() + ".", pick(8)
        endings = [pick(15 + int(k)) for k in torch.randint(10, (4,), generator=rng)]
        label = int(torch.randint(4, (1,), generator=rng))
        examples.append(dict(activity_label="Synthetic", ctx_a=ctx_a, ctx_b=ctx_b,
                             ctx=f"{ctx_a} {ctx_b}", endings=endings, label=label))
    return examples


def bench_hellaswag(model_config, dev, device_type, precision):
    try:
        enc = data.tiktoken_encoding("gpt2")
    except SystemExit as e:  # offline without the BPE files
        return dict(variant="hellaswag", status="n/a", reason=str(e).removeprefix("error: ")[:90])
    torch.manual_seed(seed)
    config = dataclasses.replace(model_config, vocab_size=max(model_config.vocab_size, 50304))
    net = GPT(config).to(dev)
    examples = synthetic_hellaswag(hellaswag_examples + hellaswag_batch_size,
                                   torch.Generator().manual_seed(seed))
    autocast, first = utils.autocast_context(device_type, precision), hellaswag_batch_size
    # warm-up
    hs.score_examples(net, examples[:first], enc, dev, autocast_ctx=autocast, batch_size=first)
    t0 = time.perf_counter()
    hs.score_examples(net, examples[first:], enc, dev, autocast_ctx=autocast, batch_size=first)
    seconds = time.perf_counter() - t0  # score_examples returns Python lists: synchronised already
    return dict(variant="hellaswag", status="ok", dtype=precision,
                examples_per_s=hellaswag_examples / seconds)


def print_table(rows):
    widths = (("compile", 7), ("dtype", 8), ("sdpa", 9), ("optimizer", 9), ("arch", 7))
    print(f"\n{'variant':<24} " + " ".join(f"{k:<{w}}" for k, w in widths)
          + f" {'ms/step':>8} {'IQR':>15} {'tokens/s':>11} {'MFU':>6} {'peak MB':>8}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['variant']:<24} n/a: {r['reason']}")
        elif r["variant"] == "hellaswag":
            print(f"{'hellaswag':<24} {'':<7} {r['dtype']:<8} {r['examples_per_s']:.1f} examples/s")
        else:
            setup = " ".join(f"{r.get(k, ''):<{w}}" for k, w in widths)
            mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            mem = "" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"
            name = r["variant"] + (f" (={r['same_as']})" if r.get("same_as") else "")
            print(f"{name:<24} {setup} {r['ms_median']:8.2f} {r['ms_q1']:7.2f}-{r['ms_q3']:<7.2f} "
                  f"{r['tokens_per_s']:11,.0f} {mfu:>6} {mem:>8}")


# -----------------------------------------------------------------------------


def main(argv):
    settings = utils.apply_overrides(globals(), argv, CHOICES)
    utils.require(steps >= 1 and warmup >= 0 and profile_steps >= 1,
                  "--steps and --profile_steps must be at least 1 and --warmup at least 0, "
                  f"got {steps}, {profile_steps} and {warmup}")
    dev = utils.pick_device(device)
    device_type = dev.split(":")[0]
    chosen = ("gpt2" if device_type == "cuda" else "tiny") if preset == "auto" else preset
    given = utils.given_settings(argv)  # the command line wins over the preset
    for name, value in PRESETS[chosen].items():
        globals()[name] = settings[name] = settings[name] if name in given else value
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as train_gpt2.py
    tokens_per_micro = micro_batch_size * block_size
    utils.require(total_batch_size >= 0 and total_batch_size % tokens_per_micro == 0,
                  f"--total_batch_size {total_batch_size} is not a multiple of micro_batch_size "
                  f"{micro_batch_size} x block_size {block_size} = {tokens_per_micro}")
    grad_accum_steps = max(1, total_batch_size // tokens_per_micro)
    try:
        model_config = GPTConfig(**{f.name: settings[f.name] for f in dataclasses.fields(GPTConfig)})
    except ValueError as e:
        utils.bad_setting(str(e))
    base = base_setup(device_type, dtype)
    setups = [(name, parse_variant(name, base)) for name in variants.split(",") if name.strip()]
    utils.require(setups, "--variants is empty")

    n_params = GPT(model_config).num_params()
    header = (f"{utils.run_header(dev)['device']} | torch {torch.__version__} | "
              f"{torch.get_num_threads()} threads | preset {chosen}: {n_params / 1e6:.2f}M params, "
              f"{n_layer}L {n_head}H {n_embd}C, B={micro_batch_size} T={block_size} x "
              f"{grad_accum_steps} accumulation = {tokens_per_micro * grad_accum_steps:,} "
              f"tokens/step | {warmup} warm-up + {steps} timed steps")
    print(header)
    rows, done = [], {}
    for name, setup in setups:
        key = tuple(sorted(setup.items()))
        if reason := unavailable(setup, device_type):
            row = dict(variant=name, status="n/a", reason=reason, **setup)
        elif key in done:  # e.g. "base" and "eager" are the same run on a CPU
            row = dict(done[key], variant=name, same_as=done[key]["variant"])
        else:
            try:
                row = done[key] = bench_variant(name, setup, model_config, grad_accum_steps,
                                                dev, device_type)
            except (torch.OutOfMemoryError, RuntimeError) as e:  # OOM; SDPA refusing a forced kernel
                row = dict(variant=name, status="n/a", reason=str(e).split("\n")[0][:90], **setup)
        rows.append(row)
        result = f"{row['ms_median']:.2f} ms/step" if row["status"] == "ok" else row["reason"]
        print(f"  {name}: " + result, flush=True)
    if data_dir:
        rows.append(bench_loader(dev, device_type))
    if hellaswag:
        rows.append(bench_hellaswag(model_config, dev, device_type, base["dtype"]))
    print_table(rows)
    profiled = None
    if profile:
        runnable = [(n, s) for n, s in setups if not unavailable(s, device_type)]
        utils.require(runnable, "--profile: no variant of --variants runs on this device")
        profiled = profile_variant(*runnable[0], model_config, grad_accum_steps, dev, device_type)
    if json_out:
        utils.atomic_write_json(json_out, dict(header=header, settings=settings, preset=chosen,
                                               device=dev, grad_accum_steps=grad_accum_steps,
                                               params=n_params, rows=rows, profile=profiled))
        print(f"wrote {json_out}")


if __name__ == "__main__":
    main(sys.argv[1:])
