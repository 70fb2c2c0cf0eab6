"""Tokenize a Hugging Face text dataset (default FineWeb-Edu sample-10BT) into GPT-2 token shards.

    python prepare_fineweb.py                                       # FineWeb-Edu 10BT -> data/fineweb10B
    python prepare_fineweb.py --max_tokens=100000000                # stream only the first 100M tokens
    python prepare_fineweb.py --data_files="corpus/*.jsonl"         # local parquet / jsonl / txt, offline

Every document becomes <|endoftext|> (50256) followed by its tokens exactly as tiktoken's encode_ordinary
gives them (a literal "<|endoftext|>" in a text stays plain text), and the token stream is cut into shards
of shard_size tokens (data.py's format): shard 000000 is val, the rest train; documents that cross a shard
boundary are split, nothing is dropped. Interrupted runs continue after their last complete shard
(out_dir/progress.json); a finished one does nothing. Local .txt files count as one document each.

Exact dataset names (--dataset= / --name=):
    HuggingFaceFW/fineweb-edu   sample-10BT (default), sample-100BT
    HuggingFaceFW/fineweb       sample-10BT
    roneneldan/TinyStories      name=None  (--name=None)
    Skylion007/openwebtext      name=None  (--name=None)
All four have a "text" column and a "train" split; give each its own --out_dir (e.g. data/tinystories).
"""
import glob
import json
import os
import sys
import time
from multiprocessing import Pool

import numpy as np

import data
from utils import apply_overrides, atomic_write_json

_here = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings (override with --name=value)
dataset = "HuggingFaceFW/fineweb-edu"  # Hugging Face dataset id (ignored when data_files is set)
name = "sample-10BT"  # dataset config / subset name (None for datasets without one)
split = "train"  # dataset split to read
text_column = "text"  # column holding each document's text
data_files = None  # local files instead of the hub: glob(s), comma-separated; .parquet, .jsonl/.json, .txt
out_dir = "data/fineweb10B"  # output folder, relative to this script's folder unless absolute
prefix = None  # shard name prefix; None = derived ("edufineweb" for fineweb-edu, else the dataset name)
shard_size = 100_000_000  # tokens per shard (100M = 200 MB as uint16)
max_tokens = 0  # 0 = the whole dataset; > 0 = stop after this many tokens (streams hub datasets)
num_proc = 0  # tokenizer processes; 0 = os.cpu_count(); 1 = no pool
tokenizer = "gpt2"  # tiktoken encoding name
streaming = False  # stream from the hub instead of downloading the whole dataset first
batch_size = 256  # documents per task sent to a tokenizer process (fewer, larger messages)

# the settings that decide the shards' contents: a restart must use the same values
output_settings = ("dataset", "name", "split", "text_column", "data_files", "prefix", "shard_size",
                   "max_tokens", "tokenizer")


# -----------------------------------------------------------------------------
# reading documents


def local_files(pattern):
    """Sorted files matching comma-separated globs, and the datasets builder that reads them."""
    paths = []
    for part in pattern.split(","):
        found = sorted(glob.glob(os.path.expanduser(part.strip())))
        if not found:
            raise SystemExit(f"--data_files: no file matches {part.strip()!r}")
        paths += found
    kinds = {"parquet": "parquet", "json": "json", "jsonl": "json", "txt": "text"}
    builders = set()
    for p in paths:
        ext = p.removesuffix(".gz").rsplit(".", 1)[-1]
        if ext not in kinds:
            raise SystemExit(f"--data_files: {p} is not .parquet, .jsonl, .json or .txt")
        builders.add(kinds[ext])
    if len(builders) > 1:
        raise SystemExit(f"--data_files mixes file types ({sorted(builders)}); use one type per run")
    return paths, builders.pop()


def documents(skip=0):
    """Lists of batch_size texts in a fixed order, after skipping the first `skip` documents."""
    import datasets  # slow to import: only when documents are read
    if data_files:
        paths, builder = local_files(data_files)
        # streaming reads local files in place (no Arrow copy in the HF cache); a .txt file is one document
        extra = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=paths, split="train", streaming=True, **extra)
    else:
        try:
            ds = datasets.load_dataset(dataset, name=name, split=split, streaming=streaming or max_tokens > 0)
        except (ConnectionError, OSError, ValueError) as e:  # offline, a wrong name or subset
            raise SystemExit(f"cannot load {dataset} ({name}) from the Hugging Face hub: {type(e).__name__}: {e}\n"
                             f"  offline, pass local files instead: --data_files='corpus/*.parquet'") from None
    batches = ds.skip(skip).iter(batch_size=batch_size)
    try:
        first = next(batches, None)  # checked here, in the main thread, not inside the pool's feeder thread
    except Exception as e:
        raise SystemExit(f"cannot read {data_files or dataset}: {type(e).__name__}: {e}")
    if first is not None and text_column not in first:
        raise SystemExit(f"no column {text_column!r} in {data_files or dataset}; it has {list(first)}: "
                         f"set --text_column")

    def texts():
        try:
            for batch in ([first] if first is not None else []):
                yield batch[text_column]
            for batch in batches:
                yield batch[text_column]
        except Exception as e:  # the pool re-raises this in the main loop, which turns it into a message
            raise ReadError(f"cannot read {data_files or dataset}: {type(e).__name__}: {e}") from e
    return texts()


class ReadError(Exception):
    """A dataset that fails while being read (an Exception: the pool's feeder thread passes those on)."""


# -----------------------------------------------------------------------------
# tokenizing (runs in the worker processes)

_encoder = None


def init_worker(encoding_name):
    global _encoder
    import tiktoken
    _encoder = tiktoken.get_encoding(encoding_name)


def tokenize(texts):
    """A batch of documents -> (their tokens concatenated, each as [EOT] + tokens; each one's length).

    encode_to_numpy with no special tokens gives exactly encode_ordinary's tokens (a literal <|endoftext|>
    in the text is plain text; encode() would raise on it) without building a Python list: ~15% faster.
    """
    eot = np.array([_encoder.eot_token], dtype=np.uint32)
    pieces = []
    for text in texts:
        pieces += [eot, _encoder.encode_to_numpy(text or "", disallowed_special=())]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
    lengths = np.array([len(p) for p in pieces[1::2]], dtype=np.int64) + 1
    return tokens.astype(np.uint16) if _encoder.n_vocab <= 2**16 else tokens, lengths


def locate(ends, position):
    """(document, offset in it) of a token position in a batch whose documents end at `ends` (cumsum)."""
    doc = int(np.searchsorted(ends, position, side="right"))
    return doc, int(position - (ends[doc - 1] if doc else 0))


# -----------------------------------------------------------------------------
# the job


def resolve(settings):
    """Absolute out_dir and the derived prefix (stored back in the settings for the sidecar)."""
    global out_dir, prefix
    out_dir = os.path.join(_here, out_dir)  # an absolute out_dir stays as it is
    if prefix is None:
        prefix = "edufineweb" if "fineweb-edu" in dataset and not data_files else \
            os.path.basename(dataset if not data_files else "local").lower()
    settings.update(out_dir=out_dir, prefix=prefix)
    return {k: settings[k] for k in output_settings}


def resume_point(progress_path, wanted):
    """The sidecar of an earlier run (documents to skip, tokens of the next one to drop, shards done, done),
    checked against the current settings and the shards on disk; None for a fresh start."""
    if not os.path.exists(progress_path):
        leftovers = glob.glob(os.path.join(out_dir, f"{prefix}_*_*.bin"))
        if leftovers:
            raise SystemExit(f"{out_dir} already holds shards ({os.path.basename(leftovers[0])}, ...) but no "
                             f"progress.json: delete them or choose another --out_dir")
        return None
    with open(progress_path) as f:
        progress = json.load(f)
    if progress["settings"] != wanted:
        before = progress["settings"]
        diff = {k: (before.get(k), v) for k, v in wanted.items() if before.get(k) != v}
        raise SystemExit(f"{progress_path} was written with other settings (name: (before, now)) {diff}; "
                         f"rerun with the old values, or delete {out_dir} to start over")
    try:
        for k in range(progress["shards"]):  # every shard the sidecar counts exists and is valid
            data.shard_length(data.shard_name(out_dir, prefix, "val" if k == 0 else "train", k))
    except data.ShardError as e:
        raise SystemExit(f"{e}; {progress_path} counts {progress['shards']} shards: "
                         f"delete {out_dir} to start over")
    return progress


def main(argv):
    settings = apply_overrides(globals(), argv)
    wanted = resolve(settings)
    if shard_size < 1 or max_tokens < 0 or num_proc < 0:
        raise SystemExit("shard_size must be >= 1, max_tokens >= 0 and num_proc >= 0")
    progress_path = os.path.join(out_dir, "progress.json")
    progress = resume_point(progress_path, wanted) or \
        dict(settings=wanted, documents=0, skip_tokens=0, shards=0)
    if progress.get("done"):
        print(f"{out_dir} is complete ({progress['shards']} shards, {progress['tokens']:,} tokens): "
              f"nothing to do. Delete {progress_path} to prepare again.")
        return progress
    from tqdm import tqdm
    enc = data.tiktoken_encoding(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    tokens_done = progress["shards"] * shard_size  # every complete shard holds exactly shard_size tokens
    if progress["shards"]:
        print(f"resuming after {progress['shards']} complete shards ({progress['documents']:,} documents)")
    doc_index, drop = progress["documents"], progress["skip_tokens"]  # first document of the next batch

    def on_shard(path, used):  # the sidecar, after every complete shard: where the next shard starts
        doc, offset = locate(ends, start + used)
        progress.update(documents=doc_index + doc, skip_tokens=offset, shards=writer.index)
        atomic_write_json(progress_path, progress)
    writer = data.ShardWriter(out_dir, prefix, shard_size, enc.n_vocab, first_index=progress["shards"],
                              on_shard=on_shard)
    t0, docs_start, docs_end, tokens_start = time.time(), doc_index, doc_index, tokens_done
    batches = documents(skip=doc_index)
    bar = tqdm(total=max_tokens or None, initial=tokens_done, unit="tok", unit_scale=True, smoothing=0.1)
    processes = num_proc or os.cpu_count()
    pool = Pool(processes, initializer=init_worker, initargs=(tokenizer,)) if processes > 1 else None
    try:
        if pool is None:
            init_worker(tokenizer)
        for tokens, lengths in (pool.imap(tokenize, batches) if pool else map(tokenize, batches)):
            ends = np.cumsum(lengths)  # where each document of the batch ends, before any drop
            start, drop = drop, 0  # a resumed job drops what the written shards already hold
            tokens = tokens[start:]
            if max_tokens:
                tokens = tokens[:max_tokens - tokens_done]
            writer.add(tokens)  # calls on_shard for every shard it completes
            tokens_done += len(tokens)
            bar.update(len(tokens))
            doc, offset = locate(ends, start + len(tokens))
            docs_end = doc_index + doc + (offset > 0)  # documents with tokens in the shards so far
            doc_index += len(lengths)
            if max_tokens and tokens_done >= max_tokens:
                break
    except ReadError as e:
        raise SystemExit(str(e))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # stop the workers even on Ctrl-C; every shard on disk is complete
    if tokens_done == 0:
        raise SystemExit(f"no tokens: {data_files or dataset} yielded no documents")
    writer.close()
    data.write_meta(out_dir, dict(tokenizer=tokenizer, vocab_size=enc.n_vocab, eot=enc.eot_token,
                                  itos=None, unk=None))
    seconds = time.time() - t0
    progress.update(done=True, documents=docs_end, skip_tokens=0, shards=writer.index, tokens=tokens_done)
    atomic_write_json(progress_path, progress)
    rate = (tokens_done - tokens_start) / max(seconds, 1e-9)
    print(f"done: {docs_end - docs_start:,} documents, {tokens_done - tokens_start:,} tokens this run "
          f"({tokens_done:,} total) in {writer.index} shards under {out_dir}, {seconds:.1f} s, "
          f"{rate:,.0f} tokens/s")
    if writer.index == 1:
        print("warning: everything fits in one shard, so there is no train split: lower --shard_size")
    return progress


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        raise SystemExit("interrupted: rerun the same command to continue after the last complete shard")

# Expected sizes (GPT-2 tokens, EOT included): fineweb-edu sample-10BT ~9.9B tokens (9.67M documents) =
# 100 shards of 100M (1 val + 99 train), ~19 GB; sample-100BT ~100B tokens, ~1,000 shards.
# TinyStories ~0.5B tokens, OpenWebText ~9B tokens.
