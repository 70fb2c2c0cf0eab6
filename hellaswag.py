"""HellaSwag (validation, 10,042 examples x 4 endings): download, render, score a GPT,
standalone or in training.

    python hellaswag.py --checkpoint=out/ckpt_005000.pt        # a train_gpt2.py checkpoint
    python hellaswag.py --model=gpt2 --limit=500               # Hugging Face weights via model.py
    python hellaswag.py --checkpoint=out/ckpt_005000.pt --data_file=hellaswag_val.jsonl --limit=1000 \\
        --style=harness --json_out=hs.json

Exactly one of --checkpoint and --model names the model scored. It must work in GPT-2 BPE tokens (a
checkpoint's meta.json says so; HellaSwag is scored in them): the model is checked before the data
is downloaded. Paths, as in every script: the files you name (--checkpoint, --data_file, --json_out)
are read and written as given, relative to the current directory; cache_dir, a folder setting, is
relative to the repo folder.

Two conventions (say which one a figure uses; the CLI prints it):
  completion (build-nanogpt, llm.c): context = raw `ctx`, ending = " " + ending;
      acc = lowest summed token loss, acc_norm = lowest mean token loss.
      GPT-2 124M: acc 0.2859, acc_norm 0.2955.
  harness (lm-eval-harness):
      context = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
      ending = " " + preprocess(ending); acc = highest summed log-prob,
      acc_norm = highest summed log-prob divided by len(preprocessed ending) in characters.
      GPT-2 124M: acc 0.2892, acc_norm 0.3114.
Ties: every prediction is torch.argmin over the 4 scores, so on an exact tie the lowest ending index
wins (lm-eval-harness's np.argmax does the same). Token losses are summed in float64, so endings
whose token losses are equal tie exactly (k*x/k == x holds in float64 for float32 x).

In training (train_gpt2.py), on every rank, with the raw model (not the DDP or compiled wrapper):
    examples = load_examples(ensure_data())   # once, at start-up
    evaluate(raw_model, examples, enc, device, autocast_ctx=ctx, rank=rank, world_size=world_size)
each rank scores examples[rank::world_size] and the counts are summed over ranks (gloo or nccl), so
every rank returns the same figures.
"""
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

import data
import utils
from model import GPT, GPTConfig, config_from_checkpoint, describe, from_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings (override with --name=value)
data_file = None  # local HellaSwag validation JSONL (as given); None = download into cache_dir once
cache_dir = "data/hellaswag"  # download folder, relative to the repo folder (not the cwd)
checkpoint = None  # a train_gpt2.py checkpoint (.pt, as given) to evaluate; or give --model
model = None  # or Hugging Face GPT-2 weights via GPT.from_pretrained: "gpt2", "gpt2-medium", ...
device = ""  # "" = auto (cuda, mps, cpu)
dtype = ""  # autocast: "" = bfloat16 on GPUs with native bf16, float16 on older ones, bfloat16 on MPS, float32 on CPU
limit = 0  # score only the first N examples (0 = all 10,042)
style = "completion"  # completion (build-nanogpt/llm.c) | harness (lm-eval-harness); see above
skip_bad = False  # skip malformed lines (with a count) instead of stopping at the first one
batch_size = 16  # examples per forward pass (4 rows each), >= 1
json_out = None  # also write the figures to this JSON file (atomically)

# fixed facts about the data set
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
N_LINES = 10042  # non-empty lines of the official validation file
RETRIES = 3  # download attempts, waiting 1 s, 2 s, 4 s between them
STYLES = ("completion", "harness")
CHOICES = dict(dtype=utils.DTYPES, style=STYLES)


def check_settings():
    utils.require(checkpoint is not None or model is not None,
                  "--checkpoint or --model is required, to name the model to score: "
                  "--checkpoint=path/to/ckpt.pt (a train_gpt2.py checkpoint) or --model=gpt2 "
                  "(GPT-2's weights)")
    utils.require(checkpoint is None or model is None,
                  "--checkpoint and --model: give only one of them, the model to score")
    utils.require(limit >= 0, f"--limit must be >= 0 (0 = all), got {limit}")
    utils.require(batch_size >= 1, f"--batch_size must be >= 1, got {batch_size}")


# -----------------------------------------------------------------------------
# data: download once, verify, validate every line


def download(folder):
    """Fetch the validation JSONL into `folder`: retried, streamed to a temporary file, verified,
    renamed. The file gets the permissions of any new file (the umask), and a killed download's
    temporary file is removed by the next one."""
    import requests  # imported here: only the download needs it
    path = os.path.join(folder, os.path.basename(URL))
    error = None
    for attempt in range(RETRIES):
        if attempt:
            time.sleep(2 ** (attempt - 1))
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            utils.remove_stale_temporaries(path)
            fd, tmp = tempfile.mkstemp(dir=folder,
                                       prefix=f".tmp_{os.path.basename(path)}.{os.getpid()}.")
            with os.fdopen(fd, "wb") as f, requests.get(URL, stream=True, timeout=30) as response:
                response.raise_for_status()
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
            verify(tmp, source=URL)
            os.chmod(tmp, 0o666 & ~utils.UMASK)  # mkstemp makes 0600 files
            os.replace(tmp, path)
            # after the rename: an interruption here leaves a file ensure_data re-verifies
            record_sha256(path)
            return path
        except requests.RequestException as e:  # before OSError: requests' errors are OSErrors too
            error = e
        except OSError as e:
            raise SystemExit(f"error: cannot write {path}: {e.strerror or e}") from None
        finally:
            utils.remove_quietly(tmp)
    raise SystemExit(f"error: could not download HellaSwag from {URL} ({error}). "
                     f"On an offline machine, fetch that file elsewhere and pass "
                     f"--data_file=path/to/hellaswag_val.jsonl")


def verify(path, source):
    """The upstream file publishes no checksum, so check what we can:
    10,042 lines, all in HellaSwag's schema."""
    try:
        n = len(load_examples(path, style="harness"))  # harness needs every field
    except SystemExit as e:
        raise SystemExit(f"error: {source} is malformed: {str(e).removeprefix('error: ')}") from None
    if n != N_LINES:
        raise SystemExit(f"error: {source} has {n} examples, expected {N_LINES}")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_sha256(path):
    digest = sha256_of(path)
    utils.atomic_write(path + ".sha256", lambda f: f.write(digest + "\n"), mode="w")


def read_sha256(path):
    with open(path + ".sha256") as f:
        return f.read().strip()


def default_path(cache_dir=cache_dir):
    """Where the download is cached: cache_dir relative to this script's folder
    (an absolute one stays)."""
    return os.path.join(HERE, cache_dir, os.path.basename(URL))


def ensure_data(data_file=None, cache_dir=cache_dir):
    """Path of the validation JSONL: `data_file` as given,
    else the cached download (fetched on first use).

    Trust on first use: the sha256 of the verified download is recorded beside it and checked on
    every later load, so a cache that was changed or truncated since is caught. A file placed in the
    cache by hand (no sidecar) is verified once and then recorded the same way.
    """
    if data_file is not None:
        if not os.path.isfile(data_file):
            raise SystemExit(f"error: --data_file={data_file}: no such file")
        return data_file
    path = default_path(cache_dir)
    if not os.path.exists(path):
        return download(os.path.dirname(path))
    if not os.path.exists(path + ".sha256"):
        verify(path, source=path)
        record_sha256(path)
    elif read_sha256(path) != sha256_of(path):
        raise SystemExit(f"error: {path} changed since it was downloaded (sha256 differs from "
                         f"{path}.sha256); delete both files to download again")
    return path


def check_example(ex, style):
    """None if `ex` has HellaSwag's schema (for `style`), else what is wrong with it."""
    if not isinstance(ex, dict):
        return "not a JSON object"
    harness_keys = ("activity_label", "ctx_a", "ctx_b") if style == "harness" else ()
    keys = ("ctx", "endings", "label") + harness_keys
    missing = [k for k in keys if k not in ex]
    if missing:
        return f"missing field(s) {missing}"
    if not all(isinstance(ex[k], str) for k in keys if k not in ("endings", "label")):
        return "text fields must be strings"
    endings = ex["endings"]
    if (not isinstance(endings, list) or len(endings) != 4
            or not all(isinstance(e, str) for e in endings)):
        return f"endings must be a list of 4 strings, got {endings!r:.80}"
    if type(ex["label"]) is not int or not 0 <= ex["label"] <= 3:
        return f"label must be an integer 0..3, got {ex['label']!r}"
    return None


def load_examples(path, skip_bad=False, limit=0, style="completion"):
    """The examples of a HellaSwag JSONL file, each line validated. Blank lines are ignored.

    A malformed line (not UTF-8, not JSON, not the schema) stops with `path:line: problem`, or is
    skipped (and counted on stderr) with skip_bad. limit > 0 keeps the first `limit` valid examples.
    A file with no examples is an error: it would score 0 out of 0.
    """
    examples, bad = [], 0
    try:
        # bytes: a line that is not UTF-8 is named like any other bad line
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ex = json.loads(line.decode("utf-8"))
                    problem = check_example(ex, style)
                except UnicodeDecodeError:
                    problem = "not UTF-8 text (is it a binary file?)"
                except json.JSONDecodeError as e:
                    problem = f"bad JSON ({e})"
                if problem is None:
                    examples.append(ex)
                elif skip_bad:
                    bad += 1
                else:
                    raise SystemExit(f"error: {path}:{lineno}: {problem} "
                                     f"(--skip_bad=True skips malformed lines)")
                if limit and len(examples) == limit:
                    break
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror or e}") from None
    if bad:
        print(f"hellaswag: skipped {bad} malformed line(s) of {path}", file=sys.stderr)
    if not examples:
        detail = f", {bad} malformed line(s)" if bad else " (an empty file?)"
        raise SystemExit(f"error: {path}: no HellaSwag examples" + detail)
    return examples


# -----------------------------------------------------------------------------
# rendering and scoring


def preprocess(text):
    """lm-eval-harness's HellaSwag cleanup: WikiHow bracket markup out,
    " [title]" becomes a sentence end."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def render_example(example, enc, style="completion"):
    """(context tokens, 4 ending token lists, 4 ending lengths in characters) in GPT-2 tokens."""
    if style == "completion":
        context, endings = example["ctx"], example["endings"]
    elif style == "harness":
        context = preprocess(example["activity_label"] + ": " + example["ctx_a"] + " "
                             + example["ctx_b"].capitalize())
        endings = [preprocess(e) for e in example["endings"]]
    else:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    # the space belongs to the ending
    ending_tokens = [enc.encode_ordinary(" " + e) for e in endings]
    return enc.encode_ordinary(context), ending_tokens, [len(e) for e in endings]


def ending_losses(model, rendered, device, autocast_ctx=None):
    """Summed loss and token count of every ending of `rendered` examples:
    two (n, 4) tensors on the CPU.

    One forward pass for all 4n rows, right-padded; a mask selects the ending tokens' targets.
    Rows longer than the model's block_size lose tokens from the left (the context's start).
    """
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    rows, n_ending = [], []
    for context, endings, _ in rendered:
        for ending in endings:
            row = context + ending
            if block_size is not None:
                row = row[-(block_size + 1):]  # inputs row[:-1] must fit the block
            rows.append(row)
            n_ending.append(min(len(ending), len(row) - 1))
    R, L = len(rows), max(max(len(r) for r in rows) - 1, 1)
    # pad token 0: never a target, and causal attention keeps it out
    idx = torch.zeros((R, L), dtype=torch.long)
    targets = torch.full((R, L), -1, dtype=torch.long)  # -1 = ignored (context and padding)
    for i, (row, n) in enumerate(zip(rows, n_ending, strict=True)):
        idx[i, :len(row) - 1] = torch.tensor(row[:-1])
        if n:  # 0 only for a one-token row (empty context): nothing to score
            targets[i, len(row) - 1 - n:len(row) - 1] = torch.tensor(row[-n:])
    idx, targets = idx.to(device), targets.to(device)
    with autocast_ctx or nullcontext():
        _, token_loss = model(idx, targets, reduction="none")  # (R, L) float32, 0 where ignored
    losses = token_loss.double().cpu()  # float64 sums: equal token losses tie exactly
    counts = (targets >= 0).sum(dim=1).cpu()
    return losses.sum(dim=1).view(-1, 4), counts.view(-1, 4)


def predict(sum_loss, n_tokens, n_chars, style):
    """(pred, pred_norm) index tensors; argmin returns the lowest index on ties."""
    norm = n_tokens if style == "completion" else n_chars  # harness: log-prob per character
    return sum_loss.argmin(dim=1), (sum_loss / norm.clamp(min=1)).argmin(dim=1)


@torch.no_grad()
def score_examples(model, examples, enc, device, style="completion", autocast_ctx=None,
                   batch_size=16):
    """List of (pred_sum, pred_norm) ending indices, one per example,
    batch_size examples per forward."""
    was_training = model.training
    model.eval()
    try:
        preds = []
        for start in range(0, len(examples), batch_size):
            rendered = [render_example(ex, enc, style) for ex in examples[start:start + batch_size]]
            sum_loss, n_tokens = ending_losses(model, rendered, device, autocast_ctx)
            n_chars = torch.tensor([r[2] for r in rendered], dtype=torch.float64)
            pred, pred_norm = predict(sum_loss, n_tokens, n_chars, style)
            preds.extend(zip(pred.tolist(), pred_norm.tolist(), strict=True))
        return preds
    finally:
        model.train(was_training)


def evaluate(model, examples, enc, device, style="completion", autocast_ctx=None,
             rank=0, world_size=1, batch_size=16):
    """dict(acc, acc_norm, correct, correct_norm, total, style)
    over all ranks' shares of `examples`."""
    shard = examples[rank::world_size]
    preds = score_examples(model, shard, enc, device, style, autocast_ctx, batch_size)
    correct = sum(p == ex["label"] for (p, _), ex in zip(preds, shard, strict=True))
    correct_norm = sum(p == ex["label"] for (_, p), ex in zip(preds, shard, strict=True))
    counts = torch.tensor([correct, correct_norm, len(shard)], dtype=torch.long, device=device)
    correct, correct_norm, total = utils.all_reduce_sum(counts).tolist()
    return dict(acc=correct / max(total, 1), acc_norm=correct_norm / max(total, 1),
                correct=correct, correct_norm=correct_norm, total=total, style=style)


def for_training(meta, data_file, limit, local_rank, world_size, device, print0):
    """(examples, GPT-2 encoding) for scoring inside training, or None after one line saying why.
    GPT-2 BPE data only. A file the run names is read as given; otherwise the cache, which local
    rank 0 of each node downloads once while the other ranks wait for it. Every rank scores or none
    does: evaluate's all-reduce would hang otherwise."""
    if meta.get("tokenizer") != "gpt2":
        print0(f"HellaSwag: skipped, it needs GPT-2 BPE tokens and the data holds "
               f"{meta['tokenizer']} tokens")
        return None
    path, enc = data_file or default_path(), None
    try:
        enc = data.tiktoken_encoding("gpt2")
        if not data_file and local_rank == 0:
            ensure_data()  # downloads and verifies it, if it is not there yet
    except SystemExit as e:
        print0(f"HellaSwag: skipped: {str(e).removeprefix('error: ')}")
    utils.barrier()  # the downloads are done (or failed) on every node
    ready = torch.tensor(float(enc is not None and os.path.exists(path)), device=device)
    if utils.all_reduce_sum(ready).item() < world_size:
        print0(f"HellaSwag: skipped, {path} is not there on every rank "
               f"(python hellaswag.py downloads it)")
        return None
    return load_examples(path, limit=limit), enc


# -----------------------------------------------------------------------------
# standalone CLI


def load_checkpoint(path, device):
    """The GPT of a train_gpt2.py checkpoint (the path as given), on `device`; a one-line exit for a
    file that is no such checkpoint (model.from_checkpoint's checks), a recurrent model, or a model
    that does not work in GPT-2 BPE tokens, which HellaSwag is scored in."""
    ckpt = utils.load_checkpoint(path)
    try:
        config = config_from_checkpoint(ckpt)
        if not isinstance(config, GPTConfig):
            raise SystemExit(f"error: {path} holds {describe(config)}; hellaswag.py scores GPT "
                             f"checkpoints of train_gpt2.py")
        net = from_checkpoint(ckpt)
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None
    meta = ckpt.get("meta")
    problem = data.meta_problem(meta) if meta is not None else None
    if problem:
        raise SystemExit(f"error: {path}: its tokenizer description (\"meta\") is unusable: {problem}")
    tokens = meta.get("tokenizer") if meta is not None else None
    if tokens not in (None, "gpt2") or net.config.vocab_size < 50257:
        trained_on = f"{tokens} tokens" if tokens not in (None, "gpt2") else \
            f"a vocabulary of {net.config.vocab_size} ids"
        raise SystemExit(f"error: --checkpoint={path}: the model works in {trained_on}; HellaSwag is "
                         f"scored in GPT-2 BPE tokens, so only a model trained on GPT-2 BPE data "
                         f"can be scored")
    return net.to(device)


def load_model(device):
    """(model on device, what it is) for --checkpoint or --model."""
    if checkpoint is not None:
        return load_checkpoint(checkpoint, device), checkpoint
    try:
        return GPT.from_pretrained(model).to(device), model
    except (ValueError, RuntimeError) as e:  # unknown name, no transformers, offline
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise SystemExit(f"error: --model={model}: {first_line}") from None


def main(argv):
    settings = utils.apply_overrides(globals(), argv, CHOICES)
    check_settings()
    dev = utils.pick_device(device)
    device_type = dev.split(":")[0]  # autocast wants "cuda", not "cuda:3"
    precision = utils.pick_dtype(dtype, device_type)
    autocast_ctx = utils.autocast_context(device_type, precision)
    # cheap checks first: a data file you name (local, read in a second), then the model, and only
    # then the download, which a model that cannot be scored would have wasted
    examples = load_examples(ensure_data(data_file), skip_bad, limit, style) \
        if data_file is not None else None
    net, source = load_model(dev)
    if examples is None:
        examples = load_examples(ensure_data(None, cache_dir), skip_bad, limit, style)
    enc = data.tiktoken_encoding("gpt2")

    t0 = time.time()
    result = evaluate(net, examples, enc, dev, style, autocast_ctx, batch_size=batch_size)
    seconds = time.time() - t0
    print(f"hellaswag ({style} style) acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} "
          f"({result['correct_norm']}/{result['total']})")
    print(f"{result['total']} examples in {seconds:.1f} s "
          f"({result['total'] / seconds:.1f} examples/s) on {dev}, {precision}, {source}")
    if json_out is not None:
        figures = dict(result, source=source, device=dev, dtype=precision, seconds=seconds,
                       examples_per_s=result["total"] / seconds, limit=limit, settings=settings)
        utils.atomic_write_json(json_out, figures)


if __name__ == "__main__":
    try:
        try:
            main(sys.argv[1:])
        finally:  # output still buffered goes now, while a closed pipe can be caught
            sys.stdout.flush()
    except BrokenPipeError:  # `python hellaswag.py --help | head`: the reader has all it wanted
        # Python's recipe: stdout to devnull, or the flush at exit raises again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
