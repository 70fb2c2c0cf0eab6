"""Tokenize a Hugging Face text dataset (default FineWeb-Edu sample-10BT) into GPT-2 token shards.

    python prepare_fineweb.py                                 # FineWeb-Edu 10BT -> data/fineweb10B
    python prepare_fineweb.py --max_tokens=100000000          # stream only the first 100M tokens
    python prepare_fineweb.py --data_files="corpus/*.jsonl"   # local parquet / jsonl / txt, offline

Every document becomes <|endoftext|> (50256) followed by its tokens exactly as tiktoken's
encode_ordinary gives them (a literal "<|endoftext|>" in a text stays plain text), and the token
stream is cut into shards of shard_size tokens (data.py's format): shard 000000 is val, the rest
train; documents that cross a shard boundary are split, nothing is dropped. Interrupted runs
continue after their last complete shard (out_dir/progress.json), with the same settings and input
files; a finished one does nothing. One run per out_dir at a time, and one job per out_dir: a folder
holding another job's shards or meta.json is refused.
Local .txt files count as one document each.
The last line printed is the --data_dir to train on.

Exact dataset names (--dataset= / --name=):
    HuggingFaceFW/fineweb-edu   sample-10BT (default), sample-100BT
    HuggingFaceFW/fineweb       sample-10BT
    roneneldan/TinyStories      name=None  (--name=None)
    Skylion007/openwebtext      name=None  (--name=None)
All four have a "text" column and a "train" split;
give each its own --out_dir (e.g. data/tinystories).
"""
import glob
import gzip
import itertools
import json
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
import tiktoken

import data
import utils

# -----------------------------------------------------------------------------
# settings (override with --name=value)
dataset = "HuggingFaceFW/fineweb-edu"  # Hugging Face dataset id (ignored when data_files is set)
name = "sample-10BT"  # dataset config / subset name (None for datasets without one)
split = "train"  # dataset split to read
text_column = "text"  # column holding each document's text
data_files = None  # local files, not the hub: comma-separated globs; .parquet, .jsonl/.json, .txt
out_dir = "data/fineweb10B"  # output folder, relative to the repo folder unless absolute
prefix = None  # shard name prefix; None = "edufineweb" for fineweb-edu, else the dataset name
shard_size = 100_000_000  # tokens per shard (100M = 200 MB as uint16), >= 1
max_tokens = 0  # 0 = the whole dataset; > 0 = stop after this many tokens (streams hub datasets)
num_proc = 0  # tokenizer processes; 0 = os.cpu_count(); 1 = no pool
tokenizer = "gpt2"  # tiktoken encoding name
streaming = False  # stream from the hub instead of downloading the whole dataset first
batch_size = 256  # documents per task sent to a tokenizer process (fewer, larger messages), >= 1

CHOICES = dict(tokenizer=tuple(tiktoken.list_encoding_names()))
# the settings that decide the shards' contents: a restart must use the same values
OUTPUT_SETTINGS = ("dataset", "name", "split", "text_column", "data_files", "prefix", "shard_size",
                   "max_tokens", "tokenizer")
# extension -> builder
LOCAL_KINDS = {"parquet": "parquet", "json": "json", "jsonl": "json", "txt": "text"}


def check_settings():
    utils.require(shard_size >= 1, f"--shard_size must be >= 1, got {shard_size}")
    utils.require(max_tokens >= 0, f"--max_tokens must be >= 0 (0 = all), got {max_tokens}")
    utils.require(num_proc >= 0, f"--num_proc must be >= 0 (0 = every core), got {num_proc}")
    utils.require(batch_size >= 1, f"--batch_size must be >= 1, got {batch_size}")


# -----------------------------------------------------------------------------
# reading documents


def local_files(pattern):
    """Sorted files matching comma-separated globs, and the datasets builder that reads them."""
    paths = []
    for part in pattern.split(","):
        found = sorted(glob.glob(os.path.expanduser(part.strip())))
        if not found:
            raise SystemExit(f"error: --data_files: no file matches {part.strip()!r}")
        paths += found
    builders = set()
    for p in paths:
        ext = p.removesuffix(".gz").rsplit(".", 1)[-1]
        if ext not in LOCAL_KINDS:
            raise SystemExit(f"error: --data_files: {p} is not .parquet, .jsonl, .json or .txt")
        builders.add(LOCAL_KINDS[ext])
    if len(builders) > 1:
        raise SystemExit(f"error: --data_files mixes file types ({sorted(builders)}); "
                         f"use one type per run")
    return paths, builders.pop()


def places(path, builder):
    """Where each document of a local file is, in reading order: 'file:line' (JSON lines),
    'file, record k' (a JSON array, parquet rows), 'file' (a text file is one document).
    Read only to name a bad document."""
    if builder == "text":
        yield path
    elif builder == "parquet":
        import pyarrow.parquet as pq
        yield from (f"{path}, record {k + 1}" for k in range(pq.ParquetFile(path).metadata.num_rows))
    else:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            array = f.read(1 << 16).lstrip().startswith("[")
            f.seek(0)
            if array:
                yield from (f"{path}, record {k + 1}" for k in range(len(json.load(f))))
            else:
                yield from (f"{path}:{n}" for n, line in enumerate(f, 1) if line.strip())


def place_of(index):
    """Where document `index` (0-based, in reading order) comes from."""
    if data_files:
        paths, builder = local_files(data_files)
        every = itertools.chain.from_iterable(places(p, builder) for p in paths)
        return next(itertools.islice(every, index, None), f"{data_files}, document {index + 1}")
    return f"{dataset} ({name}), document {index + 1}"


def documents(skip=0):
    """Lists of batch_size texts in a fixed order, after skipping the first `skip` documents."""
    import datasets  # slow to import: only when documents are read
    source = dataset
    try:
        if data_files:
            paths, builder = local_files(data_files)
            source = paths[0] if len(paths) == 1 else data_files
            # streaming reads local files in place (no Arrow copy in the HF cache);
            # a .txt file is one document
            extra = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=paths, split="train",
                                       streaming=True, **extra)
        else:
            ds = datasets.load_dataset(dataset, name=name, split=split,
                                       streaming=streaming or max_tokens > 0)
        batches = ds.skip(skip).iter(batch_size=batch_size)
        # checked here, in the main thread, not inside the pool's feeder thread
        first = next(batches, None)
    except StopIteration:  # what datasets raises when every local file is empty
        first = None
    except Exception as e:
        # offline, a wrong dataset name or subset, a file the reader cannot parse
        hint = ("" if data_files
                else "\n  offline, pass local files instead: --data_files='corpus/*.parquet'")
        raise SystemExit(f"error: cannot read {source}: {type(e).__name__}: {e}{hint}") from None
    if first is None and skip == 0:
        raise SystemExit(f"error: {source}: no documents (an empty file?)")
    if first is not None and text_column not in first:
        raise SystemExit(f"error: no column {text_column!r} in {source}; it has {list(first)}: "
                         f"set --text_column")

    def texts():
        index = skip  # of the batch's first document
        try:
            for batch in itertools.chain([first] if first is not None else [], batches):
                column = batch[text_column]
                # None is an empty document; anything else is no text
                for k, text in enumerate(column):
                    if text is not None and not isinstance(text, str):
                        raise ReadError(f"error: {place_of(index + k)}: column {text_column!r} "
                                        f"holds {type(text).__name__} {text!r:.40}, not text")
                index += len(column)
                yield column
        except ReadError:
            raise
        except Exception as e:
            # the pool re-raises this in the main loop, which turns it into a message
            raise ReadError(f"error: cannot read {source}: {type(e).__name__}: {e}") from e
    return texts()


class ReadError(Exception):
    """A dataset that fails while being read
    (an Exception: the pool's feeder thread passes those on)."""


# -----------------------------------------------------------------------------
# tokenizing (runs in the worker processes)

_encoder = None


def init_worker(encoding_name):
    global _encoder
    _encoder = tiktoken.get_encoding(encoding_name)


def tokenize(texts):
    """A batch of documents -> (their tokens concatenated, each as [EOT] + tokens;
    each one's length).

    encode_to_numpy with no special tokens gives exactly encode_ordinary's tokens (a literal
    <|endoftext|> in the text is plain text; encode() would raise on it) without building a Python
    list: ~15% faster.
    """
    eot = np.array([_encoder.eot_token], dtype=np.uint32)
    pieces = []
    for text in texts:
        pieces += [eot, _encoder.encode_to_numpy(text or "", disallowed_special=())]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
    lengths = np.array([len(p) for p in pieces[1::2]], dtype=np.int64) + 1
    return tokens.astype(np.uint16) if _encoder.n_vocab <= 2**16 else tokens, lengths


def locate(ends, position):
    """(document, offset in it) of a token position
    in a batch whose documents end at `ends` (cumsum)."""
    doc = int(np.searchsorted(ends, position, side="right"))
    return doc, int(position - (ends[doc - 1] if doc else 0))


# -----------------------------------------------------------------------------
# the job


def default_prefix():
    """The shard name prefix when --prefix is None: llm.c's "edufineweb" for FineWeb-Edu,
    else the dataset's name ("local" for local files)."""
    if data_files:
        return "local"
    return "edufineweb" if "fineweb-edu" in dataset else os.path.basename(dataset).lower()


def input_files():
    """[absolute path, size, mtime] of each local file, in reading order; [] for a hub dataset.
    A resumed run skips the documents the shards hold by count, so it must read the same files."""
    if not data_files:
        return []
    return [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns]
            for p in local_files(data_files)[0]]


def changed_inputs(before, now):
    """What differs between two input_files() lists, file by file."""
    then, current = {p: rest for p, *rest in before}, {p: rest for p, *rest in now}
    return ([f"{p} added" for p in current if p not in then]
            + [f"{p} removed" for p in then if p not in current]
            + [f"{p} changed" for p in current if p in then and then[p] != current[p]]
            or ["the files' order"])


def shard_files(folder):
    """Names of the files in `folder` that a loader reads as shards (data.list_shards' patterns)."""
    return sorted({os.path.basename(p) for split in data.SPLITS for ext in ("bin", "npy")
                   for p in glob.glob(os.path.join(glob.escape(folder), f"*_{split}_*.{ext}"))})


def listed(names):
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def resume_point(folder, shard_prefix, wanted, inputs):
    """The sidecar of an earlier run (documents to skip, tokens of the next one to drop,
    shards done, done), checked against the current settings, the input files and the shards
    on disk; a fresh one when there is none. Shards or a meta.json of another job are refused:
    a loader reads every shard in the folder, and meta.json would be overwritten."""
    progress_path = os.path.join(folder, "progress.json")
    shards = shard_files(folder)
    if not os.path.exists(progress_path):
        meta = ["meta.json"] if os.path.exists(os.path.join(folder, "meta.json")) else []
        if shards or meta:
            what = "shards" if shards else "a meta.json"
            raise SystemExit(f"error: {folder} already holds {what} ({listed(shards + meta)}) "
                             f"but no progress.json: another job's. "
                             f"Give another --out_dir, or delete {folder} to start over")
        return dict(settings=wanted, inputs=inputs, documents=0, skip_tokens=0, shards=0)
    try:
        with open(progress_path) as f:
            progress = json.load(f)
        ok = (isinstance(progress, dict)
              and {"settings", "documents", "skip_tokens", "shards"} <= progress.keys()
              and isinstance(progress["settings"], dict)
              and isinstance(progress.get("inputs", []), list)
              and all(isinstance(i, list) and len(i) == 3 for i in progress.get("inputs", [])))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise SystemExit(f"error: {progress_path} is not a readable progress file of this script: "
                         f"give another --out_dir, or delete {folder} to start over")
    if progress["settings"] != wanted:
        before = progress["settings"]
        diff = {k: (before.get(k), v) for k, v in wanted.items() if before.get(k) != v}
        raise SystemExit(f"error: {progress_path} was written with other settings "
                         f"(name: (before, now)) {diff}; "
                         f"rerun with the old values, give another --out_dir, "
                         f"or delete {folder} to start over")
    # a sidecar written before the inputs were recorded cannot be checked: it takes today's
    if progress.setdefault("inputs", inputs) != inputs:
        changes = changed_inputs(progress["inputs"], inputs)
        raise SystemExit(f"error: the files of --data_files={data_files} are not those "
                         f"{progress_path} was written from: {'; '.join(changes[:3])}"
                         f"{' ...' if len(changes) > 3 else ''}. Rerun with the same files, "
                         f"or delete {folder} to start over")
    # this job's shards: those progress.json counts, and the next one, which a run stopped
    # between writing it and counting it leaves behind (it is written again)
    ours = {os.path.basename(data.shard_name(folder, shard_prefix, "val" if k == 0 else "train", k))
            for k in range(progress["shards"] + 1)}
    theirs = [name for name in shards if name not in ours]
    if theirs:
        raise SystemExit(f"error: {folder} holds shards of another job ({listed(theirs)}) beside "
                         f"this one's: give another --out_dir, or delete {folder} to start over")
    try:
        for k in range(progress["shards"]):  # every shard the sidecar counts exists and is valid
            data.read_shard(data.shard_name(folder, shard_prefix, "val" if k == 0 else "train", k))
    except data.ShardError as e:
        raise SystemExit(f"error: {e}; {progress_path} counts {progress['shards']} shards: "
                         f"delete {folder} to start over") from None
    return progress


def main(argv):
    settings = utils.apply_overrides(globals(), argv, CHOICES)
    check_settings()
    # the settings stay as given; what they mean for this run is worked out here
    folder = utils.in_repo(out_dir)
    shard_prefix = default_prefix() if prefix is None else prefix
    # the sidecar records the prefix the shards are named with, not None
    wanted = dict({k: settings[k] for k in OUTPUT_SETTINGS}, prefix=shard_prefix)
    try:
        return prepare(folder, shard_prefix, wanted)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: rerun the same command to continue after the last complete "
                         "shard") from None


def prepare(folder, shard_prefix, wanted):
    inputs = input_files()
    progress = resume_point(folder, shard_prefix, wanted, inputs)
    if progress.get("done"):
        print(f"{folder} is complete ({progress['shards']} shards, {progress['tokens']:,} "
              f"tokens): nothing to do. To prepare it again, delete {folder} "
              f"(or give another --out_dir)")
        print(f"train with: python train_gpt2.py --data_dir={utils.repo_relative(folder)}")
        return progress
    # reads the first batch: a file that cannot work stops here, before the folder is created
    batches = documents(skip=progress["documents"])
    # one run per folder for the rest of the job (two would write a mix of their shards), taken
    # only now so that bad input leaves no folder behind; closing the file releases it
    with utils.lock_folder(folder, "prepare run"):
        if resume_point(folder, shard_prefix, wanted, inputs) != progress:
            raise SystemExit(f"error: another prepare run wrote {folder} while this one was "
                             f"starting: run the same command again to go on from where it is now")
        return write_shards(folder, shard_prefix, progress, batches)


def write_shards(folder, shard_prefix, progress, batches):
    """Tokenize `batches` into the shards after the progress file's last complete one,
    updating it after every shard."""
    from tqdm import tqdm
    progress_path = os.path.join(folder, "progress.json")
    # every complete shard holds exactly shard_size tokens
    tokens_done = progress["shards"] * shard_size
    # first document of the next batch
    doc_index, drop = progress["documents"], progress["skip_tokens"]
    enc = data.tiktoken_encoding(tokenizer)
    if progress["shards"]:
        print(f"resuming after {progress['shards']} complete shards "
              f"({progress['documents']:,} documents)")

    # the sidecar, after every complete shard: where the next shard starts
    def on_shard(path, used):
        doc, offset = locate(ends, start + used)
        progress.update(documents=doc_index + doc, skip_tokens=offset, shards=writer.index)
        utils.atomic_write_json(progress_path, progress)
    writer = data.ShardWriter(folder, shard_prefix, shard_size, enc.n_vocab,
                              first_index=progress["shards"], on_shard=on_shard)
    t0, docs_start, docs_end, tokens_start = time.time(), doc_index, doc_index, tokens_done
    bar = tqdm(total=max_tokens or None, initial=tokens_done,
               unit="tok", unit_scale=True, smoothing=0.1)
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
        raise SystemExit(str(e)) from None
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # stop the workers even on Ctrl-C; every shard on disk is complete
    writer.close()
    data.write_meta(folder, dict(tokenizer=tokenizer, vocab_size=enc.n_vocab, eot=enc.eot_token,
                                 itos=None, unk=None))
    seconds = time.time() - t0
    progress.update(done=True, documents=docs_end, skip_tokens=0,
                    shards=writer.index, tokens=tokens_done)
    utils.atomic_write_json(progress_path, progress)
    rate = (tokens_done - tokens_start) / max(seconds, 1e-9)
    print(f"done: {docs_end - docs_start:,} documents, {tokens_done - tokens_start:,} tokens "
          f"this run ({tokens_done:,} total) in {writer.index} shards under {folder}, "
          f"{seconds:.1f} s, {rate:,.0f} tokens/s")
    if writer.index == 1:
        print("warning: everything fits in one shard, so there is no train split: "
              "lower --shard_size")
    print(f"train with: python train_gpt2.py --data_dir={utils.repo_relative(folder)}")
    return progress


if __name__ == "__main__":
    main(sys.argv[1:])

# Expected sizes (GPT-2 tokens, EOT included): fineweb-edu sample-10BT ~9.9B tokens
# (9.67M documents) = 100 shards of 100M (1 val + 99 train), ~19 GB;
# sample-100BT ~100B tokens, ~1,000 shards.
# TinyStories ~0.5B tokens, OpenWebText ~9B tokens.
