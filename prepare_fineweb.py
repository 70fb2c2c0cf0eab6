"""Tokenize a Hugging Face text dataset (default FineWeb-Edu sample-10BT) into GPT-2 token shards.

    python prepare_fineweb.py                                 # FineWeb-Edu 10BT -> data/fineweb10B
    python prepare_fineweb.py --max_tokens=100000000          # stream only the first 100M tokens
    python prepare_fineweb.py --data_files="corpus/*.jsonl"   # local parquet / jsonl / txt, offline

Every document (a local .txt file is one) becomes <|endoftext|> (50256) and its encode_ordinary
tokens; the stream is cut into shards of shard_size tokens: shard 000000 is val, the rest train. An
interrupted run goes on after its last complete shard (progress.json), given the same settings and
files. One run and one job per out_dir. The last line printed is the --data_dir to train on.

Datasets (--dataset= / --name=) with a "text" column and a "train" split, sizes in GPT-2 tokens:
    HuggingFaceFW/fineweb-edu   sample-10BT (default): ~9.9B, 9.67M documents, 100 shards, ~19 GB;
                                sample-100BT: ~100B, ~1,000 shards
    HuggingFaceFW/fineweb       sample-10BT
    roneneldan/TinyStories      --name=None: ~0.5B
    Skylion007/openwebtext      --name=None: ~9B
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
LOCAL_KINDS = {"parquet": "parquet", "json": "json", "jsonl": "json", "txt": "text"}  # -> builder


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
    """Where each document of a local file is, in order: 'file:line', 'file, record k' or 'file'."""
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
            extra = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=paths, split="train",
                                       streaming=True, **extra)  # in place, no Arrow copy
        else:
            ds = datasets.load_dataset(dataset, name=name, split=split,
                                       streaming=streaming or max_tokens > 0)
        batches = ds.skip(skip).iter(batch_size=batch_size)
        first = next(batches, None)  # read here, in the main thread, not in the pool's feeder thread
    except StopIteration:  # what datasets raises when every local file is empty
        first = None
    except Exception as e:  # offline, a wrong dataset name or subset, a file the reader cannot parse
        hint = "" if data_files else "\n  offline, use local files: --data_files='corpus/*.parquet'"
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
                for k, text in enumerate(column):  # None is an empty document
                    if text is not None and not isinstance(text, str):
                        raise ReadError(f"error: {place_of(index + k)}: column {text_column!r} "
                                        f"holds {type(text).__name__} {text!r:.40}, not text")
                index += len(column)
                yield column
        except ReadError:
            raise
        except Exception as e:  # the pool re-raises this in the main loop, which prints it as one line
            raise ReadError(f"error: cannot read {source}: {type(e).__name__}: {e}") from e
    return texts()


class ReadError(Exception):
    """A dataset that fails while being read (an Exception: the pool's feeder thread passes it on)."""


# -----------------------------------------------------------------------------
# tokenizing (runs in the worker processes)

_encoder = None


def init_worker(encoding_name):
    global _encoder
    _encoder = tiktoken.get_encoding(encoding_name)


def tokenize(texts):
    """A batch of documents -> ([EOT] + tokens of each, concatenated; each one's length). With no
    special tokens, encode_to_numpy gives encode_ordinary's tokens without a list: ~15% faster."""
    docs = [_encoder.encode_to_numpy(text or "", disallowed_special=()) for text in texts]
    eot = np.array([_encoder.eot_token], dtype=np.uint32)
    tokens = np.concatenate([p for doc in docs for p in (eot, doc)] or [np.zeros(0, np.uint32)])
    lengths = np.array([len(doc) + 1 for doc in docs], dtype=np.int64)
    return tokens.astype(np.uint16) if _encoder.n_vocab <= 2**16 else tokens, lengths


def locate(ends, position):
    """(document, offset in it) of a token position in a batch whose documents end at `ends`."""
    doc = int(np.searchsorted(ends, position, side="right"))
    return doc, int(position - (ends[doc - 1] if doc else 0))


# -----------------------------------------------------------------------------
# the job


def listed(names):
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def resume_point(folder, shard_prefix, wanted, inputs):
    """The sidecar of an earlier run checked against the settings, input files and shards on disk,
    or a fresh one. Another job's shards or meta.json are refused: loaders read every shard."""
    progress_path = os.path.join(folder, "progress.json")
    start_over = f"delete {folder} to start over"
    # the files a loader reads as shards (data.list_shards' patterns)
    shards = sorted({os.path.basename(p) for split in data.SPLITS for ext in ("bin", "npy")
                     for p in glob.glob(os.path.join(glob.escape(folder), f"*_{split}_*.{ext}"))})
    if not os.path.exists(progress_path):
        meta = ["meta.json"] if os.path.exists(os.path.join(folder, "meta.json")) else []
        if shards or meta:
            what = "shards" if shards else "a meta.json"
            raise SystemExit(f"error: {folder} already holds {what} ({listed(shards + meta)}) but no "
                             f"progress.json: another job's. Give another --out_dir, or {start_over}")
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
                         f"give another --out_dir, or {start_over}")
    if progress["settings"] != wanted:
        before = progress["settings"]
        diff = {k: (before.get(k), v) for k, v in wanted.items() if before.get(k) != v}
        raise SystemExit(f"error: {progress_path} was written with other settings (name: (before, "
                         f"now)) {diff}; rerun with the old values, give another --out_dir, or "
                         f"{start_over}")
    # a sidecar written before the inputs were recorded cannot be checked: it takes today's
    if progress.setdefault("inputs", inputs) != inputs:
        then, now = {p: rest for p, *rest in progress["inputs"]}, {p: rest for p, *rest in inputs}
        changes = ([f"{p} added" for p in now if p not in then]
                   + [f"{p} removed" for p in then if p not in now]
                   + [f"{p} changed" for p in now if p in then and then[p] != now[p]]
                   or ["the files' order"])
        raise SystemExit(f"error: the files of --data_files={data_files} are not those "
                         f"{progress_path} was written from: {listed(changes)}. Rerun with the "
                         f"same files, or {start_over}")
    # this job's shards: those progress.json counts, and the next one, which a run stopped
    # between writing it and counting it leaves behind (it is written again)
    ours = [os.path.basename(data.shard_name(folder, shard_prefix, "train" if k else "val", k))
            for k in range(progress["shards"] + 1)]
    theirs = sorted(set(shards) - set(ours))
    if theirs:
        raise SystemExit(f"error: {folder} holds shards of another job ({listed(theirs)}) beside "
                         f"this one's: give another --out_dir, or {start_over}")
    try:
        for name in ours[:-1]:  # every shard the sidecar counts exists and is valid
            data.read_shard(os.path.join(folder, name))
    except data.ShardError as e:
        raise SystemExit(f"error: {e}; {progress_path} counts {progress['shards']} shards: "
                         f"{start_over}") from None
    return progress


def main(argv):
    settings = utils.apply_overrides(globals(), argv, CHOICES)
    check_settings()
    folder = utils.in_repo(out_dir)  # the settings stay as given; what they mean is worked out here
    shard_prefix = prefix
    if shard_prefix is None:  # "local", llm.c's name for FineWeb-Edu shards, or the dataset's
        shard_prefix = ("local" if data_files else "edufineweb" if "fineweb-edu" in dataset
                        else os.path.basename(dataset).lower())
    wanted = dict({k: settings[k] for k in OUTPUT_SETTINGS}, prefix=shard_prefix)  # prefix as used
    try:
        # a resumed run skips documents by count: it must read the same files (path, size, mtime)
        paths = local_files(data_files)[0] if data_files else []
        inputs = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]
        progress = resume_point(folder, shard_prefix, wanted, inputs)
        if progress.get("done"):
            print(f"{folder} is complete ({progress['shards']} shards, {progress['tokens']:,} tokens): "
                  f"nothing to do. To prepare it again, delete {folder} (or give another --out_dir)")
        else:
            # reads the first batch: a file that cannot work stops before there is a folder; only
            # then one run per folder (two would mix their shards), released by closing the file
            batches = documents(skip=progress["documents"])
            with utils.lock_folder(folder, "prepare run"):
                if resume_point(folder, shard_prefix, wanted, inputs) != progress:
                    raise SystemExit(f"error: another prepare run wrote {folder} while this one "
                                     f"was starting: run the same command again to go on")
                write_shards(folder, shard_prefix, progress, batches)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: rerun the same command to continue after the last complete "
                         "shard") from None
    print(f"train with: python train_gpt2.py --data_dir={utils.repo_relative(folder)}")
    return progress


def write_shards(folder, shard_prefix, progress, batches):
    """Tokenize `batches` into the shards after the last complete one, updating progress after each."""
    from tqdm import tqdm
    progress_path = os.path.join(folder, "progress.json")
    tokens_done = progress["shards"] * shard_size  # every complete shard holds shard_size tokens
    doc_index, drop = progress["documents"], progress["skip_tokens"]  # doc_index: of the next batch
    enc = data.tiktoken_encoding(tokenizer)
    if progress["shards"]:
        print(f"resuming after {progress['shards']} complete shards ({doc_index:,} documents)")

    def on_shard(path, used):  # the sidecar after every complete shard: where the next one starts
        doc, offset = locate(ends, start + used)
        progress.update(documents=doc_index + doc, skip_tokens=offset, shards=writer.index)
        utils.atomic_write_json(progress_path, progress)
    writer = data.ShardWriter(folder, shard_prefix, shard_size, enc.n_vocab,
                              first_index=progress["shards"], on_shard=on_shard)
    t0, docs_start, docs_end, tokens_start = time.time(), doc_index, doc_index, tokens_done
    bar = tqdm(total=max_tokens or None, initial=tokens_done, unit="tok", unit_scale=True, smoothing=0.1)
    processes = num_proc or os.cpu_count()
    pool = Pool(processes, initializer=init_worker, initargs=(tokenizer,)) if processes > 1 else None
    init_worker(tokenizer)  # for map() when there is no pool
    try:
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
    seconds = max(time.time() - t0, 1e-9)
    progress.update(done=True, documents=docs_end, skip_tokens=0, shards=writer.index,
                    tokens=tokens_done)
    utils.atomic_write_json(progress_path, progress)
    print(f"done: {docs_end - docs_start:,} documents, {tokens_done - tokens_start:,} tokens "
          f"this run ({tokens_done:,} total) in {writer.index} shards under {folder}, "
          f"{seconds:.1f} s, {(tokens_done - tokens_start) / seconds:,.0f} tokens/s")
    if writer.index == 1:
        print("warning: everything fits in one shard, so there is no train split: lower --shard_size")


if __name__ == "__main__":
    main(sys.argv[1:])
