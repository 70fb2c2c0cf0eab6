"""WikiText-2/-103 (or any text file) -> train / val / test token shards, GPT-2, char or word level.

    python prepare_wikitext.py                              # wikitext-2-raw-v1 from the hub, gpt2
    python prepare_wikitext.py --source=wikitext-103-v1 --tokenizer=word --vocab_words=1000
    python prepare_wikitext.py --data_dir_in=path/to/wikitext-2 --tokenizer=char  # wiki.*.tokens files
    python prepare_wikitext.py --tokenizer=char --text_file=\
https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt

Train splits: wikitext-2 ~11M characters (~2.5M GPT-2 tokens), wikitext-103 ~540M (~125M tokens).
out_dir holds one prepared set: a re-run writes the new set beside it and switches it in at the end
(interrupted, it leaves the old set whole). The last line printed is the --data_dir to train on.

Tokenizers, recorded in meta.json beside the shards so any script can decode (data.decode):
    gpt2  tiktoken GPT-2 BPE, vocab 50257 (no EOT is inserted: the text is one stream; eot 50256)
    char  the sorted characters of the train split, then one unknown id (unk) for unseen ones
    word  whitespace-separated words: the vocab_words most frequent of train (ties: alphabetical),
          then "<unk>" (every other word, and wikitext's own <unk>) and "<eos>" (ending every line,
          empty lines too, as PyTorch's word_language_model does): vocab_words + 2 ids at most.
"""
import array
import collections
import contextlib
import glob
import hashlib
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np

import data
import utils

# -----------------------------------------------------------------------------
# settings (override with --name=value)
source = "wikitext-2-raw-v1"  # Salesforce/wikitext config on the hub (when data_dir_in and text_file are None)
data_dir_in = None  # folder of wiki.{train,valid,test}.tokens / .raw or {train,valid,test}.txt (repo-relative)
text_file = None  # one local text file or http(s) URL: split into train / val by val_fraction
text_sha256 = None  # sha256 of text_file (64 hex digits), checked after reading or downloading
val_fraction = 0.1  # text_file only: the last 10% (cut at a line end) is val; between 0 and 1
tokenizer = "gpt2"  # gpt2 | char | word
vocab_words = 1000  # word tokenizer: number of most frequent train words kept (>= 1)
out_dir = None  # output folder; None = data/{name}_{tokenizer}; relative to the repo folder
prefix = None  # shard name prefix; None = the source's name
shard_size = 100_000_000  # tokens per shard: each split is one shard unless it is bigger
cache_dir = "data/downloads"  # where text_file URLs are saved, relative to the repo folder

HUB_DATASET = "Salesforce/wikitext"  # the hub's wikitext (formerly "wikitext")
SOURCES = ("wikitext-2-raw-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-103-v1")
CHOICES = dict(source=SOURCES, tokenizer=("gpt2", "char", "word"))
LOCAL_NAMES = {"train": ("wiki.train.tokens", "wiki.train.raw", "train.txt"),
               "val": ("wiki.valid.tokens", "wiki.valid.raw", "valid.txt", "val.txt"),
               "test": ("wiki.test.tokens", "wiki.test.raw", "test.txt")}
# what a prepared folder holds; anything else in out_dir is someone else's (a re-run replaces it)
PREPARED_FILE = re.compile(r"meta\.json|.+_(train|val|test)_\d{6}\.(bin|npy)|\.tmp_.*")


def check_settings():
    utils.require(text_file is None or data_dir_in is None,
                  "--text_file and --data_dir_in: give one of them, not both")
    utils.require(text_sha256 is None or text_file is not None,
                  "--text_sha256 checks --text_file: give both")
    utils.require(text_sha256 is None or re.fullmatch(r"[0-9a-fA-F]{64}", str(text_sha256)),
                  f"--text_sha256 must be 64 hex digits, got {text_sha256!r}")
    utils.require(0 < val_fraction < 1, f"--val_fraction must be between 0 and 1, got {val_fraction}")
    utils.require(vocab_words >= 1, f"--vocab_words must be >= 1, got {vocab_words}")
    utils.require(shard_size >= 1, f"--shard_size must be >= 1, got {shard_size}")


# -----------------------------------------------------------------------------
# reading the text of each split


def read_text(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
        check_sha256(path, raw)  # only --text_file can have a --text_sha256
        return raw.decode("utf-8")  # \r\n stays as it is
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read {path} as UTF-8 text: {e}") from None


def fetch(url):
    """Download url once into cache_dir (atomically, checked non-empty); return the local path."""
    name = os.path.basename(urlparse(url).path) or "download.txt"
    path = os.path.join(utils.in_repo(cache_dir), name)
    if not os.path.exists(path):
        import requests
        print(f"downloading {url} -> {path}")
        try:
            response = requests.get(url, timeout=60)
        except requests.RequestException as e:  # offline, DNS, timeout
            raise SystemExit(f"error: cannot download {url} ({type(e).__name__}); "
                             f"offline, pass a local copy: --text_file=path/to/file.txt") from None
        if response.status_code != 200 or not response.content:
            raise SystemExit(f"error: download of {url} failed: HTTP {response.status_code}, "
                             f"{len(response.content)} bytes")
        check_sha256(url, response.content)  # a bad download never enters the cache
        utils.atomic_write(path, lambda f: f.write(response.content))
    return path


def check_sha256(where, content):
    if text_sha256 and hashlib.sha256(content).hexdigest() != text_sha256.lower():
        raise SystemExit(f"error: {where}: sha256 {hashlib.sha256(content).hexdigest()} "
                         f"is not --text_sha256")


def split_text(text, fraction):
    """(train, val): val is the last `fraction` of the text, starting at a line start if one is."""
    cut = int(len(text) * (1 - fraction))
    if cut > 0 and text[cut - 1] != "\n":  # move to the next line start, if it leaves val non-empty
        line_end = text.find("\n", cut)
        cut = line_end + 1 if 0 <= line_end < len(text) - 1 else cut
    return text[:cut], text[cut:]


def load_splits():
    """{split: text} and a short name for the source."""
    if text_file:
        path = fetch(text_file) if text_file.startswith(("http://", "https://")) else text_file
        text = read_text(path)
        train, val = split_text(text, val_fraction)
        if not train or not val:
            raise SystemExit(f"error: {path}: {len(text)} characters is too short "
                             f"to split into train and val")
        return {"train": train, "val": val}, os.path.splitext(os.path.basename(path))[0]
    if data_dir_in:
        folder, found = utils.in_repo(data_dir_in), {}
        for split, names in LOCAL_NAMES.items():
            paths = [p for p in (os.path.join(folder, n) for n in names) if os.path.isfile(p)]
            if paths:
                found[split] = read_text(paths[0])
        if "train" not in found or "val" not in found:
            have = ", ".join(found) or "none"
            raise SystemExit(f"error: {folder}: needs a train and a val file ("
                             f"{' / '.join(LOCAL_NAMES['train'])}; {' / '.join(LOCAL_NAMES['val'])})"
                             f", found splits: {have}. To split one file into train and val "
                             f"instead, use --text_file={os.path.join(folder, 'valid.txt')}")
        return found, os.path.basename(os.path.normpath(data_dir_in))
    import datasets
    try:
        ds = datasets.load_dataset(HUB_DATASET, source)
    except (ConnectionError, OSError, ValueError) as e:  # offline
        raise SystemExit(f"error: cannot load {HUB_DATASET} ({source}) from the Hugging Face hub: "
                         f"{type(e).__name__}: {e}\n  offline, use local files: "
                         f"--data_dir_in=folder/with/wiki.train.tokens or --text_file=path") from None
    # each row is one line with its newline, except the file's blank lines (" \n"), which the hub
    # stores as "": restoring them gives back the wiki.*.tokens / .raw file a local copy reads
    return {s: "".join(line or " \n" for line in ds[hub]["text"])
            for s, hub in (("train", "train"), ("val", "validation"), ("test", "test"))}, source


# -----------------------------------------------------------------------------
# tokenizers: each returns (encode function, meta dict)

# between an ASCII letter and " <letter>", GPT-2's pre-tokenizer always starts a new piece
SAFE_CUT = re.compile(r"(?<=[A-Za-z])(?= [A-Za-z])")


def gpt2_pieces(text, size=1 << 20):
    """Pieces of about `size` characters cut at SAFE_CUT: together they encode as the whole text."""
    pieces, start = [], 0
    while start < len(text):
        match = SAFE_CUT.search(text, start + size) if start + size < len(text) else None
        end = match.start() if match else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def gpt2_tokenizer():
    enc = data.tiktoken_encoding("gpt2")

    def encode(text):  # pieces on all cores (tiktoken releases the GIL), as arrays, not lists
        with ThreadPoolExecutor(os.cpu_count()) as threads:  # no special tokens = encode_ordinary
            ids = list(threads.map(lambda piece: enc.encode_to_numpy(piece, disallowed_special=()),
                                   gpt2_pieces(text)))
        return np.concatenate(ids or [np.zeros(0, np.uint32)]).astype(np.uint16)
    return encode, dict(tokenizer="gpt2", vocab_size=enc.n_vocab, eot=enc.eot_token,
                        itos=None, unk=None)


def char_tokenizer(train):
    chars = sorted(set(train))
    codes = np.array([ord(c) for c in chars], dtype=np.uint32)
    unk = len(chars)

    def encode(text):  # vectorized: code points -> positions in the sorted train set, misses -> unk
        out = []
        for i in range(0, len(text), 1 << 24):  # 16M characters at a time bound the temporaries
            points = np.frombuffer(text[i:i + (1 << 24)].encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(codes, points).clip(max=len(codes) - 1)  # misses caught below
            out.append(np.where(codes[ids] == points, ids, unk).astype(np.int32))
        return np.concatenate(out or [np.zeros(0, np.int32)])
    itos = chars + ["\ufffd"]  # the unknown id decodes as the replacement character
    return encode, dict(tokenizer="char", vocab_size=len(itos), eot=None, itos=itos, unk=unk)


def word_tokenizer(train, k):
    counts = collections.Counter(w for line in train.split("\n") for w in line.split())
    counts.pop("<unk>", None), counts.pop("<eos>", None)  # specials get their own ids below
    words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:k]]
    itos = words + ["<unk>", "<eos>"]
    unk, eos = len(words), len(words) + 1
    stoi = {w: i for i, w in enumerate(words)}

    def encode(text):
        ids = array.array("i")  # 4 bytes per word, not a Python int object each
        lines = text.split("\n")  # at "\n" only: str.splitlines also splits at \x1c, \u2028, ...
        for line in lines[:-1] if lines[-1] == "" else lines:  # no empty last line
            ids.extend([stoi.get(w, unk) for w in line.split()])
            ids.append(eos)
        return np.frombuffer(ids, dtype=np.int32)
    return encode, dict(tokenizer="word", vocab_size=len(itos), eot=None, itos=itos, unk=unk, eos=eos)


# -----------------------------------------------------------------------------
# the job: the output folder is replaced as a whole, so training never reads shards of two runs


def check_out_dir(folder):
    """Refuse an out_dir holding anything but a prepared set, after undoing what a killed run left:
    its {folder}.tmp-<pid> is deleted, the {folder}.old-<pid> it moved aside goes back."""
    for kind in ("old", "tmp"):
        for path in glob.glob(f"{glob.escape(folder)}.{kind}-*"):
            pid = path.rsplit("-", 1)[-1]
            if not pid.isdigit() or utils.process_alive(int(pid)):
                continue
            if kind == "old" and not os.path.lexists(folder):
                os.rename(path, folder)
            else:
                shutil.rmtree(path, ignore_errors=True)
    try:
        names = os.listdir(folder) if os.path.lexists(folder) else []
    except OSError as e:
        utils.bad_setting(f"--out_dir={folder}: {e.strerror or e}")
    others = sorted(n for n in names if not PREPARED_FILE.fullmatch(n))
    utils.require(not others, f"--out_dir={folder} holds files that are not shards or meta.json "
                              f"({', '.join(others[:3])}): a re-run replaces the whole folder, "
                              f"so give it one of its own")


@contextlib.contextmanager
def one_run(folder):
    """One run per out_dir: a second exits 1 naming the first's PID. The lock is .{name}.lock beside
    the folder (which switch() moves), held with flock (released at any exit, kill -9 included)."""
    path = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.lock")
    while True:
        try:
            if not os.path.exists(os.path.dirname(path)):  # data/ in a fresh clone
                os.makedirs(os.path.dirname(path), exist_ok=True)
            handle = open(path, "a+")
        except OSError as e:
            raise SystemExit(f"error: cannot write {path}, the lock of --out_dir={folder}: "
                             f"{e.strerror or e}") from None
        utils.take_lock(handle, lambda pid: f"--out_dir={folder} is in use by another prepare run "
                                            f"(PID {pid}): one run per folder. Wait for it, stop "
                                            f"it, or choose another --out_dir")
        with contextlib.suppress(OSError):  # locked, unless the holder removed the file: retry
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        handle.close()
    handle.truncate(0)
    print(os.getpid(), file=handle, flush=True)
    try:
        yield
    finally:  # removed while still held, so the next run finds no file or a file of its own
        utils.remove_quietly(path)
        handle.close()


def switch(new, folder):
    """Put the complete set `new` in place of `folder`: a reader sees the old set or the new one.
    Killed between the two renames, the run leaves no folder; the next run puts the old set back."""
    old = f"{folder}.old-{os.getpid()}"
    try:
        if os.path.lexists(folder):
            os.rename(folder, old)
        os.rename(new, folder)
    except OSError as e:
        if os.path.lexists(old) and not os.path.lexists(folder):
            os.rename(old, folder)
        raise SystemExit(f"error: cannot replace {folder} with {new}: {e.strerror or e}") from None
    shutil.rmtree(old, ignore_errors=True)


def main(argv):
    settings = utils.apply_overrides(globals(), argv, CHOICES)
    check_settings()
    texts, name = load_splits()
    if not texts["train"]:
        raise SystemExit(f"error: the train split of {name} is empty")
    out = os.path.normpath(utils.in_repo(out_dir or os.path.join("data", f"{name}_{tokenizer}")))
    folder = os.path.realpath(out)  # an out_dir that is a symlink: the set goes where it points
    new, shard_prefix = f"{folder}.tmp-{os.getpid()}", prefix or name  # the set is written in `new`
    with one_run(folder):
        check_out_dir(folder)
        if tokenizer == "gpt2":
            encode, meta = gpt2_tokenizer()
        elif tokenizer == "char":
            encode, meta = char_tokenizer(texts["train"])
        else:
            encode, meta = word_tokenizer(texts["train"], vocab_words)
        try:
            os.makedirs(new)
        except OSError as e:
            raise SystemExit(f"error: cannot create {new}: {e.strerror or e}") from None
        try:  # an error or Ctrl-C leaves nothing half-written; kill -9 leaves `new` to the next run
            counts = {}
            for split, text in texts.items():
                tokens = encode(text)
                writer = data.ShardWriter(new, shard_prefix, shard_size, meta["vocab_size"],
                                          splits=(split,))
                writer.add(tokens)
                counts[split], shards = len(tokens), len(writer.close())
                unk = "" if meta["unk"] is None else f", {(tokens == meta['unk']).sum():,} unknown"
                print(f"{split}: {len(text):,} characters -> {len(tokens):,} tokens in {shards} "
                      f"shard(s){unk}")
            settings.pop("out_dir")  # where the folder is says nothing about what it holds
            meta.update(source=name, tokens=counts, settings=dict(settings, prefix=shard_prefix))
            data.write_meta(new, meta)
            switch(new, folder)
        finally:
            shutil.rmtree(new, ignore_errors=True)
    print(f"wrote {out} (tokenizer {tokenizer}, vocab_size {meta['vocab_size']})")
    trainer = "train_gpt2.py" if tokenizer == "gpt2" else "train_lstm.py"
    also = "" if tokenizer == "gpt2" else " (or train_gpt2.py)"
    print(f"train with: python {trainer} --data_dir={utils.repo_relative(out)}{also}")
    return out, meta


if __name__ == "__main__":
    main(sys.argv[1:])
