"""data.py: the shard format, meta.json, ShardWriter, decode and both loaders, checked against naive references."""
import os

import numpy as np
import pytest
import torch

import data


def header_of(path):
    """The first three header ints, read independently of data.py."""
    return [int(v) for v in np.fromfile(path, dtype=np.int32, count=3)]


def consecutive_shards(folder, lengths, split="train"):
    """Shards whose tokens are consecutive integers across all shards: a window's first token says where
    it starts, and y == x + 1 holds only if a window never crosses a shard end."""
    start = 0
    for k, n in enumerate(lengths):
        data.write_shard(data.shard_name(folder, "t", split, k), np.arange(start, start + n), 2**16)
        start += n


def naive_windows(lengths, T):
    """First token of every window, shard by shard: a window at pos needs pos + T + 1 <= n."""
    firsts, start = [], 0
    for n in lengths:
        firsts += [start + pos for pos in range(0, n, T) if pos + T + 1 <= n]
        start += n
    return firsts


# -----------------------------------------------------------------------------
# one shard


def test_round_trip_uint16_header_and_memmap(tmp_path):
    path = str(tmp_path / "x_train_000000.bin")
    tokens = np.random.default_rng(0).integers(0, 50257, size=1000)
    data.write_shard(path, tokens, vocab_size=50257)
    assert header_of(path) == [20240520, 1, 1000]
    assert os.path.getsize(path) == 256 * 4 + 1000 * 2
    got = data.read_shard(path, vocab_size=50257)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, tokens)
    assert [f for f in os.listdir(tmp_path)] == ["x_train_000000.bin"]  # no temporary file left


def test_round_trip_uint32_for_big_vocab(tmp_path):
    path = str(tmp_path / "x_train_000000.bin")
    tokens = np.array([0, 65535, 65536, 99_999, 7])
    data.write_shard(path, tokens, vocab_size=100_000)
    assert header_of(path) == [20240520, 2, 5]
    assert os.path.getsize(path) == 256 * 4 + 5 * 4
    np.testing.assert_array_equal(data.read_shard(path, vocab_size=100_000), tokens)


def test_npy_shards_are_read(tmp_path):
    path = str(tmp_path / "edufineweb_val_000000.npy")
    np.save(path, np.arange(100, dtype=np.uint16))
    np.testing.assert_array_equal(data.read_shard(path), np.arange(100))
    assert data.list_shards(str(tmp_path), "val") == [path]


def corrupt(path, offset, value, dtype=np.int32):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([value], dtype=dtype).tobytes())


@pytest.mark.parametrize("damage, message", [
    (lambda p: corrupt(p, 0, 12345), "wrong magic"),
    (lambda p: corrupt(p, 4, 7), "unknown shard version 7"),
    (lambda p: corrupt(p, 8, 101), "truncated or corrupt"),  # count disagrees with the size
    (lambda p: os.truncate(p, os.path.getsize(p) - 2), "truncated or corrupt"),
    (lambda p: os.truncate(p, 100), "shorter than the 1024-byte header"),
    (lambda p: corrupt(p, 1024 + 2 * 50, 60000, np.uint16), "token id 60000 is not below vocab_size 50257"),
])
def test_bad_shards_give_clear_errors_naming_the_file(tmp_path, damage, message):
    path = str(tmp_path / "x_train_000000.bin")
    data.write_shard(path, np.arange(100), vocab_size=50257)
    damage(path)
    with pytest.raises(data.ShardError) as e:
        data.read_shard(path, vocab_size=50257)
    assert path in str(e.value) and message in str(e.value)


def test_write_refuses_out_of_range_and_negative_tokens(tmp_path):
    path = str(tmp_path / "x_train_000000.bin")
    with pytest.raises(data.ShardError, match="not below vocab_size 10"):
        data.write_shard(path, np.array([3, 10]), vocab_size=10)
    with pytest.raises(data.ShardError, match="negative"):
        data.write_shard(path, np.array([3, -1]))
    assert os.listdir(tmp_path) == []


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    path = str(tmp_path / "x_train_000000.bin")
    data.write_shard(path, np.arange(10))

    def broken(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(data.np, "ascontiguousarray", broken)  # dies after the header is written
    with pytest.raises(KeyboardInterrupt):
        data.write_shard(path, np.arange(20))
    monkeypatch.undo()
    np.testing.assert_array_equal(data.read_shard(path), np.arange(10))  # the old shard is intact
    assert os.listdir(tmp_path) == ["x_train_000000.bin"]


def test_list_shards(tmp_path):
    with pytest.raises(data.ShardError, match="no train shards.*prepare_fineweb.py"):
        data.list_shards(str(tmp_path), "train")
    for name in ["b_train_000002.bin", "b_train_000001.bin", "b_val_000000.bin", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in data.list_shards(str(tmp_path), "train")] == \
        ["b_train_000001.bin", "b_train_000002.bin"]
    with pytest.raises(ValueError):
        data.list_shards(str(tmp_path), "training")


# -----------------------------------------------------------------------------
# ShardWriter and decode


def test_shard_writer_splits_documents_and_loses_nothing(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 1000, size=int(n)) for n in rng.integers(0, 40, size=60)]
    writer = data.ShardWriter(str(tmp_path), "w", shard_size=37, vocab_size=1000)
    for d in docs:
        writer.add(d)
    paths = writer.close()
    names = [os.path.basename(p) for p in paths]
    assert names[0] == "w_val_000000.bin" and names[1] == "w_train_000001.bin"
    assert names == [f"w_{'val' if k == 0 else 'train'}_{k:06d}.bin" for k in range(len(paths))]
    lengths = [len(data.read_shard(p)) for p in paths]
    assert all(n == 37 for n in lengths[:-1]) and 0 < lengths[-1] <= 37
    np.testing.assert_array_equal(np.concatenate([data.read_shard(p) for p in paths]), np.concatenate(docs))
    assert writer.close() == paths  # closing twice writes nothing new


def test_shard_writer_reports_where_each_shard_ends(tmp_path):
    seen = []
    writer = data.ShardWriter(str(tmp_path), "w", shard_size=4, vocab_size=100,
                              on_shard=lambda path, used: seen.append((os.path.basename(path), used)))
    writer.add(np.arange(3))
    writer.add(np.arange(10))  # 1 token completes shard 0, then 4 more complete shard 1, 4 more shard 2
    assert seen == [("w_val_000000.bin", 1), ("w_train_000001.bin", 5), ("w_train_000002.bin", 9)]
    assert writer.fill == 1


def test_shard_writer_first_index_and_single_split(tmp_path):
    writer = data.ShardWriter(str(tmp_path), "w", shard_size=4, vocab_size=100, splits=("test",),
                              first_index=3)
    assert writer.add(np.arange(9)) == [data.shard_name(str(tmp_path), "w", "test", 3),
                                        data.shard_name(str(tmp_path), "w", "test", 4)]
    assert writer.fill == 1
    writer.close()
    assert sorted(os.listdir(tmp_path)) == ["w_test_000003.bin", "w_test_000004.bin", "w_test_000005.bin"]


def test_decode_char_and_word():
    assert data.decode([2, 0, 1, 3], {"tokenizer": "char", "itos": ["a", "b", "c", "\ufffd"]}) == "cab\ufffd"
    meta = {"tokenizer": "word", "itos": ["the", "cat", "<unk>", "<eos>"], "unk": 2, "eos": 3}
    assert data.decode([0, 1, 3, 2, 3, 0], meta) == "the cat\n<unk>\nthe"


def test_decode_gpt2(gpt2_enc):
    text = "Hello <|endoftext|> world\n"
    ids = gpt2_enc.encode_ordinary(text)
    assert data.decode(np.array(ids, dtype=np.uint16), {"tokenizer": "gpt2", "itos": None}) == text


# -----------------------------------------------------------------------------
# WindowLoader


def epoch_firsts(loader, steps):
    return [int(v) for _ in range(steps) for v in loader.next_batch()[0][:, 0]]


def test_loader_windows_match_naive_end_of_shard_rule(tmp_path):
    T, lengths = 8, [33, 32, 9, 8, 50]  # 33 = 4*8+1: last window fits exactly; 32: it does not; 8: none
    consecutive_shards(str(tmp_path), lengths)
    expected = naive_windows(lengths, T)
    loader = data.WindowLoader(str(tmp_path), "train", B=1, T=T)
    assert loader.n_windows == len(expected) == 4 + 3 + 1 + 0 + 6
    got = []
    for _ in range(len(expected)):
        x, y = loader.next_batch()
        assert str(x.dtype) == str(y.dtype) == "torch.int64"
        assert x.shape == y.shape == (1, T)
        assert (y == x + 1).all()  # never crosses a shard end, never reads past one
        got.append(int(x[0, 0]))
    assert got == expected
    assert expected[3] + T + 1 == 33  # the window ending exactly at the shard end is used


def test_loader_ranks_disjoint_and_cover_global_batch(tmp_path):
    T, lengths, world = 4, [41, 30, 57], 3
    consecutive_shards(str(tmp_path), lengths)
    for shuffle in (False, True):
        single = data.WindowLoader(str(tmp_path), "train", B=2 * world, T=T, shuffle=shuffle, seed=5)
        ranks = [data.WindowLoader(str(tmp_path), "train", B=2, T=T, rank=r, world_size=world,
                                   shuffle=shuffle, seed=5) for r in range(world)]
        for _ in range(7):  # crosses into epoch 1 (24 windows, 6 per step)
            x_all, y_all = single.next_batch()
            parts = [rank.next_batch() for rank in ranks]
            xs = np.concatenate([p[0].numpy() for p in parts])
            np.testing.assert_array_equal(xs, x_all.numpy())
            np.testing.assert_array_equal(np.concatenate([p[1].numpy() for p in parts]), y_all.numpy())
            assert len(set(xs[:, 0])) == len(xs)  # disjoint windows


def test_loader_shuffles_each_epoch_reproducibly(tmp_path):
    T, lengths = 4, [101, 76]
    consecutive_shards(str(tmp_path), lengths)
    windows = naive_windows(lengths, T)
    a = data.WindowLoader(str(tmp_path), "train", B=4, T=T, shuffle=True, seed=7)
    b = data.WindowLoader(str(tmp_path), "train", B=4, T=T, shuffle=True, seed=7)
    assert len(windows) == 43
    steps = len(windows) // 4  # 43 windows -> 10 steps per epoch, 3 windows dropped
    e0, e1 = epoch_firsts(a, steps), epoch_firsts(a, steps)
    assert a.epoch == 1
    assert e0 != e1 and e0 != windows[:len(e0)]  # reshuffled, and not the natural order
    assert len(set(e0)) == len(e0) == 40 and set(e0) <= set(windows)  # a permutation, no repeats
    assert epoch_firsts(b, 2 * steps) == e0 + e1  # same seed, same order on another loader
    c = data.WindowLoader(str(tmp_path), "train", B=4, T=T, shuffle=True, seed=8)
    assert epoch_firsts(c, steps) != e0


def test_loader_state_dict_resumes_exactly(tmp_path):
    consecutive_shards(str(tmp_path), [90, 61])
    a = data.WindowLoader(str(tmp_path), "train", B=3, T=5, shuffle=True)
    for _ in range(8):  # 29 windows = 9 steps per epoch: the resume point is near the epoch end
        a.next_batch()
    state = a.state_dict()
    assert set(state) == {"epoch", "cursor", "shards"}  # the position, and the shards it refers to
    assert state["shards"] == [["t_train_000000.bin", 90], ["t_train_000001.bin", 61]]
    expected = [a.next_batch() for _ in range(4)]  # crosses into epoch 1
    b = data.WindowLoader(str(tmp_path), "train", B=3, T=5, shuffle=True)
    b.load_state_dict(state)
    for x, y in expected:
        bx, by = b.next_batch()
        assert (bx == x).all() and (by == y).all()
    b.reset()
    assert b.state_dict() == {"epoch": 0, "cursor": 0, "shards": state["shards"]}


def test_loader_errors(tmp_path):
    consecutive_shards(str(tmp_path), [20])
    with pytest.raises(data.ShardError, match="fewer than one batch"):
        data.WindowLoader(str(tmp_path), "train", B=4, T=8)
    with pytest.raises(data.ShardError, match="no val shards"):
        data.WindowLoader(str(tmp_path), "val", B=1, T=4)


def test_encode_inverts_decode_for_every_tokenizer(gpt2_enc):
    char = {"tokenizer": "char", "itos": list("\nabc "), "unk": 5, "vocab_size": 6}
    assert data.encode("ab c\nz", char) == [1, 2, 4, 3, 0, 5]
    assert data.decode(data.encode("ab c\nca", char), char) == "ab c\nca"
    assert data.decode([1, 70], char) == "a\ufffd"  # ids of the padded vocabulary past the table
    word = {"tokenizer": "word", "itos": ["the", "cat", "<unk>", "<eos>"], "unk": 2, "eos": 3, "vocab_size": 4}
    assert data.encode("the cat\nthe dog", word) == [0, 1, 3, 0, 2]
    assert data.decode(data.encode("the cat\ncat the", word), word) == "the cat\ncat the"
    gpt2 = {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256}
    text = "Hello <|endoftext|> world"  # the literal stays text: encode_ordinary, never a special token
    assert 50256 not in data.encode(text, gpt2) and data.decode(data.encode(text, gpt2), gpt2) == text
    hello = data.encode("Hello", gpt2)  # ids of the padded vocabulary (50257..50303) a model can sample
    assert data.decode(hello + [50300] + hello, gpt2) == "Hello\ufffdHello"


def test_shards_get_the_permissions_of_any_new_file(tmp_path):
    """mkstemp creates 0600 files; a shared data folder needs shards others can read."""
    path = data.shard_name(tmp_path, "p", "train", 0)
    data.write_shard(path, np.arange(10))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


# -----------------------------------------------------------------------------
# StreamLoader


def test_stream_loader_layout(tmp_path):
    """Rank r's rows are global streams r*B.., each contiguous across batches and shard boundaries,
    segments disjoint, restart flagged when the segments are used up, and reset() back to the start."""
    n = 1000
    tokens = np.arange(n) % 60000
    data.write_shard(os.path.join(tmp_path, "t_train_000000.bin"), tokens[:377])  # streams cross this boundary
    data.write_shard(os.path.join(tmp_path, "t_train_000001.bin"), tokens[377:])
    B, T, world = 3, 7, 2
    seg = n // (B * world)
    seen = set()
    for rank in range(world):
        loader = data.StreamLoader(str(tmp_path), "train", B, T, rank, world)
        windows = (seg - 1) // T
        for k in range(windows + 1):
            x, y, restarted = loader.next_batch()
            assert x.dtype == torch.int64 and x.shape == (B, T)
            k_eff = k % windows
            assert restarted == (k == windows)
            for b in range(B):
                start = (rank * B + b) * seg + k_eff * T
                assert x[b].tolist() == list(range(start, start + T))
                assert y[b].tolist() == list(range(start + 1, start + T + 1))
                assert start + T + 1 <= (rank * B + b + 1) * seg  # never reads into the next stream
                if k < windows:
                    seen.update(range(start, start + T))
        loader.reset()
        assert loader.next_batch()[0][0, 0] == rank * B * seg
    assert len(seen) == B * world * ((seg - 1) // T) * T  # no token shared by two streams or windows


def test_stream_loader_state_dict_resumes_exactly(tmp_path):
    consecutive_shards(str(tmp_path), [300, 211])
    a = data.StreamLoader(str(tmp_path), "train", B=2, T=5)
    for _ in range(30):
        a.next_batch()
    b = data.StreamLoader(str(tmp_path), "train", B=2, T=5)
    b.load_state_dict(a.state_dict())
    for _ in range(30):  # across a restart of the streams (50 windows per stream)
        (ax, ay, ar), (bx, by, br) = a.next_batch(), b.next_batch()
        assert torch.equal(ax, bx) and torch.equal(ay, by) and ar == br
    with pytest.raises(SystemExit, match="micro_batch_size x world_size changed"):
        data.StreamLoader(str(tmp_path), "train", B=3, T=5).load_state_dict(a.state_dict())


# -----------------------------------------------------------------------------
# checks when a loader opens the data: every shard's largest id, meta.json


@pytest.mark.parametrize("loader", [data.WindowLoader, data.StreamLoader])
def test_loaders_check_every_shards_largest_id_when_they_open_it(tmp_path, loader):
    """An id the model cannot embed stops the run when the loader opens the shard, naming it, even where no
    batch would ever draw it (the last token of these shards is in no window of 8+1 tokens)."""
    data.write_shard(data.shard_name(str(tmp_path), "t", "train", 0), np.arange(100) % 50)
    bad = data.shard_name(str(tmp_path), "t", "train", 1)
    data.write_shard(bad, np.concatenate([np.arange(99) % 50, [77]]))
    with pytest.raises(data.ShardError) as e:
        loader(str(tmp_path), "train", 2, 8, vocab_size=50)
    assert str(e.value).startswith(f"{bad}: token id 77 is not below vocab_size 50"), str(e.value)
    loader(str(tmp_path), "train", 2, 8, vocab_size=78)  # every id fits
    loader(str(tmp_path), "train", 2, 8)  # no vocabulary to check against


def test_signed_npy_shards_with_negative_ids_are_refused(tmp_path):
    path = str(tmp_path / "x_train_000000.npy")
    np.save(path, np.array([1, 2, -3, 4], dtype=np.int32))
    with pytest.raises(data.ShardError, match="negative token id -3"):
        data.read_shard(path, vocab_size=10)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not a readable JSON file"),
    (b"\xff\xfe\x00garbage", "not a readable JSON file"),
    (b'["tokenizer", "char"]', "expected a JSON object, got a list"),
    (b'{"tokenizer": "char"}', "vocab_size must be a positive integer, got None"),
    (b'{"vocab_size": "65"}', "vocab_size must be a positive integer, got '65'"),
    (b'{"vocab_size": 0}', "vocab_size must be a positive integer"),
    (b'{"vocab_size": true}', "vocab_size must be a positive integer"),
    (b'{"vocab_size": 65, "tokenizer": 3}', "tokenizer must be a name"),
    (b'{"vocab_size": 3, "itos": "abc"}', "itos must be a list of strings"),
    (b'{"vocab_size": 2, "itos": ["a", "b", "c"]}', "itos has 3 entries, more than vocab_size 2"),
    (b'{"vocab_size": 65, "eot": 65}', "eot must be a token id below vocab_size 65"),
    (b'{"vocab_size": 65, "unk": "x"}', "unk must be a token id"),
])
def test_read_meta_refuses_a_damaged_meta_json_naming_it(tmp_path, content, message):
    path = tmp_path / "meta.json"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        data.read_meta(str(tmp_path))
    text = str(e.value)
    assert text.startswith(f"error: {path}: ") and message in text and "\n" not in text, text


def test_read_meta_reads_what_write_meta_wrote(tmp_path):
    assert data.read_meta(str(tmp_path)) is None  # llm.c's shards come without one
    meta = {"tokenizer": "word", "vocab_size": 4, "itos": ["a", "b", "<unk>", "<eos>"], "unk": 2, "eos": 3,
            "eot": None, "tokens": {"train": 10}}
    data.write_meta(str(tmp_path), meta)
    assert data.read_meta(str(tmp_path)) == meta


def test_meta_refuses_control_characters_in_the_vocabulary(tmp_path):
    """sample.py prints decoded text: an escape sequence in a vocabulary entry would reach the terminal raw.
    Newline and tab are text; ESC, BEL, NUL, DEL and C1 controls are refused, naming the entry."""
    ok = {"tokenizer": "char", "vocab_size": 4, "itos": ["a", "\n", "\t", "é"]}
    assert data.meta_problem(ok) is None
    for bad in ("\x1b[2J", "\x07", "\x00", "\x7f", "\x9b"):
        problem = data.meta_problem({**ok, "itos": ["a", bad]})
        assert problem and "itos[1]" in problem and "control character" in problem, bad
    data.write_meta(tmp_path, {**ok, "itos": ["a", "\x1b]0;pwned\x07"]})
    with pytest.raises(SystemExit, match="control character"):
        data.read_meta(str(tmp_path))


def test_a_wrong_data_dir_says_what_is_there(tmp_path):
    """No shards: say whether the folder exists, suggest the near names beside it, and for a text file the prepare
    command that makes shards of it."""
    (tmp_path / "shakespeare_char").mkdir()
    with pytest.raises(data.ShardError, match=r"no folder .*shakespear_char.* \(did you mean shakespeare_char"):
        data.list_shards(str(tmp_path / "shakespear_char"), "train")
    with pytest.raises(data.ShardError, match="an empty folder"):
        data.list_shards(str(tmp_path / "shakespeare_char"), "train")
    (tmp_path / "shakespeare_char" / "notes.md").write_text("x")
    with pytest.raises(data.ShardError, match="which holds notes.md"):
        data.list_shards(str(tmp_path / "shakespeare_char"), "train")
    (tmp_path / "input.txt").write_text("some text")
    with pytest.raises(data.ShardError, match=r"a text file: .*prepare_wikitext.py --text_file=.*input.txt"):
        data.list_shards(str(tmp_path / "input.txt"), "train")
