"""Test set-up: the repo root on sys.path, the tests' own char-level corpus, and the optional extras.

The tests need nothing beside the repo. Two things only add coverage when present: the GPT-2 BPE files
(tiktoken downloads them online, or reads them from TIKTOKEN_CACHE_DIR; tests that need them skip with a
reason otherwise) and ../shared, a folder of real corpora beside the repo on the project's own machines.
"""
import os
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402  (tests/corpus.py, after the path is set)
import data  # noqa: E402


@pytest.fixture
def repo_dir():
    return REPO


@pytest.fixture
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip("../shared (real corpora, only on the project's machines) is not beside the repo")
    return SHARED


@pytest.fixture(scope="session")
def gpt2_enc():
    """tiktoken's GPT-2 encoding, or a skip when its BPE files can be neither downloaded nor found."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with no TIKTOKEN_CACHE_DIR: requests' ConnectionError inside tiktoken
        pytest.skip(f"GPT-2 BPE files unavailable offline ({type(e).__name__}); set TIKTOKEN_CACHE_DIR")


def write_char_shards(folder, text, prefix="play"):
    """Char-level shards of `text`: the first 90% train, the last 10% val (as nanoGPT), and meta.json."""
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    tokens = np.array([stoi[c] for c in text], dtype=np.uint16)
    split = int(0.9 * len(tokens))
    data.write_shard(data.shard_name(folder, prefix, "train", 0), tokens[:split], len(itos))
    data.write_shard(data.shard_name(folder, prefix, "val", 0), tokens[split:], len(itos))
    data.write_meta(folder, {"tokenizer": "char", "vocab_size": len(itos), "itos": itos, "unk": None, "eot": None})
    return str(folder)


@pytest.fixture(scope="session")
def char_shards(tmp_path_factory):
    """Char-level shards of the tests' own 300k-character play (tests/corpus.py), shared by the session."""
    return write_char_shards(tmp_path_factory.mktemp("play_char"), corpus.play(300_000))


@pytest.fixture
def one_thread():
    """Tiny models in-process: thread start-up and oversubscription of 2 busy cores cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
