"""prepare_fineweb.py and prepare_wikitext.py end to end on small local corpora, offline.

References are independent of the scripts: tiktoken called directly, the input text itself. Only the tests
that tokenize with GPT-2 BPE take the gpt2_enc fixture (and skip without its files).
"""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data
import prepare_fineweb
import prepare_wikitext
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 50256

DOCS = ["Hello world.", "", "A document that quotes <|endoftext|> literally must not raise.",
        "Unicode: naïve café, 東京, emoji 🎉\n\nand blank lines.\n"] + \
       [f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 7) for i in range(60)]


@pytest.fixture
def pf():
    """prepare_fineweb with its settings restored after the test (main() overrides them in place)."""
    saved = utils.settings_of(vars(prepare_fineweb))
    yield prepare_fineweb
    vars(prepare_fineweb).update(saved)


@pytest.fixture
def pw():
    saved = utils.settings_of(vars(prepare_wikitext))
    yield prepare_wikitext
    vars(prepare_wikitext).update(saved)


@pytest.fixture
def docs_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return str(path)


def expected_stream(enc, docs):
    return np.array([t for d in docs for t in [EOT] + enc.encode_ordinary(d)])


def shard_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".bin"))


def fineweb_args(docs, out, shard_size=97, **extra):
    args = dict(data_files=docs, out_dir=str(out), shard_size=shard_size, num_proc=1, **extra)
    return [f"--{k}={v}" for k, v in args.items()]


def exits(main, argv, capsys):
    """(exit status, stderr) of main(argv), which must end in SystemExit."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    return (code if isinstance(code, int) else 1), (capsys.readouterr().err + (code if isinstance(code, str) else ""))


def snapshot(folder):
    """{file name: bytes} of a folder: two prepared sets are the same set exactly when these are equal."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def copy_of_the_repo(folder, script):
    """`script` and the modules it imports, copied into `folder`: a repo folder of its own, so that a run
    writes its repo-relative folders there and not into this checkout."""
    folder.mkdir()
    for name in ("utils.py", "data.py", script):
        shutil.copy(os.path.join(REPO, name), folder)
    return folder


# -----------------------------------------------------------------------------
# prepare_fineweb.py


def test_fineweb_round_trip(pf, docs_jsonl, tmp_path, gpt2_enc, capsys):
    out = tmp_path / "out"
    pf.main(fineweb_args(docs_jsonl, out, prefix="fw", batch_size=7))
    names = shard_files(out)
    assert names[0] == "fw_train_000001.bin" and "fw_val_000000.bin" in names  # val is shard 0
    paths = data.list_shards(str(out), "val") + data.list_shards(str(out), "train")
    assert [os.path.basename(p) for p in paths][:2] == ["fw_val_000000.bin", "fw_train_000001.bin"]
    for k, p in enumerate(paths):  # every header valid, every shard but the last exactly shard_size
        magic, version, count = np.fromfile(p, dtype=np.int32, count=3)
        assert (magic, version) == (20240520, 1) and (count == 97 or k == len(paths) - 1)
        data.read_shard(p, vocab_size=50257)
    tokens = np.concatenate([data.read_shard(p) for p in paths])
    expected = expected_stream(gpt2_enc, DOCS)
    np.testing.assert_array_equal(tokens, expected)  # nothing lost at shard boundaries
    assert sum(tokens[97 * k] != EOT for k in range(1, len(paths))) > 0  # some document was cut
    meta = data.read_meta(str(out))
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"]) == ("gpt2", 50257, 50256)
    assert data.decode(tokens, meta) == "".join("<|endoftext|>" + d for d in DOCS)
    assert capsys.readouterr().out.splitlines()[-1] == f"train with: python train_gpt2.py --data_dir={out}"


def test_fineweb_max_tokens(pf, docs_jsonl, tmp_path, gpt2_enc):
    pf.main(fineweb_args(docs_jsonl, tmp_path / "out", max_tokens=250))
    paths = [os.path.join(tmp_path, "out", f) for f in ["local_val_000000.bin", "local_train_000001.bin",
                                                        "local_train_000002.bin"]]
    assert shard_files(tmp_path / "out") == sorted(os.path.basename(p) for p in paths)
    tokens = np.concatenate([data.read_shard(p) for p in paths])
    np.testing.assert_array_equal(tokens, expected_stream(gpt2_enc, DOCS)[:250])


def interrupt_at_the_third_shard(pf, monkeypatch, args):
    """prepare_fineweb.py run with `args`, Ctrl-C'd as it writes its third shard: one line, then exit."""
    real_write, calls = data.write_shard, []

    def dies_on_third_shard(*a, **kw):
        calls.append(a[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(*a, **kw)
    monkeypatch.setattr(data, "write_shard", dies_on_third_shard)
    with pytest.raises(SystemExit, match="interrupted: rerun the same command"):
        pf.main(args)
    monkeypatch.undo()


@pytest.mark.parametrize("batch", [5, 256])  # several batches per shard, or one batch for everything
def test_fineweb_restart_after_interruption_is_byte_identical(pf, docs_jsonl, tmp_path, monkeypatch, batch,
                                                              gpt2_enc):
    pf.main(fineweb_args(docs_jsonl, tmp_path / "whole"))
    interrupt_at_the_third_shard(pf, monkeypatch, fineweb_args(docs_jsonl, tmp_path / "cut", batch_size=batch))
    progress = json.loads((tmp_path / "cut" / "progress.json").read_text())
    assert progress["shards"] == 2 and not progress.get("done")
    assert progress["skip_tokens"] > 0  # the resume point is inside a document
    assert shard_files(tmp_path / "cut") == ["local_train_000001.bin", "local_val_000000.bin"]
    pf.main(fineweb_args(docs_jsonl, tmp_path / "cut", batch_size=batch))
    whole = shard_files(tmp_path / "whole")
    assert shard_files(tmp_path / "cut") == whole and len(whole) > 3
    for name in whole + ["meta.json"]:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_fineweb_resume_refuses_changed_input_files(pf, tmp_path, monkeypatch, gpt2_enc):
    """A resumed run skips by count the documents its shards hold: with a file added to, removed from or changed
    among those --data_files matches it would skip the wrong ones. It stops naming the file, writing nothing;
    with the files as they were it goes on."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    for name, docs in (("a", DOCS[:30]), ("c", DOCS[30:])):
        (corpus / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    args = fineweb_args(f"{corpus}/*.jsonl", out)
    interrupt_at_the_third_shard(pf, monkeypatch, args)
    cut = snapshot(out)

    def refused(change):
        with pytest.raises(SystemExit, match=rf"^error: .*{change}.* Rerun with the same files, or delete {out} "):
            pf.main(args)
        assert snapshot(out) == cut
    (corpus / "b.jsonl").write_text(json.dumps({"text": "a document added later"}) + "\n")
    refused(f"{corpus}/b.jsonl added")
    os.remove(corpus / "b.jsonl")
    c, text, when = corpus / "c.jsonl", (corpus / "c.jsonl").read_text(), os.stat(corpus / "c.jsonl")
    c.write_text(text + json.dumps({"text": "one more"}) + "\n")
    refused(f"{c} changed")
    c.write_text(text)
    os.utime(c, ns=(when.st_atime_ns, when.st_mtime_ns))
    os.rename(corpus / "a.jsonl", tmp_path / "a.jsonl")
    refused(f"{corpus}/a.jsonl removed")
    os.rename(tmp_path / "a.jsonl", corpus / "a.jsonl")
    pf.main(args)  # the files as they were: the job goes on
    paths = data.list_shards(str(out), "val") + data.list_shards(str(out), "train")
    np.testing.assert_array_equal(np.concatenate([data.read_shard(p) for p in paths]), expected_stream(gpt2_enc, DOCS))


def test_fineweb_refuses_changed_settings_foreign_shards_and_a_damaged_sidecar(pf, docs_jsonl, tmp_path, gpt2_enc):
    out = tmp_path / "out"
    out.mkdir()
    (out / "local_train_000001.bin").write_bytes(b"old")
    with pytest.raises(SystemExit, match="already holds shards"):
        pf.main(fineweb_args(docs_jsonl, out))
    os.remove(out / "local_train_000001.bin")
    pf.main(fineweb_args(docs_jsonl, out))
    with pytest.raises(SystemExit, match="shard_size"):
        pf.main(fineweb_args(docs_jsonl, out, shard_size=98))
    for damaged in ("{not json", "[1, 2]", '{"settings": 5}'):
        (out / "progress.json").write_text(damaged)
        with pytest.raises(SystemExit, match=r"^error: .*progress.json is not a readable progress file"):
            pf.main(fineweb_args(docs_jsonl, out))


def test_fineweb_refuses_a_folder_of_another_job(pf, docs_jsonl, tmp_path, capsys):
    """Shards of any prefix, or a meta.json, with no progress.json of this job are another job's (a loader
    would read them together with this one's): refused, naming them and the two ways on, nothing touched."""
    out = tmp_path / "out"
    data.write_shard(data.shard_name(str(out), "play", "train", 0), np.arange(50), 60)
    data.write_shard(data.shard_name(str(out), "play", "val", 0), np.arange(10), 60)
    data.write_meta(str(out), {"tokenizer": "char", "vocab_size": 60, "itos": None, "unk": None, "eot": None})
    before = snapshot(out)
    for there in ["play_train_000000.bin", "meta.json"]:
        code, err = exits(pf.main, fineweb_args(docs_jsonl, out), capsys)
        assert code == 1 and err.startswith(f"error: {out} ") and there in err
        assert "--out_dir" in err and f"delete {out} " in err
        assert snapshot(out) == before
        for name in shard_files(out):  # then a meta.json alone
            os.remove(out / name)
            del before[name]


def test_fineweb_refuses_another_jobs_shards_beside_its_own(pf, docs_jsonl, tmp_path, capsys, gpt2_enc):
    out = tmp_path / "out"
    pf.main(fineweb_args(docs_jsonl, out))
    data.write_shard(data.shard_name(str(out), "other", "train", 1), np.arange(50), 60)
    before = snapshot(out)
    code, err = exits(pf.main, fineweb_args(docs_jsonl, out), capsys)
    assert code == 1 and "other_train_000001.bin" in err and "--out_dir" in err and f"delete {out} " in err
    assert snapshot(out) == before


def test_fineweb_cli_pool_matches_single_process_and_rerun_does_nothing(pf, docs_jsonl, tmp_path, gpt2_enc):
    pf.main(fineweb_args(docs_jsonl, tmp_path / "single"))
    cmd = [sys.executable, os.path.join(REPO, "prepare_fineweb.py"),
           *fineweb_args(docs_jsonl, tmp_path / "pool"), "--num_proc=2", "--batch_size=8"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"{len(DOCS)} documents" in first.stdout and "tokens/s" in first.stdout
    for name in shard_files(tmp_path / "single"):
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    before = {f: os.stat(tmp_path / "pool" / f).st_mtime_ns for f in os.listdir(tmp_path / "pool")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert again.stdout.splitlines()[-1] == f"train with: python train_gpt2.py --data_dir={tmp_path / 'pool'}"
    assert {f: os.stat(tmp_path / "pool" / f).st_mtime_ns for f in os.listdir(tmp_path / "pool")} == before
    bad = subprocess.run(cmd + ["--shard_sise=5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "shard_size" in bad.stderr


def test_fineweb_one_run_per_out_dir(pf, docs_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    # another run holds the folder: this test process (flock conflicts within one process too)
    holder = utils.lock_folder(str(out), "prepare run")
    try:
        code, err = exits(pf.main, fineweb_args(docs_jsonl, out), capsys)
    finally:
        holder.close()
    line = err.strip().splitlines()[-1]
    assert code == 1 and line.startswith("error: ") and f"PID {os.getpid()}" in line
    assert os.listdir(out) == [".lock"]  # nothing written into the other run's folder


def test_fineweb_run_that_wrote_the_folder_meanwhile_is_not_overwritten(pf, docs_jsonl, tmp_path, monkeypatch,
                                                                        gpt2_enc):
    """Another run finished the same job in out_dir while this one was reading its first documents:
    this one stops rather than writing its shards over the other's."""
    pf.main(fineweb_args(docs_jsonl, tmp_path / "other"))
    finished = snapshot(tmp_path / "other")
    out, real = tmp_path / "out", pf.documents

    def the_other_run_meanwhile(skip=0):
        batches = real(skip)
        shutil.copytree(tmp_path / "other", out)
        return batches
    monkeypatch.setattr(pf, "documents", the_other_run_meanwhile)
    with pytest.raises(SystemExit, match="another prepare run wrote"):
        pf.main(fineweb_args(docs_jsonl, out))
    assert snapshot(out) == finished


def test_fineweb_finished_run_says_what_prepares_it_again(pf, docs_jsonl, tmp_path, capsys, gpt2_enc):
    out = tmp_path / "out"
    pf.main(fineweb_args(docs_jsonl, out))
    capsys.readouterr()
    pf.main(fineweb_args(docs_jsonl, out))
    line = next(line for line in capsys.readouterr().out.splitlines() if "nothing to do" in line)
    # deleting only progress.json leaves shards without it, which a run refuses
    assert "progress.json" not in line and f"delete {out} " in line
    shutil.rmtree(out)  # as it says
    pf.main(fineweb_args(docs_jsonl, out))
    assert "nothing to do" not in capsys.readouterr().out and data.list_shards(str(out), "train")


def test_fineweb_txt_and_parquet_files(pf, tmp_path, gpt2_enc):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\n\nstill the first document\n")
    pf.main([f"--data_files={tmp_path}/*.txt", f"--out_dir={tmp_path}/txt", "--num_proc=1"])
    tokens = data.read_shard(data.list_shards(str(tmp_path / "txt"), "val")[0])
    np.testing.assert_array_equal(tokens, expected_stream(gpt2_enc, ["first file\n\nstill the first document\n",
                                                                     "second file\n"]))  # one document per file
    pq.write_table(pa.table({"body": DOCS[:5]}), str(tmp_path / "d.parquet"))
    pf.main([f"--data_files={tmp_path}/d.parquet", "--text_column=body", f"--out_dir={tmp_path}/pq",
             "--num_proc=1"])
    np.testing.assert_array_equal(data.read_shard(data.list_shards(str(tmp_path / "pq"), "val")[0]),
                                  expected_stream(gpt2_enc, DOCS[:5]))


def test_fineweb_prints_the_data_dir_relative_to_the_repo(pf, docs_jsonl, tmp_path, monkeypatch, capsys, gpt2_enc):
    monkeypatch.setattr(utils, "REPO", str(tmp_path))  # relative folders resolve against the repo folder
    pf.main([f"--data_files={docs_jsonl}", "--out_dir=data/mine", "--num_proc=1", "--shard_size=200"])
    assert data.list_shards(str(tmp_path / "data" / "mine"), "train")
    assert capsys.readouterr().out.splitlines()[-1] == "train with: python train_gpt2.py --data_dir=data/mine"


def test_fineweb_reads_data_files_from_the_working_directory(pf, tmp_path, monkeypatch, capsys, gpt2_enc):
    """From another working directory: a relative --data_files is read there, a relative --out_dir is the repo
    folder's (tmp_path/repo stands in for it, so nothing is written into this checkout)."""
    repo, cwd = tmp_path / "repo", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setattr(utils, "REPO", str(repo))
    monkeypatch.chdir(cwd)
    (cwd / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    pf.main(["--data_files=docs.jsonl", "--out_dir=data/mine", "--num_proc=1", "--shard_size=200"])
    assert capsys.readouterr().out.splitlines()[-1] == "train with: python train_gpt2.py --data_dir=data/mine"
    out = str(repo / "data" / "mine")
    paths = data.list_shards(out, "val") + data.list_shards(out, "train")
    np.testing.assert_array_equal(np.concatenate([data.read_shard(p) for p in paths]), expected_stream(gpt2_enc, DOCS))
    assert os.listdir(cwd) == ["docs.jsonl"]


def test_fineweb_local_file_errors(pf, tmp_path):
    with pytest.raises(SystemExit, match="no file matches"):
        pf.main([f"--data_files={tmp_path}/missing*.jsonl", f"--out_dir={tmp_path}/o"])
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(SystemExit, match="no column 'text'.*content"):
        pf.main([f"--data_files={tmp_path}/d.jsonl", f"--out_dir={tmp_path}/o", "--num_proc=1"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n{not json\n")
    with pytest.raises(SystemExit, match="cannot read .*bad.jsonl"):
        pf.main([f"--data_files={tmp_path}/bad.jsonl", f"--out_dir={tmp_path}/o2", "--num_proc=1"])
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()  # nothing created for bad input


@pytest.mark.parametrize("content", ["", "\n \n"])
def test_fineweb_empty_jsonl_is_named(pf, tmp_path, content):
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path}/empty.jsonl: no documents"):
        pf.main([f"--data_files={tmp_path}/empty.jsonl", f"--out_dir={tmp_path}/o", "--num_proc=1"])
    assert not (tmp_path / "o").exists()


def test_fineweb_bad_record_names_file_line_and_column(pf, tmp_path, gpt2_enc):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["fine", "also fine", 5]))
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path}/b.jsonl:3: column 'text' holds int 5, not text$"):
        pf.main([f"--data_files={tmp_path}/b.jsonl", f"--out_dir={tmp_path}/o", "--num_proc=1", "--batch_size=2"])
    pq.write_table(pa.table({"body": ["a", None, "c"], "n": [1, 2, 3]}), str(tmp_path / "d.parquet"))
    with pytest.raises(SystemExit, match=r"d.parquet, record 1: column 'n' holds int 1, not text$"):
        pf.main([f"--data_files={tmp_path}/d.parquet", "--text_column=n", f"--out_dir={tmp_path}/p", "--num_proc=1"])
    pf.main([f"--data_files={tmp_path}/d.parquet", "--text_column=body", f"--out_dir={tmp_path}/q",
             "--num_proc=1"])  # a null text is an empty document, not an error
    np.testing.assert_array_equal(data.read_shard(data.list_shards(str(tmp_path / "q"), "val")[0]),
                                  expected_stream(gpt2_enc, ["a", "", "c"]))


def test_document_places_count_records_across_files(pf, tmp_path, monkeypatch):
    """Where document k of several local files is: blank lines are no records; a JSON array counts records."""
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    (tmp_path / "b.json").write_text('[{"text": "c"},\n {"text": "d"}, {"text": "e"}]')
    monkeypatch.setattr(pf, "data_files", f"{tmp_path}/a.jsonl,{tmp_path}/b.json")
    assert [pf.place_of(k) for k in range(6)] == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:3",
                                                  f"{tmp_path}/b.json, record 1", f"{tmp_path}/b.json, record 2",
                                                  f"{tmp_path}/b.json, record 3",
                                                  f"{tmp_path}/a.jsonl,{tmp_path}/b.json, document 6"]


def test_fineweb_bad_record_through_the_pool_is_one_line(tmp_path, gpt2_enc):
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "b", 5, "c"]))
    result = subprocess.run([sys.executable, os.path.join(REPO, "prepare_fineweb.py"),
                             f"--data_files={tmp_path}/bad.jsonl", f"--out_dir={tmp_path}/o", "--num_proc=2",
                             "--batch_size=1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: {tmp_path}/bad.jsonl:3: column 'text' holds int 5, not text"
    assert "Traceback" not in result.stderr


# -----------------------------------------------------------------------------
# numeric settings: exit 2 with a line naming the setting, before any work


@pytest.mark.parametrize("script, argv, name", [
    ("fineweb", ["--shard_size=0"], "shard_size"),
    ("fineweb", ["--max_tokens=-1"], "max_tokens"),
    ("fineweb", ["--num_proc=-2"], "num_proc"),
    ("fineweb", ["--batch_size=0"], "batch_size"),
    ("fineweb", ["--tokenizer=gpt3"], "tokenizer"),
    ("wikitext", ["--shard_size=0"], "shard_size"),
    ("wikitext", ["--val_fraction=1"], "val_fraction"),
    ("wikitext", ["--val_fraction=nan"], "val_fraction"),
    ("wikitext", ["--vocab_words=0"], "vocab_words"),
    ("wikitext", ["--tokenizer=bpe"], "tokenizer"),
    ("wikitext", ["--source=wikitext-3"], "source"),
    ("wikitext", ["--text_sha256=abc", "--text_file=x.txt"], "text_sha256"),
    ("wikitext", ["--text_file=x.txt", "--data_dir_in=y"], "text_file"),
])
def test_bad_settings_exit_2_naming_the_setting(pf, pw, capsys, tmp_path, script, argv, name):
    module = pf if script == "fineweb" else pw
    code, err = exits(module.main, argv + [f"--out_dir={tmp_path}/o"], capsys)
    assert code == 2 and err.startswith(f"error: --{name}"), err
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# prepare_wikitext.py


@pytest.fixture
def play_txt(tmp_path):
    """The tests' own corpus as a text file, its last lines with characters the train part lacks."""
    import corpus  # tests/corpus.py
    path = tmp_path / "play.txt"
    path.write_text(corpus.play(60_000) + "\nNURSE:\nÆsop's naïve café — ½!\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("tok", ["gpt2", "char", "word"])
@pytest.mark.parametrize("text", ["play", "wikitext"])
def test_text_file_end_to_end(pw, tmp_path, tok, text, play_txt, request):
    if text == "wikitext":  # real text: wikitext's own <unk>, unicode, @-@ markup (only where ../shared is)
        text_file = os.path.join(request.getfixturevalue("shared_dir"), "data", "wikitext-2", "valid.txt")
    else:
        text_file = play_txt
    enc = request.getfixturevalue("gpt2_enc") if tok == "gpt2" else None
    name = os.path.splitext(os.path.basename(text_file))[0]
    out = tmp_path / tok
    pw.main([f"--text_file={text_file}", f"--tokenizer={tok}", f"--out_dir={out}"])
    assert shard_files(out) == [f"{name}_train_000000.bin", f"{name}_val_000000.bin"]
    assert sorted(os.listdir(tmp_path)) == sorted(["play.txt", tok])  # nothing left beside the folder
    meta = data.read_meta(str(out))
    assert meta["tokenizer"] == tok and meta["settings"]["tokenizer"] == tok
    raw = open(text_file, encoding="utf-8", newline="").read()
    train_text, val_text = pw.split_text(raw, 0.1)
    assert train_text + val_text == raw and 0.09 < len(val_text) / len(raw) < 0.11
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
        words = sorted(set(train_text.split()) - {"<unk>", "<eos>"})
        assert meta["vocab_size"] == min(1000, len(words)) + 2 and meta["itos"][-2:] == ["<unk>", "<eos>"]
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


def test_gpt2_pieces_encode_like_the_whole_text(pw, gpt2_enc):
    import corpus  # tests/corpus.py
    text = corpus.play(100_000)
    pieces = pw.gpt2_pieces(text, size=500)
    assert len(pieces) > 100 and "".join(pieces) == text
    assert [t for p in gpt2_enc.encode_ordinary_batch(pieces) for t in p] == gpt2_enc.encode_ordinary(text)


def test_wikitext_local_folder(pw, tmp_path, monkeypatch, capsys):
    src = tmp_path / "wt"
    src.mkdir()
    for split, text in [("train", " = A = \n the cat sat \n"), ("valid", " the dog \n"),
                        ("test", " a cat \n")]:
        (src / f"wiki.{split}.tokens").write_text(text)
    monkeypatch.setattr(utils, "REPO", str(tmp_path))  # the default out_dir is relative to the repo folder
    pw.main([f"--data_dir_in={src}", "--tokenizer=word", "--vocab_words=3"])
    out = str(tmp_path / "data" / "wt_word")  # data/{name}_{tokenizer}
    meta = data.read_meta(out)
    assert meta["itos"] == ["=", "A", "cat", "<unk>", "<eos>"]  # ties alphabetical
    assert data.read_shard(data.list_shards(out, "test")[0]).tolist() == [3, 2, 4]
    assert data.read_shard(data.list_shards(out, "val")[0]).tolist() == [3, 3, 4]
    # the --data_dir the trainers take (they resolve it against their own folder, as this script does)
    assert capsys.readouterr().out.splitlines()[-1] == \
        "train with: python train_lstm.py --data_dir=data/wt_word (or train_gpt2.py)"
    only_valid_and_test = tmp_path / "wt2"
    only_valid_and_test.mkdir()
    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        (only_valid_and_test / name).write_text(" the dog \n")
    with pytest.raises(SystemExit, match="found splits: val, test.*--text_file="):
        pw.main([f"--data_dir_in={only_valid_and_test}", f"--out_dir={tmp_path}/x"])


def test_text_file_prints_the_data_dir_the_trainer_needs(tmp_path, play_txt):
    """--text_file=.../play.txt writes data/play_char by default: the last line names the folder in the form
    train_lstm.py takes (relative to the repo when inside it, as the local-folder test shows; absolute here)."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "prepare_wikitext.py"), f"--text_file={play_txt}",
                             "--tokenizer=char", f"--out_dir={tmp_path}/prepared"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == \
        f"train with: python train_lstm.py --data_dir={tmp_path}/prepared (or train_gpt2.py)"


def test_wikitext_folders_are_relative_to_the_repo_and_files_to_the_working_directory(tmp_path):
    """Run from another working directory: a relative --text_file is read there, while --data_dir_in and
    --out_dir (the default one too) are relative to the repo folder; nothing is written where the command
    runs, and the --data_dir printed is the one the trainers take."""
    import corpus  # tests/corpus.py
    repo, cwd = copy_of_the_repo(tmp_path / "repo", "prepare_wikitext.py"), tmp_path / "cwd"
    cwd.mkdir()
    (repo / "corpus").mkdir()
    for split in ("train", "valid"):
        (repo / "corpus" / f"wiki.{split}.tokens").write_text(corpus.play(3_000))
    book = corpus.play(20_000)
    (cwd / "book.txt").write_text(book)

    def run(*args):
        result = subprocess.run([sys.executable, str(repo / "prepare_wikitext.py"), "--tokenizer=char", *args],
                                capture_output=True, text=True, timeout=120, cwd=cwd)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()[-1]
    assert run("--data_dir_in=corpus") == \
        "train with: python train_lstm.py --data_dir=data/corpus_char (or train_gpt2.py)"
    assert data.read_meta(str(repo / "data" / "corpus_char"))["tokens"] == {"train": 3_000, "val": 3_000}
    assert run("--text_file=book.txt", "--out_dir=data/book") == \
        "train with: python train_lstm.py --data_dir=data/book (or train_gpt2.py)"
    meta = data.read_meta(str(repo / "data" / "book"))
    assert meta["source"] == "book" and sum(meta["tokens"].values()) == len(book)
    assert os.listdir(cwd) == ["book.txt"]


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


# -----------------------------------------------------------------------------
# prepare_wikitext.py: the folder is the old set or the new set, never a mix


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import data, prepare_wikitext
module, name, calls = {target}, {name!r}, [{after}]
real = getattr(module, name)

def dies(*args, **kwargs):  # kill -9 right after the {after}th call: no cleanup of any kind runs
    result = real(*args, **kwargs)
    calls[0] -= 1
    if calls[0] == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(module, name, dies)
prepare_wikitext.main(sys.argv[1:])
"""


def killed_run(args, target, name, after):
    code = KILLED_RUN.format(repo=REPO, target=target, name=name, after=after)
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr


def test_killed_rerun_leaves_the_old_set_whole_and_the_next_run_the_new_one(pw, tmp_path, play_txt):
    out, reference = tmp_path / "out", tmp_path / "reference"
    word = [f"--text_file={play_txt}", "--tokenizer=word", f"--out_dir={out}"]
    char = [f"--text_file={play_txt}", "--tokenizer=char"]
    pw.main(word)
    old = snapshot(out)
    pw.main(char + [f"--out_dir={reference}"])
    new = snapshot(reference)
    assert old.keys() == new.keys() and old != new  # same file names: a mix would be invisible by name

    # killed right after the new train shard was written: the folder is still the old set, untouched
    killed_run(char + [f"--out_dir={out}"], "data", "write_shard", 1)
    assert snapshot(out) == old
    assert [p for p in os.listdir(tmp_path) if p.startswith("out.tmp-")]  # the dead run's unfinished set

    # killed between moving the old set aside and moving the new one in: no folder, so training stops
    killed_run(char + [f"--out_dir={out}"], "os", "rename", 1)
    assert not out.exists()
    with pytest.raises(data.ShardError):
        data.list_shards(str(out), "train")

    pw.main(char + [f"--out_dir={out}"])  # puts the old set back, removes the dead runs' sets, then switches
    assert snapshot(out) == new
    assert sorted(os.listdir(tmp_path)) == ["out", "play.txt", "reference"]


def test_failed_rerun_leaves_the_old_set_and_nothing_beside_it(pw, tmp_path, play_txt, monkeypatch):
    out = tmp_path / "out"
    pw.main([f"--text_file={play_txt}", "--tokenizer=word", f"--out_dir={out}"])
    old = snapshot(out)
    real, calls = data.write_shard, []

    def interrupted_in_the_split_loop(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:  # the train shard is written, the val shard is not
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(data, "write_shard", interrupted_in_the_split_loop)
    with pytest.raises(KeyboardInterrupt):
        pw.main([f"--text_file={play_txt}", "--tokenizer=char", f"--out_dir={out}"])
    assert snapshot(out) == old
    assert sorted(os.listdir(tmp_path)) == ["out", "play.txt"]


BLOCKED_RUN = """
import sys, time
sys.path.insert(0, {repo!r})
import data, prepare_wikitext

def blocked(*args, **kwargs):  # the run stops in the middle of writing its set, until the test kills it
    open({started!r}, "w").close()
    time.sleep(120)

data.write_shard = blocked
prepare_wikitext.main(sys.argv[1:])
"""


def test_wikitext_one_run_per_out_dir(pw, tmp_path, play_txt, capsys):
    """A second run into the folder of a run that is writing exits 1 naming the first's PID and writes
    nothing; once the first is gone (killed here), its lock is no obstacle and nothing of it is left."""
    out, started = tmp_path / "out", tmp_path / "started"
    char = [f"--text_file={play_txt}", "--tokenizer=char", f"--out_dir={out}"]
    pw.main([f"--text_file={play_txt}", "--tokenizer=word", f"--out_dir={out}"])
    old = snapshot(out)
    first = subprocess.Popen([sys.executable, "-c", BLOCKED_RUN.format(repo=REPO, started=str(started)), *char],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if started.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert started.exists(), first.communicate()[1]
        code, err = exits(pw.main, char, capsys)
    finally:
        first.kill()
        first.wait()
    assert code == 1 and err.strip().startswith("error: ") and f"PID {first.pid}" in err
    assert snapshot(out) == old and not (tmp_path / f"out.tmp-{os.getpid()}").exists()
    pw.main(char)
    assert sorted(os.listdir(tmp_path)) == ["out", "play.txt", "started"]


def test_out_dir_with_other_files_is_refused(pw, tmp_path, play_txt, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = exits(pw.main, [f"--text_file={play_txt}", "--tokenizer=char", f"--out_dir={out}"], capsys)
    assert code == 2 and "--out_dir" in err and "notes.txt" in err
    assert os.listdir(out) == ["notes.txt"]


# -----------------------------------------------------------------------------
# an output folder that cannot be written: one line naming the path and the cause, nothing left behind


def unwritable(kind, tmp_path, monkeypatch):
    """An output folder under tmp_path that cannot be written, and the cause the error must name."""
    if kind == "parent is a file":  # refused even to root
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "out", "Not a directory"
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder: the full-disk case stands in for it")
        (tmp_path / "ro").mkdir(mode=0o500)
        return tmp_path / "ro" / "out", "Permission denied"

    def full(fd):  # ENOSPC surfaces at the latest when the data is forced to the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    return tmp_path / "out", os.strerror(errno.ENOSPC)


KINDS = ["parent is a file", "read-only", "full disk"]


def no_temporaries(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if ".tmp" in f or ".tmp" in d]


@pytest.mark.parametrize("kind", KINDS)
def test_wikitext_unwritable_out_dir(pw, tmp_path, monkeypatch, capsys, play_txt, kind):
    out, cause = unwritable(kind, tmp_path, monkeypatch)
    code, err = exits(pw.main, [f"--text_file={play_txt}", "--tokenizer=char", f"--out_dir={out}"], capsys)
    line = err.strip()
    assert code == 1 and line.startswith("error: ") and "\n" not in line and cause in line and str(out) in line
    assert not no_temporaries(tmp_path) and not out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_fineweb_unwritable_out_dir(pf, tmp_path, monkeypatch, capsys, docs_jsonl, kind, request):
    if kind == "full disk":
        request.getfixturevalue("gpt2_enc")  # the first write is a shard: the documents are tokenized first
    out, cause = unwritable(kind, tmp_path, monkeypatch)
    code, err = exits(pf.main, fineweb_args(docs_jsonl, out), capsys)
    line = err.strip().splitlines()[-1]  # after the progress bar's
    assert "Traceback" not in err
    assert code == 1 and line.startswith("error: ") and "\n" not in line and cause in line and str(out) in line
    assert not no_temporaries(tmp_path)
