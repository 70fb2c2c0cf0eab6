"""Test setup: the repo root on sys.path, offline GPT-2 BPE files, and the shared test corpora."""
import os
import sys

import pytest

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
