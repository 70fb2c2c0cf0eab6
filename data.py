"""Token shards and meta.json (the one implementation of both), and the loaders of the trainers.

Format (llm.c / modded-nanogpt): a header of 256 int32 (magic 20240520, version, token count, rest
zero), then the tokens: version 1 = uint16, version 2 = uint32 (vocabularies over 65,535 ids);
build-nanogpt's .npy uint16 shards are read too. Names: {prefix}_{split}_{k:06d}.bin (train/val/test).
meta.json beside the shards: tokenizer (a tiktoken name such as "gpt2", or "char", "word"),
vocab_size, eot (document separator id or null), itos (id -> string, null for tiktoken), unk
(unknown id or null), eos (word level: the end-of-line id).
"""
import difflib
import glob
import json
import os
import re

import numpy as np
import torch

import utils

MAGIC = 20240520
HEADER_INTS = 256  # header size in int32
TOKEN_DTYPES = {1: np.uint16, 2: np.uint32}
SPLITS = ("train", "val", "test")
# control characters (C0, DEL, C1) but newline and tab: no vocabulary entry may hold one
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class ShardError(ValueError):
    """A shard file that is missing, corrupt or does not fit the model."""


# -----------------------------------------------------------------------------
# reading and writing one shard


def write_shard(path, tokens, vocab_size=None):
    """Write tokens as a .bin shard, atomically (temp file, fsync, rename). uint16 when ids fit."""
    tokens = np.asarray(tokens)
    largest = int(tokens.max()) if tokens.size else 0
    if tokens.size and tokens.min() < 0:
        raise ShardError(f"{path}: negative token id {int(tokens.min())}")
    if vocab_size is not None and largest >= vocab_size:
        raise ShardError(f"{path}: token id {largest} is not below vocab_size {vocab_size}")
    version = 1 if max(largest + 1, vocab_size or 0) <= 2**16 else 2
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, version, tokens.size)
    body = tokens.astype(TOKEN_DTYPES[version], copy=False)

    def write(f):
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(body).data)  # no second copy of a 100M-token shard
    utils.atomic_write(path, write)


def read_shard(path, vocab_size=None):
    """Memory-map a shard after checking its header against the file size. With vocab_size, every
    token is checked to be below it: an id the model cannot embed stops the run at the start."""
    if not os.path.isfile(path):
        raise ShardError(f"{path}: no such shard")
    if path.endswith(".npy"):  # build-nanogpt's shards: plain uint16 arrays
        try:
            tokens = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise ShardError(f"{path}: not a readable .npy shard ({e})") from None
        if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32, np.int32, np.int64):
            raise ShardError(f"{path}: expected a 1-D integer array, "
                             f"got {tokens.dtype} {tokens.shape}")
    else:
        size = os.path.getsize(path)
        if size < HEADER_INTS * 4:
            raise ShardError(f"{path}: {size} bytes is shorter than the "
                             f"{HEADER_INTS * 4}-byte header")
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
        magic, version, count = (int(v) for v in header[:3])
        if magic != MAGIC:
            raise ShardError(f"{path}: wrong magic number {magic} (expected {MAGIC}): "
                             f"not a token shard")
        if version not in TOKEN_DTYPES:
            raise ShardError(f"{path}: unknown shard version {version} "
                             f"(known: {sorted(TOKEN_DTYPES)})")
        dtype = TOKEN_DTYPES[version]
        expected = HEADER_INTS * 4 + count * np.dtype(dtype).itemsize
        if count < 0 or size != expected:
            raise ShardError(f"{path}: header says {count} tokens ({expected} bytes) "
                             f"but the file has {size} bytes: truncated or corrupt")
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(count,))
    if vocab_size is not None and len(tokens):
        largest = int(tokens.max())
        if largest >= vocab_size:
            raise ShardError(f"{path}: token id {largest} is not below vocab_size {vocab_size} "
                             f"(meta.json)")
        if tokens.dtype.kind == "i" and tokens.min() < 0:  # signed .npy shards only
            raise ShardError(f"{path}: negative token id {int(tokens.min())}")
    return tokens


def open_split(data_dir, split, vocab_size, rank, world_size):
    """A loader's shards: paths, lengths, [[name, tokens], ...] (resume compares it). Rank r checks
    the ids of shards r, r + world, ... (not ranks x data); a bad one stops every rank alike."""
    paths = list_shards(data_dir, split)
    lengths = [len(read_shard(p)) for p in paths]  # every header, checked against the file size
    if vocab_size is not None:
        sharded = world_size > 1 and utils.world_size() == world_size
        problem = None
        try:
            for path in paths[rank::world_size] if sharded else paths:
                read_shard(path, vocab_size)
        except ShardError as e:
            problem = str(e)
        problems = [p for p in (utils.all_gather_objects(problem) if sharded else [problem]) if p]
        if problems:
            raise ShardError(problems[0])
    return paths, lengths, [[os.path.basename(p), int(n)] for p, n in zip(paths, lengths)]


def list_shards(data_dir, split):
    """The shards of one split in a folder, sorted by name; a clear error when there are none."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    paths = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"*_{split}_*.bin")) +
                   glob.glob(os.path.join(glob.escape(data_dir), f"*_{split}_*.npy")))
    if paths:
        return paths
    if os.path.isfile(data_dir):
        kind = ("a text file: tokenize it first, e.g. python prepare_wikitext.py "
                f"--text_file={data_dir} --tokenizer=char, and pass the folder it prints"
                if data_dir.endswith(".txt") else "a file, not a folder of shards")
        raise ShardError(f"{data_dir!r} is {kind}")
    if not os.path.isdir(data_dir):
        parent, name = os.path.split(os.path.normpath(data_dir))
        siblings = os.listdir(parent) if os.path.isdir(parent) else []
        near = difflib.get_close_matches(name, siblings, n=3)
        what = (f"there is no folder {data_dir!r}"
                + (f" (did you mean {', '.join(near)}?)" if near else ""))
    else:
        names = sorted(os.listdir(data_dir))
        held = (f"which holds {', '.join(names[:4])}{' ...' * (len(names) > 4)}" if names
                else "an empty folder")
        what = f"no {split} shards (*_{split}_*.bin) in {data_dir!r}, {held}"
    raise ShardError(f"{what}: run prepare_fineweb.py or prepare_wikitext.py first (see README), "
                     "or set --data_dir")


def model_vocab_size(meta):
    """The model's vocabulary for a shard folder's meta.json: its size rounded up to a multiple of
    64 (faster matmuls); llm.c's shards come without meta.json and hold GPT-2 tokens: 50304."""
    return 64 * -(-meta["vocab_size"] // 64) if meta else 50304


def shard_name(data_dir, prefix, split, index):
    return os.path.join(data_dir, f"{prefix}_{split}_{index:06d}.bin")


def write_meta(data_dir, meta):
    utils.atomic_write_json(os.path.join(data_dir, "meta.json"), meta)


def read_meta(data_dir):
    """meta.json of a shard folder, or None if there is none (llm.c's shards). A file that is not
    JSON of the shape write_meta writes ends the script with one line naming it (exit 1)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
        raise SystemExit(f"error: {path}: not a readable JSON file ({e})") from None
    problem = meta_problem(meta)
    if problem:
        raise SystemExit(f"error: {path}: {problem}; prepare the data again "
                         f"(prepare_wikitext.py or prepare_fineweb.py)")
    return meta


def checkpoint_meta(ckpt, path, vocab_size, required=True):
    """The checkpoint's copy of its data's meta.json, checked as read_meta checks one and against the
    model's vocabulary; one line naming `path` when it is unusable or (required) missing."""
    meta = ckpt.get("meta")
    if meta is None and required:
        raise SystemExit(f"error: {path} lacks its tokenizer description (\"meta\", the data's "
                         f"meta.json, which the trainers store in every checkpoint)")
    problem = meta_problem(meta) if meta is not None else None
    if problem is None and meta is not None and meta["vocab_size"] > vocab_size:
        problem = f"vocab_size {meta['vocab_size']} is more than the model's {vocab_size} ids"
    if problem:
        raise SystemExit(f"error: {path}: its tokenizer description (\"meta\") is unusable: {problem}")
    return meta


def meta_problem(meta):
    """What is wrong with the content of a meta.json, or None."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, got a {type(meta).__name__}"
    vocab_size = meta.get("vocab_size")
    if type(vocab_size) is not int or vocab_size < 1:  # bool is no vocabulary size
        return f"vocab_size must be a positive integer, got {vocab_size!r}"
    if not isinstance(meta.get("tokenizer", ""), str):
        return f"tokenizer must be a name, got {meta['tokenizer']!r}"
    itos = meta.get("itos")
    if itos is not None and not (isinstance(itos, list) and all(isinstance(s, str) for s in itos)):
        return "itos must be a list of strings (or null)"
    if itos is not None and len(itos) > vocab_size:
        return f"itos has {len(itos)} entries, more than vocab_size {vocab_size}"
    for k, piece in enumerate(itos or []):  # samples print these: no raw escape sequence
        if CONTROL.search(piece):
            return (f"itos[{k}] = {piece!r} holds a control character "
                    f"(only newline and tab may appear in a vocabulary)")
    for key in ("eot", "unk", "eos"):
        value = meta.get(key)
        if value is not None and (type(value) is not int or not 0 <= value < vocab_size):
            return f"{key} must be a token id below vocab_size {vocab_size} (or null), got {value!r}"
    return None


class ShardWriter:
    """Cuts a stream of token arrays into shards of shard_size tokens (the last one may be shorter).

    Shard k's split is splits[min(k, len(splits) - 1)]: by default shard 0 is val and the rest
    train, as in llm.c. first_index lets a restarted job continue after its last complete shard;
    on_shard(path, used) runs after each shard is written, `used` = its end in add()'s tokens."""

    def __init__(self, data_dir, prefix, shard_size, vocab_size, splits=("val", "train"),
                 first_index=0, on_shard=None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.data_dir, self.prefix, self.shard_size = data_dir, prefix, shard_size
        self.vocab_size, self.splits, self.index = vocab_size, tuple(splits), first_index
        self.on_shard, self.paths = on_shard, []
        self.pending, self.fill = [], 0  # arrays of the shard being filled, their total

    def add(self, tokens):
        """Append a 1-D token array, write every shard it completes; return the paths written."""
        tokens, written, used = np.asarray(tokens), [], 0
        while self.fill + len(tokens) - used >= self.shard_size:
            take = self.shard_size - self.fill
            self.pending.append(tokens[used:used + take])
            used += take
            written.append(self._write())
            if self.on_shard:
                self.on_shard(written[-1], used)
        if used < len(tokens):
            self.pending.append(tokens[used:])
            self.fill += len(tokens) - used
        return written

    def close(self):
        """Write the final partial shard, if any. Returns all paths written by this writer."""
        if self.fill:
            self._write()
        return self.paths

    def _write(self):
        split = self.splits[min(self.index, len(self.splits) - 1)]
        path = shard_name(self.data_dir, self.prefix, split, self.index)
        write_shard(path, np.concatenate(self.pending), self.vocab_size)
        self.pending, self.fill, self.index = [], 0, self.index + 1
        self.paths.append(path)
        return path


def printable(text):
    """Control characters but newline and tab escaped (\\x1b): models can sample escape codes."""
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def tiktoken_encoding(name="gpt2"):
    """tiktoken's encoding, or a clear exit when its BPE files can be neither found nor fetched."""
    import tiktoken
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # offline: requests' ConnectionError deep inside tiktoken
        raise SystemExit(f"error: cannot load tiktoken's {name!r} BPE files ({type(e).__name__}). "
                         f"Offline, copy them from a machine where tiktoken has run "
                         f"(its cache folder) and point TIKTOKEN_CACHE_DIR at them") from None


def encode(text, meta):
    """Text to token ids with the tokenizer a meta.json describes; unknown ones -> meta["unk"]."""
    if meta.get("itos") is None:  # a tiktoken encoding such as gpt2
        return tiktoken_encoding(meta["tokenizer"]).encode_ordinary(text)
    stoi, unk = {s: i for i, s in enumerate(meta["itos"])}, meta.get("unk")
    if meta["tokenizer"] == "char":
        pieces = list(text)
    else:  # word: whitespace-separated words, each line ended by the end-of-line token
        lines = text.split("\n")
        pieces = [w for k, line in enumerate(lines)
                  for w in line.split() + ([None] if k < len(lines) - 1 else [])]
    ids = [meta.get("eos") if p is None else stoi.get(p, unk) for p in pieces]
    return [i for i in ids if i is not None]


def decode(tokens, meta):
    """Token ids back to text with the tokenizer a meta.json describes (tiktoken name, char or word).
    Ids past the table (a model's vocabulary is padded to a multiple of 64) decode as U+FFFD."""
    ids = [int(t) for t in tokens]
    if meta.get("itos") is None:  # a tiktoken encoding such as gpt2
        enc, pieces, run = tiktoken_encoding(meta["tokenizer"]), [], []
        for i in ids:  # runs of real ids decode together (a character can span several tokens)
            if 0 <= i < enc.n_vocab:
                run.append(i)
            else:
                pieces, run = pieces + [enc.decode(run), "\ufffd"], []
        return "".join(pieces) + enc.decode(run)
    itos = meta["itos"]
    symbols = [itos[i] if 0 <= i < len(itos) else "\ufffd" for i in ids]
    if meta["tokenizer"] == "char":
        return "".join(symbols)
    eos, text, line = meta.get("eos"), [], []  # word: words joined by spaces, eos back to "\n"
    for i, symbol in zip(ids, symbols):
        if i == eos:
            text.append(" ".join(line) + "\n")
            line = []
        else:
            line.append(symbol)
    return "".join(text) + " ".join(line)


# -----------------------------------------------------------------------------
# the loaders: the window loader of train_gpt2.py and the stream loader of train_lstm.py


def read_windows(paths, shard_start, starts, T):
    """(x, y) int64 (len(starts), T) CPU tensors: inputs and targets from the T+1 tokens at each
    of `starts`, positions in the split read as one sequence (shard k begins at shard_start[k])."""
    buf = np.empty((len(starts), T + 1), dtype=np.int64)  # widened before it becomes a tensor
    shards = {}  # fresh memmaps per batch keep resident memory flat over a long run
    for row, start in enumerate(starts):
        col = 0
        while col <= T:  # a stream's window can run on into the next shard
            pos = int(start) + col
            s = int(np.searchsorted(shard_start, pos, side="right")) - 1
            if s not in shards:
                shards[s] = read_shard(paths[s])
            local = pos - int(shard_start[s])
            piece = shards[s][local:local + T + 1 - col]
            buf[row, col:col + len(piece)] = piece
            col += len(piece)
    batch = torch.from_numpy(buf)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class WindowLoader:
    """Batches of B windows of T+1 tokens (each at a multiple of T inside one shard), exactly
    resumable: each step the next B * world_size windows of the epoch's order, rank r the r-th B.
    The order is shard by shard, or (shuffle) a permutation of (seed, epoch) that any rank computes
    alone; a remainder short of a global batch is skipped. The state is (epoch, cursor)."""

    def __init__(self, data_dir, split, B, T, rank=0, world_size=1, shuffle=False, seed=1337,
                 vocab_size=None):
        self.paths, lengths, self.shards = open_split(data_dir, split, vocab_size, rank, world_size)
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.shard_start = np.cumsum([0] + lengths)  # global position of each shard's first token
        windows = [max(0, (n - 1) // T) for n in lengths]
        self.first_window = np.cumsum([0] + windows)  # global index of each shard's first window
        self.n_windows = int(self.first_window[-1])
        if self.n_windows < B * world_size:
            raise ShardError(f"{split} split in {data_dir!r} has {sum(lengths)} tokens = "
                             f"{self.n_windows} windows of {T}+1 tokens, fewer than one batch "
                             f"needs (micro_batch_size {B} x world_size {world_size})")
        self.reset()

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor, "shards": self.shards}

    def load_state_dict(self, state):
        self.epoch, self.cursor, self.order = int(state["epoch"]), int(state["cursor"]), None

    def reset(self):
        self.epoch, self.cursor, self.order = 0, 0, None

    def next_batch(self):
        """(x, y) int64 tensors of shape (B, T) on the CPU."""
        global_batch = self.B * self.world_size
        if self.cursor + global_batch > self.n_windows:  # drop the remainder, start the next epoch
            self.epoch, self.cursor, self.order = self.epoch + 1, 0, None
        if self.order is None:  # drawn once per epoch, from (seed, epoch) alone
            rng, n = np.random.default_rng([self.seed, self.epoch]), self.n_windows
            self.order = rng.permutation(n) if self.shuffle else np.arange(n)
        start = self.cursor + self.rank * self.B
        window_ids = self.order[start:start + self.B]
        self.cursor += global_batch
        shard_ids = np.searchsorted(self.first_window, window_ids, side="right") - 1
        starts = self.shard_start[shard_ids] + (window_ids - self.first_window[shard_ids]) * self.T
        return read_windows(self.paths, self.shard_start, starts, self.T)


class StreamLoader:
    """B contiguous streams per rank through one split, for stateful models: the split's n tokens
    cut into B * world_size equal segments, rank r owning streams r*B .. r*B + B-1, each advancing T
    tokens per batch across shards, all restarting at their segment starts when used up."""

    def __init__(self, data_dir, split, B, T, rank=0, world_size=1, vocab_size=None):
        self.paths, lengths, self.shards = open_split(data_dir, split, vocab_size, rank, world_size)
        self.shard_start = np.cumsum([0] + lengths)
        self.B, self.T = B, T
        n_streams = B * world_size
        self.seg_len = int(self.shard_start[-1]) // n_streams
        self.windows = (self.seg_len - 1) // T  # windows of T+1 tokens per segment
        if self.windows < 1:
            raise ShardError(f"{split} split in {data_dir!r} has {int(self.shard_start[-1])} "
                             f"tokens: too few for {n_streams} streams (micro_batch_size {B} x "
                             f"world_size {world_size}) of block_size {T} + 1 tokens")
        self.starts = [s * self.seg_len for s in range(rank * B, (rank + 1) * B)]
        self.window = 0  # next window of every stream

    def state_dict(self):
        return {"window": self.window, "seg_len": self.seg_len, "shards": self.shards}

    def load_state_dict(self, state):
        if int(state["seg_len"]) != self.seg_len:
            raise SystemExit(f"error: the checkpoint's streams are {state['seg_len']} tokens long, "
                             f"these are {self.seg_len}: "
                             f"the data or micro_batch_size x world_size changed")
        self.window = int(state["window"])

    def reset(self):
        self.window = 0

    def next_batch(self):
        """read_windows' (x, y), and whether the streams restarted: the caller zeroes its states."""
        restarted = self.window == self.windows
        if restarted:
            self.window = 0
        starts = [start + self.window * self.T for start in self.starts]
        self.window += 1
        return *read_windows(self.paths, self.shard_start, starts, self.T), restarted
