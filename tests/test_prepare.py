"""prepare_fineweb.py and prepare_wikitext.py end to end on small local corpora, offline.

References are independent of the scripts: tiktoken called directly, the input text itself.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiktoken

import data
import prepare_fineweb
import prepare_wikitext
from utils import settings_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
enc = tiktoken.get_encoding("gpt2")
EOT = 50256

DOCS = ["Hello world.", "", "A document that quotes <|endoftext|> literally must not raise.",
        "Unicode: naïve café, 東京, emoji 🎉\n\nand blank lines.\n"] + \
       [f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 7) for i in range(60)]


@pytest.fixture
def pf():
    """prepare_fineweb with its settings restored after the test (main() overrides them in place)."""
    saved = settings_of(vars(prepare_fineweb))
    yield prepare_fineweb
    vars(prepare_fineweb).update(saved)


@pytest.fixture
def pw():
    saved = settings_of(vars(prepare_wikitext))
    yield prepare_wikitext
    vars(prepare_wikitext).update(saved)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return str(path)


def expected_stream(docs):
    return np.array([t for d in docs for t in [EOT] + enc.encode_ordinary(d)])


def shard_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".bin"))


def fineweb_args(corpus, out, shard_size=97, **extra):
    args = dict(data_files=corpus, out_dir=str(out), shard_size=shard_size, num_proc=1, **extra)
    return [f"--{k}={v}" for k, v in args.items()]


# -----------------------------------------------------------------------------
# prepare_fineweb.py


def test_fineweb_round_trip(pf, corpus, tmp_path):
    out = tmp_path / "out"
    pf.main(fineweb_args(corpus, out, prefix="fw", batch_size=7))
    names = shard_files(out)
    assert names[0] == "fw_train_000001.bin" and "fw_val_000000.bin" in names  # val is shard 0
    paths = data.list_shards(str(out), "val") + data.list_shards(str(out), "train")
    assert [os.path.basename(p) for p in paths][:2] == ["fw_val_000000.bin", "fw_train_000001.bin"]
    for k, p in enumerate(paths):  # every header valid, every shard but the last exactly shard_size
        magic, version, count = np.fromfile(p, dtype=np.int32, count=3)
        assert (magic, version) == (20240520, 1) and (count == 97 or k == len(paths) - 1)
        data.read_shard(p, vocab_size=50257)
    tokens = np.concatenate([data.read_shard(p) for p in paths])
    expected = expected_stream(DOCS)
    np.testing.assert_array_equal(tokens, expected)  # nothing lost at shard boundaries
    assert sum(tokens[97 * k] != EOT for k in range(1, len(paths))) > 0  # some document was cut
    meta = data.read_meta(str(out))
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"]) == ("gpt2", 50257, 50256)
    assert data.decode(tokens, meta) == "".join("<|endoftext|>" + d for d in DOCS)


def test_fineweb_max_tokens(pf, corpus, tmp_path):
    pf.main(fineweb_args(corpus, tmp_path / "out", max_tokens=250))
    paths = [os.path.join(tmp_path, "out", f) for f in ["local_val_000000.bin", "local_train_000001.bin",
                                                        "local_train_000002.bin"]]
    assert shard_files(tmp_path / "out") == sorted(os.path.basename(p) for p in paths)
    tokens = np.concatenate([data.read_shard(p) for p in paths])
    np.testing.assert_array_equal(tokens, expected_stream(DOCS)[:250])


@pytest.mark.parametrize("batch", [5, 256])  # several batches per shard, or one batch for everything
def test_fineweb_restart_after_interruption_is_byte_identical(pf, corpus, tmp_path, monkeypatch, batch):
    pf.main(fineweb_args(corpus, tmp_path / "whole"))
    real_write, calls = data.write_shard, []

    def dies_on_third_shard(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)
    monkeypatch.setattr(data, "write_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        pf.main(fineweb_args(corpus, tmp_path / "cut", batch_size=batch))
    monkeypatch.undo()
    progress = json.loads((tmp_path / "cut" / "progress.json").read_text())
    assert progress["shards"] == 2 and not progress.get("done")
    assert progress["skip_tokens"] > 0  # the resume point is inside a document
    assert shard_files(tmp_path / "cut") == ["local_train_000001.bin", "local_val_000000.bin"]
    pf.main(fineweb_args(corpus, tmp_path / "cut", batch_size=batch))
    whole = shard_files(tmp_path / "whole")
    assert shard_files(tmp_path / "cut") == whole and len(whole) > 3
    for name in whole + ["meta.json"]:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_fineweb_refuses_changed_settings_and_foreign_shards(pf, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "local_train_000001.bin").write_bytes(b"old")
    with pytest.raises(SystemExit, match="already holds shards"):
        pf.main(fineweb_args(corpus, out))
    os.remove(out / "local_train_000001.bin")
    pf.main(fineweb_args(corpus, out))
    with pytest.raises(SystemExit, match="shard_size"):
        pf.main(fineweb_args(corpus, out, shard_size=98))


def test_fineweb_cli_pool_matches_single_process_and_rerun_does_nothing(pf, corpus, tmp_path):
    pf.main(fineweb_args(corpus, tmp_path / "single"))
    cmd = [sys.executable, os.path.join(REPO, "prepare_fineweb.py"),
           *fineweb_args(corpus, tmp_path / "pool"), "--num_proc=2", "--batch_size=8"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"{len(DOCS)} documents" in first.stdout and "tokens/s" in first.stdout
    for name in shard_files(tmp_path / "single"):
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    before = {f: os.stat(tmp_path / "pool" / f).st_mtime_ns for f in os.listdir(tmp_path / "pool")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert {f: os.stat(tmp_path / "pool" / f).st_mtime_ns for f in os.listdir(tmp_path / "pool")} == before
    bad = subprocess.run(cmd + ["--shard_sise=5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "shard_size" in bad.stderr


def test_fineweb_txt_and_parquet_files(pf, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\n\nstill the first document\n")
    pf.main([f"--data_files={tmp_path}/*.txt", f"--out_dir={tmp_path}/txt", "--num_proc=1"])
    tokens = data.read_shard(data.list_shards(str(tmp_path / "txt"), "val")[0])
    np.testing.assert_array_equal(tokens, expected_stream(["first file\n\nstill the first document\n",
                                                           "second file\n"]))  # one document per file
    pq.write_table(pa.table({"body": DOCS[:5]}), str(tmp_path / "d.parquet"))
    pf.main([f"--data_files={tmp_path}/d.parquet", "--text_column=body", f"--out_dir={tmp_path}/pq",
             "--num_proc=1"])
    np.testing.assert_array_equal(data.read_shard(data.list_shards(str(tmp_path / "pq"), "val")[0]),
                                  expected_stream(DOCS[:5]))


def test_fineweb_local_file_errors(pf, tmp_path):
    with pytest.raises(SystemExit, match="no file matches"):
        pf.main([f"--data_files={tmp_path}/missing*.jsonl", f"--out_dir={tmp_path}/o"])
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(SystemExit, match="no column 'text'.*content"):
        pf.main([f"--data_files={tmp_path}/d.jsonl", f"--out_dir={tmp_path}/o", "--num_proc=1"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n{not json\n")
    with pytest.raises(SystemExit, match="cannot read .*bad.jsonl"):
        pf.main([f"--data_files={tmp_path}/bad.jsonl", f"--out_dir={tmp_path}/o2", "--num_proc=1"])


# -----------------------------------------------------------------------------
# prepare_wikitext.py


@pytest.mark.parametrize("tok", ["gpt2", "char", "word"])
def test_wikitext_valid_txt_end_to_end(pw, tmp_path, tok, shared_dir):
    valid_txt = os.path.join(shared_dir, "data", "wikitext-2", "valid.txt")
    out = tmp_path / tok
    pw.main([f"--text_file={valid_txt}", f"--tokenizer={tok}", f"--out_dir={out}"])
    assert shard_files(out) == ["valid_train_000000.bin", "valid_val_000000.bin"]
    meta = data.read_meta(str(out))
    assert meta["tokenizer"] == tok
    text = open(valid_txt, encoding="utf-8", newline="").read()
    train_text, val_text = pw.split_text(text, 0.1)
    assert train_text + val_text == text and 0.09 < len(val_text) / len(text) < 0.11
    assert train_text.endswith("\n")
    train = data.read_shard(data.list_shards(str(out), "train")[0], vocab_size=meta["vocab_size"])
    val = data.read_shard(data.list_shards(str(out), "val")[0], vocab_size=meta["vocab_size"])
    if tok == "gpt2":
        assert meta["vocab_size"] == 50257 and meta["itos"] is None
        np.testing.assert_array_equal(train, enc.encode_ordinary(train_text))  # one whole-text encode
        assert data.decode(val, meta) == val_text
    elif tok == "char":
        assert meta["itos"][:-1] == sorted(set(train_text)) and meta["unk"] == meta["vocab_size"] - 1
        assert data.decode(train, meta) == train_text
        unseen = set(val_text) - set(train_text)
        assert unseen and data.decode(val, meta) == "".join("\ufffd" if c in unseen else c for c in val_text)
    else:
        assert meta["vocab_size"] == 1002 and meta["itos"][-2:] == ["<unk>", "<eos>"]
        assert len(train) == len(train_text.split()) + train_text.count("\n")
        words = set(meta["itos"][:-2])
        val_lines = val_text.split("\n")[:-1]
        assert data.decode(val, meta) == "".join(
            " ".join(w if w in words else "<unk>" for w in line.split()) + "\n" for line in val_lines)


def test_char_and_word_vocabularies_map_unseen_to_unk(pw):
    encode, meta = pw.char_tokenizer("hello world")
    assert meta["itos"][:-1] == [" ", "d", "e", "h", "l", "o", "r", "w"] and meta["unk"] == 8
    assert encode("held!ü").tolist() == [3, 2, 4, 1, 8, 8]
    encode, meta = pw.word_tokenizer("b a c\nc b\n<unk> <unk> <unk> d\n", 2)  # counts: b 2, c 2, a 1, d 1
    assert meta["itos"] == ["b", "c", "<unk>", "<eos>"]  # ties alphabetical; wikitext's <unk> is no word
    assert encode("a b\n\nc zebra <unk>\n").tolist() == [2, 0, 3, 3, 1, 2, 2, 3]


def test_gpt2_pieces_encode_like_the_whole_text(pw, shared_dir):
    text = open(os.path.join(shared_dir, "data", "tinyshakespeare.txt"), encoding="utf-8").read()[:200_000]
    pieces = pw.gpt2_pieces(text, size=500)
    assert len(pieces) > 100 and "".join(pieces) == text
    assert [t for p in enc.encode_ordinary_batch(pieces) for t in p] == enc.encode_ordinary(text)


def test_wikitext_local_folder(pw, tmp_path, shared_dir, monkeypatch):
    src = tmp_path / "wt"
    src.mkdir()
    for split, text in [("train", " = A = \n the cat sat \n"), ("valid", " the dog \n"),
                        ("test", " a cat \n")]:
        (src / f"wiki.{split}.tokens").write_text(text)
    monkeypatch.setattr(pw, "_here", str(tmp_path))  # the default out_dir is relative to the script
    pw.main([f"--data_dir_in={src}", "--tokenizer=word", "--vocab_words=3"])
    out = str(tmp_path / "data" / "wt_word")  # data/{name}_{tokenizer}
    meta = data.read_meta(out)
    assert meta["itos"] == ["=", "A", "cat", "<unk>", "<eos>"]  # ties alphabetical
    assert data.read_shard(data.list_shards(out, "test")[0]).tolist() == [3, 2, 4]
    assert data.read_shard(data.list_shards(out, "val")[0]).tolist() == [3, 3, 4]
    only_valid_and_test = os.path.join(shared_dir, "data", "wikitext-2")
    with pytest.raises(SystemExit, match="found splits: val, test.*--text_file="):
        pw.main([f"--data_dir_in={only_valid_and_test}", f"--out_dir={tmp_path}/x"])


def test_text_file_url_is_fetched_once(pw, tmp_path, monkeypatch):
    import requests
    calls = []

    class Response:
        status_code, content = 200, ("line one\n" * 50 + "line two\n" * 10).encode()
    monkeypatch.setattr(requests, "get", lambda url, timeout: calls.append(url) or Response)
    args = ["--text_file=https://example.org/corpus/input.txt", f"--cache_dir={tmp_path}/cache",
            "--tokenizer=char", f"--out_dir={tmp_path}/out"]
    pw.main(args)
    pw.main(args)
    assert calls == ["https://example.org/corpus/input.txt"]
    assert (tmp_path / "cache" / "input.txt").read_bytes() == Response.content
    meta = data.read_meta(str(tmp_path / "out"))
    val = data.read_shard(data.list_shards(str(tmp_path / "out"), "val")[0])
    assert data.decode(val, meta) == "line two\n" * 6
    Response.content = b""
    with pytest.raises(SystemExit, match="failed"):
        pw.main(["--text_file=https://example.org/empty.txt", f"--cache_dir={tmp_path}/cache"])
    Response.content = b"tampered\n" * 10
    with pytest.raises(SystemExit, match="is not --text_sha256"):
        pw.main(["--text_file=https://example.org/other.txt", "--text_sha256=" + "ab" * 32])
    assert not (tmp_path / "cache" / "other.txt").exists()  # nothing cached from a bad download
    good = hashlib.sha256((tmp_path / "cache" / "input.txt").read_bytes()).hexdigest()
    pw.main(args + [f"--text_sha256={good}"])  # the cached file checks out
