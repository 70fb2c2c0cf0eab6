"""Test setup: the repo root on sys.path, offline GPT-2 BPE files, and the shared test corpora."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
sys.path.insert(0, REPO)
# tiktoken reads the GPT-2 BPE files from here instead of downloading them
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))


@pytest.fixture
def repo_dir():
    return REPO


@pytest.fixture
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip("../shared (test corpora) is not beside the repo")
    return SHARED


@pytest.fixture
def one_thread():
    """Tiny models in-process: thread start-up and oversubscription of 2 busy cores cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
