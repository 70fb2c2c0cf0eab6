"""WikiText-2 / WikiText-103 (or any text file) -> train / val / test token shards, GPT-2, char or word level.

    python prepare_wikitext.py                                          # wikitext-2-raw-v1 from the hub, gpt2
    python prepare_wikitext.py --source=wikitext-103-v1 --tokenizer=word --vocab_words=1000
    python prepare_wikitext.py --data_dir_in=path/to/wikitext-2 --tokenizer=char  # wiki.*.tokens files
    python prepare_wikitext.py --tokenizer=char --text_file=\
https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt

Sources: the hub's wikitext configs wikitext-2-raw-v1, wikitext-2-v1, wikitext-103-raw-v1, wikitext-103-v1;
a local folder (wiki.{train,valid,test}.{tokens,raw} or {train,valid,test}.txt); or one text file (or
http(s) URL, downloaded once into cache_dir) whose last val_fraction becomes val (cut at a line end).

Tokenizers, recorded in meta.json beside the shards so any script can decode (data.decode):
    gpt2  tiktoken GPT-2 BPE, vocab 50257 (no EOT is inserted: the text is one stream; meta eot = 50256)
    char  the sorted characters of the train split, then one unknown id (unk) for characters unseen in train
    word  whitespace-separated words: the vocab_words most frequent of train (ties: alphabetical), then
          "<unk>" (every other word, and wikitext's own <unk>) and "<eos>" (one at the end of every line,
          empty lines too, as PyTorch's word_language_model does). vocab_size <= vocab_words + 2.
"""
import array
import collections
import glob
import hashlib
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np

import data
from utils import apply_overrides, atomic_write

_here = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings (override with --name=value)
source = "wikitext-2-raw-v1"  # hub config of Salesforce/wikitext (when data_dir_in and text_file are None)
data_dir_in = None  # local folder with wiki.{train,valid,test}.tokens / .raw or {train,valid,test}.txt
text_file = None  # one local text file or http(s) URL: split into train / val by val_fraction
text_sha256 = None  # optional sha256 of text_file (hex), checked after reading or downloading
val_fraction = 0.1  # text_file only: the last 10% (cut at the next line end) is val
tokenizer = "gpt2"  # gpt2 | char | word
vocab_words = 1000  # word tokenizer: number of most frequent train words kept
out_dir = None  # output folder; None = data/{name}_{tokenizer}, relative to this script's folder
prefix = None  # shard name prefix; None = the source's name
shard_size = 100_000_000  # tokens per shard: each split is one shard unless it is bigger
cache_dir = "data/downloads"  # where text_file URLs are saved, relative to this script's folder

hub_dataset = "Salesforce/wikitext"  # the hub's wikitext (formerly "wikitext")
hub_sources = ("wikitext-2-raw-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-103-v1")
local_names = {"train": ("wiki.train.tokens", "wiki.train.raw", "train.txt"),
               "val": ("wiki.valid.tokens", "wiki.valid.raw", "valid.txt", "val.txt"),
               "test": ("wiki.test.tokens", "wiki.test.raw", "test.txt")}


# -----------------------------------------------------------------------------
# reading the text of each split


def read_text(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as it is
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read {path} as UTF-8 text: {e}")


def fetch(url):
    """Download url once into cache_dir (atomically, checked non-empty); return the local path."""
    path = os.path.join(_here, cache_dir, os.path.basename(urlparse(url).path) or "download.txt")
    if not os.path.exists(path):
        import requests
        print(f"downloading {url} -> {path}")
        try:
            response = requests.get(url, timeout=60)
        except requests.RequestException as e:  # offline, DNS, timeout
            raise SystemExit(f"cannot download {url} ({type(e).__name__}); offline, pass a local copy: "
                             f"--text_file=path/to/file.txt") from None
        if response.status_code != 200 or not response.content:
            raise SystemExit(f"download of {url} failed: HTTP {response.status_code}, "
                             f"{len(response.content)} bytes")
        check_sha256(url, response.content)  # a bad download never enters the cache
        atomic_write(path, lambda f: f.write(response.content))
    return path


def check_sha256(where, content):
    if text_sha256 and hashlib.sha256(content).hexdigest() != text_sha256.lower():
        raise SystemExit(f"{where}: sha256 {hashlib.sha256(content).hexdigest()} is not --text_sha256")


def split_text(text, fraction):
    """(train, val): val is the last `fraction` of the text, starting at a line start when there is one."""
    if not 0 < fraction < 1:
        raise SystemExit(f"--val_fraction must be between 0 and 1, got {fraction}")
    cut = int(len(text) * (1 - fraction))
    if cut > 0 and text[cut - 1] != "\n":  # move to the next line start, if it leaves val non-empty
        line_end = text.find("\n", cut)
        cut = line_end + 1 if 0 <= line_end < len(text) - 1 else cut
    return text[:cut], text[cut:]


def load_splits():
    """{split: text} and a short name for the source."""
    if text_file:
        path = fetch(text_file) if text_file.startswith(("http://", "https://")) else text_file
        if text_sha256:
            with open(path, "rb") as f:
                check_sha256(path, f.read())
        text = read_text(path)
        train, val = split_text(text, val_fraction)
        if not train or not val:
            raise SystemExit(f"{path}: {len(text)} characters is too short to split into train and val")
        return {"train": train, "val": val}, os.path.splitext(os.path.basename(path))[0]
    if data_dir_in:
        found = {}
        for split, names in local_names.items():
            paths = [os.path.join(data_dir_in, n) for n in names]
            paths = [p for p in paths if os.path.isfile(p)]
            if paths:
                found[split] = read_text(paths[0])
        if "train" not in found or "val" not in found:
            have = ", ".join(found) or "none"
            raise SystemExit(f"{data_dir_in}: needs a train and a val file ("
                             f"{' / '.join(local_names['train'])}; {' / '.join(local_names['val'])}), "
                             f"found splits: {have}. To split one file into train and val instead, use "
                             f"--text_file={os.path.join(data_dir_in, 'valid.txt')}")
        return found, os.path.basename(os.path.normpath(data_dir_in))
    if source not in hub_sources:
        raise SystemExit(f"--source must be one of {hub_sources}, got {source!r}")
    import datasets
    try:
        ds = datasets.load_dataset(hub_dataset, source)
    except (ConnectionError, OSError, ValueError) as e:  # offline
        raise SystemExit(f"cannot load {hub_dataset} ({source}) from the Hugging Face hub: {type(e).__name__}: {e}\n"
                         f"  offline, use local files: --data_dir_in=folder/with/wiki.train.tokens or "
                         f"--text_file=path") from None
    # each row is one line with its newline, except the file's blank lines (" \n"), which the hub stores
    # as "": restoring them gives back the original wiki.*.tokens / .raw file, as a local copy reads
    return {s: "".join(line or " \n" for line in ds[hub]["text"])
            for s, hub in (("train", "train"), ("val", "validation"), ("test", "test"))}, source


# -----------------------------------------------------------------------------
# tokenizers: each returns (encode function, meta dict)

# Cut points for encoding a long text in pieces with exactly the tokens of one whole-text encode: between
# an ASCII letter and " <letter>", GPT-2's pre-tokenizer always ends one piece and starts the next.
SAFE_CUT = re.compile(r"(?<=[A-Za-z])(?= [A-Za-z])")


def gpt2_pieces(text, size=1 << 20):
    """The text in pieces of about `size` characters, cut only at SAFE_CUT points."""
    pieces, start = [], 0
    while start < len(text):
        match = SAFE_CUT.search(text, start + size) if start + size < len(text) else None
        end = match.start() if match else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def gpt2_tokenizer(train):
    enc = data.tiktoken_encoding("gpt2")

    def encode(text):  # pieces encoded on all cores (tiktoken releases the GIL), as arrays, not lists
        with ThreadPoolExecutor(os.cpu_count()) as threads:  # no special tokens = encode_ordinary
            ids = list(threads.map(lambda piece: enc.encode_to_numpy(piece, disallowed_special=()),
                                   gpt2_pieces(text)))
        return np.concatenate(ids or [np.zeros(0, np.uint32)]).astype(np.uint16)
    return encode, dict(tokenizer="gpt2", vocab_size=enc.n_vocab, eot=enc.eot_token, itos=None, unk=None)


def char_tokenizer(train):
    chars = sorted(set(train))
    codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted code points of the train set
    unk = len(chars)

    def encode(text):  # vectorized: code points -> positions in the sorted train set, misses -> unk
        out = []
        for i in range(0, len(text), 1 << 24):  # 16M characters at a time bounds the temporary arrays
            points = np.frombuffer(text[i:i + (1 << 24)].encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(codes, points)
            ids[ids == len(codes)] = 0  # past the end: a miss, caught by the comparison below
            out.append(np.where(codes[ids] == points, ids, unk).astype(np.int32))
        return np.concatenate(out or [np.zeros(0, np.int32)])
    itos = chars + ["\ufffd"]  # the unknown id decodes as the replacement character
    return encode, dict(tokenizer="char", vocab_size=len(itos), eot=None, itos=itos, unk=unk)


def word_tokenizer(train, k):
    counts = collections.Counter(w for line in lines(train) for w in line.split())
    counts.pop("<unk>", None), counts.pop("<eos>", None)  # specials get their own ids below
    words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:k]]
    itos = words + ["<unk>", "<eos>"]
    unk, eos = len(words), len(words) + 1
    stoi = {w: i for i, w in enumerate(words)}

    def encode(text):
        ids = array.array("i")  # 4 bytes per word, not a Python int object each
        for line in lines(text):
            ids.extend([stoi.get(w, unk) for w in line.split()])
            ids.append(eos)
        return np.frombuffer(ids, dtype=np.int32)
    return encode, dict(tokenizer="word", vocab_size=len(itos), eot=None, itos=itos, unk=unk, eos=eos)


def lines(text):
    """Lines split at "\\n" only (str.splitlines also splits at \\x1c, \\u2028, ...); no empty last line."""
    parts = text.split("\n")
    return parts[:-1] if parts and parts[-1] == "" else parts


def make_tokenizer(train):
    if tokenizer == "gpt2":
        return gpt2_tokenizer(train)
    if tokenizer == "char":
        return char_tokenizer(train)
    if tokenizer == "word":
        if vocab_words < 1:
            raise SystemExit(f"--vocab_words must be >= 1, got {vocab_words}")
        return word_tokenizer(train, vocab_words)
    raise SystemExit(f"--tokenizer must be gpt2, char or word, got {tokenizer!r}")


# -----------------------------------------------------------------------------
# the job


def main(argv):
    global out_dir, prefix
    apply_overrides(globals(), argv)
    texts, name = load_splits()
    if not texts["train"]:
        raise SystemExit(f"the train split of {name} is empty")
    encode, meta = make_tokenizer(texts["train"])
    out_dir = os.path.join(_here, out_dir or os.path.join("data", f"{name}_{tokenizer}"))
    prefix = prefix or name
    counts = {}
    for split, text in texts.items():
        tokens = encode(text)
        writer = data.ShardWriter(out_dir, prefix, shard_size, meta["vocab_size"], splits=(split,))
        writer.add(tokens)
        paths = writer.close()
        for stale in set(glob.glob(os.path.join(out_dir, f"{prefix}_{split}_*.bin"))) - set(paths):
            os.remove(stale)  # left by an earlier run with a smaller shard_size
        counts[split] = len(tokens)
        unknown = int((tokens == meta["unk"]).sum()) if meta["unk"] is not None else 0
        print(f"{split}: {len(text):,} characters -> {len(tokens):,} tokens in {len(paths)} shard(s)"
              + (f", {unknown:,} unknown" if meta["unk"] is not None else ""))
    meta.update(source=name, tokens=counts)
    data.write_meta(out_dir, meta)
    print(f"wrote {out_dir} (tokenizer {tokenizer}, vocab_size {meta['vocab_size']})")
    return out_dir, meta


if __name__ == "__main__":
    main(sys.argv[1:])

# Expected sizes, estimated from wikitext-2's valid.txt (1.12M characters -> 0.26M GPT-2 tokens):
# wikitext-2 train ~11M characters ~2.5M GPT-2 tokens (one shard per split with any tokenizer);
# wikitext-103 train ~540M characters ~125M GPT-2 tokens (2 gpt2 shards, 6 char shards of 100M).
