"""HellaSwag (validation, 10,042 examples x 4 endings): download, render and score a GPT, standalone
or in training (train_gpt2.py calls for_training once, then evaluate on every rank).

    python hellaswag.py --checkpoint=out/ckpt_005000.pt        # a train_gpt2.py checkpoint
    python hellaswag.py --model=gpt2 --limit=500               # Hugging Face weights via model.py
    python hellaswag.py --model=gpt2 --style=harness --data_file=val.jsonl --json_out=hs.json

The model (--checkpoint or --model) must work in GPT-2 BPE tokens; it is checked before a download.
Files you name are read and written as given (from the cwd); cache_dir is relative to the repo.

Two conventions (say which one a figure uses; the CLI prints it):
  completion (build-nanogpt, llm.c): context = raw `ctx`, ending = " " + ending; acc = lowest
      summed token loss, acc_norm = lowest mean token loss. GPT-2 124M: acc 0.2859, acc_norm 0.2955.
  harness (lm-eval-harness): context and endings cleaned (render_example); acc = highest summed
      log-prob, acc_norm = that / the ending's characters. GPT-2 124M: acc 0.2892, acc_norm 0.3114.
Ties go to the lowest ending index, as in lm-eval-harness (token losses are summed in float64).
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
from model import GPT, gpt_from_checkpoint

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

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
N_LINES = 10042  # non-empty lines of the official validation file
RETRIES = 3  # download attempts, waiting 1 s, then 2 s, between them
STYLES = ("completion", "harness")
CHOICES = dict(dtype=utils.DTYPES, style=STYLES)


def check_settings():
    utils.require((checkpoint is None) != (model is None),
                  "--checkpoint or --model is required (only one), to name the model to score: "
                  "--checkpoint=path/to/ckpt.pt (a train_gpt2.py checkpoint) or --model=gpt2 "
                  "(GPT-2's weights)")
    utils.require(limit >= 0, f"--limit must be >= 0 (0 = all), got {limit}")
    utils.require(batch_size >= 1, f"--batch_size must be >= 1, got {batch_size}")


# -----------------------------------------------------------------------------
# data: download once, verify, validate every line


def download(folder):
    """Fetch the validation JSONL into `folder`: retried, verified in a temporary file, renamed."""
    import requests  # only the download needs it
    path = os.path.join(folder, os.path.basename(URL))
    for attempt in range(RETRIES):
        if attempt:
            time.sleep(2 ** (attempt - 1))
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            utils.remove_stale_temporaries(path)
            prefix = f".tmp_{os.path.basename(path)}.{os.getpid()}."
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix)
            with os.fdopen(fd, "wb") as f, requests.get(URL, stream=True, timeout=30) as response:
                response.raise_for_status()
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
            verify(tmp, source=URL)
            os.chmod(tmp, 0o666 & ~utils.UMASK)  # mkstemp makes 0600 files
            os.replace(tmp, path)
            record_sha256(path)  # after the rename: interrupted here, ensure_data re-verifies it
            return path
        except requests.RequestException as e:  # before OSError: requests' errors are OSErrors too
            error = e
        except OSError as e:
            raise SystemExit(f"error: cannot write {path}: {e.strerror or e}") from None
        finally:
            utils.remove_quietly(tmp)
    raise SystemExit(f"error: could not download HellaSwag from {URL} ({error}). Offline, fetch "
                     f"that file elsewhere and pass --data_file=path/to/hellaswag_val.jsonl")


def verify(path, source):
    """The upstream file publishes no checksum: check 10,042 lines, all in HellaSwag's schema."""
    try:
        n = len(load_examples(path, style="harness"))  # harness needs every field
    except SystemExit as e:
        raise SystemExit(f"error: {source} is malformed: {str(e).removeprefix('error: ')}") from None
    if n != N_LINES:
        raise SystemExit(f"error: {source} has {n} examples, expected {N_LINES}")


def sha256_of(path):
    with open(path, "rb") as f:  # 11 MB
        return hashlib.sha256(f.read()).hexdigest()


def record_sha256(path):
    digest = sha256_of(path)
    utils.atomic_write(path + ".sha256", lambda f: f.write(digest + "\n"), mode="w")


def default_path(cache_dir=cache_dir):
    return os.path.join(utils.in_repo(cache_dir), os.path.basename(URL))


def ensure_data(data_file=None, cache_dir=cache_dir):
    """Path of the validation JSONL: `data_file` as given, else the cached download. Trust on first
    use: the sha256 of the verified file is recorded beside it and checked on every later load."""
    if data_file is not None:
        if not os.path.isfile(data_file):
            raise SystemExit(f"error: --data_file={data_file}: no such file")
        return data_file
    path = default_path(cache_dir)
    if not os.path.exists(path):
        return download(os.path.dirname(path))
    if not os.path.exists(path + ".sha256"):  # placed there by hand: verified once
        verify(path, source=path)
        record_sha256(path)
    with open(path + ".sha256") as f:
        if f.read().strip() != sha256_of(path):
            raise SystemExit(f"error: {path} changed since it was downloaded (sha256 differs from "
                             f"{path}.sha256); delete both files to download again")
    return path


def check_example(ex, style):
    """None if `ex` has HellaSwag's schema (for `style`), else what is wrong with it."""
    if not isinstance(ex, dict):
        return "not a JSON object"
    harness_keys = ("activity_label", "ctx_a", "ctx_b") if style == "harness" else ()
    missing = [k for k in ("ctx", "endings", "label") + harness_keys if k not in ex]
    if missing:
        return f"missing field(s) {missing}"
    if not all(isinstance(ex[k], str) for k in ("ctx",) + harness_keys):
        return "text fields must be strings"
    endings = ex["endings"]
    if (not isinstance(endings, list) or len(endings) != 4
            or not all(isinstance(e, str) for e in endings)):
        return f"endings must be a list of 4 strings, got {endings!r:.80}"
    if type(ex["label"]) is not int or not 0 <= ex["label"] <= 3:
        return f"label must be an integer 0..3, got {ex['label']!r}"
    return None


def load_examples(path, skip_bad=False, limit=0, style="completion"):
    """The examples of a HellaSwag JSONL file, the first `limit` if > 0; a malformed line (not
    UTF-8, not JSON, not the schema) stops with `path:line: problem`, or is skipped (skip_bad)."""
    examples, bad = [], 0
    try:
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named like any other
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
    if not examples:  # it would score 0 out of 0
        detail = f", {bad} malformed line(s)" if bad else " (an empty file?)"
        raise SystemExit(f"error: {path}: no HellaSwag examples" + detail)
    return examples


# -----------------------------------------------------------------------------
# rendering and scoring


def preprocess(text):
    """lm-eval-harness's cleanup: WikiHow bracket markup out, " [title]" becomes a sentence end."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


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
    ending_tokens = [enc.encode_ordinary(" " + e) for e in endings]  # the space is the ending's
    return enc.encode_ordinary(context), ending_tokens, [len(e) for e in endings]


def ending_losses(model, rendered, device, autocast_ctx=None):
    """Summed loss and token count of every ending of `rendered` examples: two (n, 4) CPU tensors,
    from one forward pass; rows longer than the model's block_size lose the context's start."""
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
    idx = torch.zeros((R, L), dtype=torch.long)  # pad token 0: never a target, causally unseen
    targets = torch.full((R, L), -1, dtype=torch.long)  # -1 = ignored (context and padding)
    for i, (row, n) in enumerate(zip(rows, n_ending, strict=True)):
        idx[i, :len(row) - 1] = torch.tensor(row[:-1])
        if n:  # 0 only for a one-token row (empty context): nothing to score
            targets[i, len(row) - 1 - n:len(row) - 1] = torch.tensor(row[-n:])
    with autocast_ctx or nullcontext():  # token_loss: (R, L) float32, 0 where ignored
        _, token_loss = model(idx.to(device), targets.to(device), reduction="none")
    losses = token_loss.double().cpu()  # float64 sums: equal token losses tie exactly
    return losses.sum(dim=1).view(-1, 4), (targets >= 0).sum(dim=1).view(-1, 4)


@torch.no_grad()
def score_examples(model, examples, enc, device, style="completion", autocast_ctx=None,
                   batch_size=16):
    """(pred_sum, pred_norm) ending indices of each example, batch_size examples per forward."""
    was_training = model.training
    model.eval()
    try:
        preds = []
        for start in range(0, len(examples), batch_size):
            rendered = [render_example(ex, enc, style) for ex in examples[start:start + batch_size]]
            sum_loss, n_tokens = ending_losses(model, rendered, device, autocast_ctx)
            n_chars = torch.tensor([r[2] for r in rendered], dtype=torch.float64)
            norm = n_tokens if style == "completion" else n_chars  # harness: log-prob per character
            pred_norm = (sum_loss / norm.clamp(min=1)).argmin(dim=1)  # argmin: lowest index on ties
            preds.extend(zip(sum_loss.argmin(dim=1).tolist(), pred_norm.tolist(), strict=True))
        return preds
    finally:
        model.train(was_training)


def evaluate(model, examples, enc, device, style="completion", autocast_ctx=None,
             rank=0, world_size=1, batch_size=16):
    """dict(acc, acc_norm, correct, correct_norm, total, style), the same on every rank: each scores
    examples[rank::world_size] with the raw model (not the DDP or compiled wrapper)."""
    shard = examples[rank::world_size]
    preds = score_examples(model, shard, enc, device, style, autocast_ctx, batch_size)
    correct = sum(p == ex["label"] for (p, _), ex in zip(preds, shard, strict=True))
    correct_norm = sum(p == ex["label"] for (_, p), ex in zip(preds, shard, strict=True))
    counts = torch.tensor([correct, correct_norm, len(shard)], dtype=torch.long, device=device)
    correct, correct_norm, total = utils.all_reduce_sum(counts).tolist()
    return dict(acc=correct / max(total, 1), acc_norm=correct_norm / max(total, 1),
                correct=correct, correct_norm=correct_norm, total=total, style=style)


def for_training(meta, data_file, limit, local_rank, world_size, device, print0):
    """(examples, GPT-2 encoding) for evaluate in training on GPT-2 BPE data, or None after one line
    saying why. Local rank 0 of each node fills the cache; all ranks score or none (all-reduce)."""
    if meta.get("tokenizer") != "gpt2":
        print0(f"HellaSwag: skipped, the data holds {meta['tokenizer']} tokens, not GPT-2 BPE")
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
        print0(f"HellaSwag: skipped, {path} is not on every rank (hellaswag.py downloads it)")
        return None
    return load_examples(path, limit=limit), enc


# -----------------------------------------------------------------------------
# standalone CLI


def load_checkpoint(path, device):
    """The GPT of a train_gpt2.py checkpoint on `device`, if it works in GPT-2 BPE tokens."""
    ckpt = utils.load_checkpoint(path)
    try:
        net = gpt_from_checkpoint(ckpt, "hellaswag.py scores GPT checkpoints of train_gpt2.py")
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None
    meta = data.checkpoint_meta(ckpt, path, net.config.vocab_size, required=False)
    tokens = (meta or {}).get("tokenizer", "gpt2")  # no meta: the vocabulary must tell
    if tokens != "gpt2" or net.config.vocab_size < 50257:
        trained_on = f"{tokens} tokens" if tokens != "gpt2" else \
            f"a vocabulary of {net.config.vocab_size} ids"
        raise SystemExit(f"error: --checkpoint={path}: the model works in {trained_on}; HellaSwag is "
                         f"scored in GPT-2 BPE tokens")
    return net.to(device)


def main(argv):
    settings = utils.apply_overrides(globals(), argv, CHOICES)
    check_settings()
    dev = utils.pick_device(device)
    device_type = dev.split(":")[0]  # autocast wants "cuda", not "cuda:3"
    precision = utils.pick_dtype(dtype, device_type)
    autocast_ctx = utils.autocast_context(device_type, precision)
    if data_file is not None:  # cheap checks first: a named file, the model, then a download
        examples = load_examples(ensure_data(data_file), skip_bad, limit, style)
    if checkpoint is not None:
        net, source = load_checkpoint(checkpoint, dev), checkpoint
    else:
        try:
            net, source = GPT.from_pretrained(model).to(dev), model
        except (ValueError, RuntimeError) as e:  # unknown name, no transformers, offline
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise SystemExit(f"error: --model={model}: {first_line}") from None
    if data_file is None:  # not for a model that cannot be scored
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
    utils.run_script(main)
