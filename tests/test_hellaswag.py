"""hellaswag.py: batched scoring agrees with a naive one-ending-at-a-time reference, data validation,
download path, DDP sharding over gloo, and the CLI on a tiny checkpoint. All offline, CPU, small.
Scoring needs the GPT-2 BPE files (the gpt2_enc fixture skips without them); reading data does not."""
import dataclasses
import errno
import json
import os
import random
import re
import stat
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import requests
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import data
import hellaswag as hs
import utils
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=50304)
WORDS = ("the man woman dog ball kitchen slowly then cuts paints rides a bike quickly towel water "
         "grill knife onion guitar smiles jumps over fence camera talks to rope lake").split()


def make_example(ind, label, ctx_a, ctx_b, endings, activity="Cooking", source="activitynet~v_abc"):
    """One line in the exact schema of the official hellaswag_val.jsonl."""
    return dict(ind=ind, activity_label=activity, ctx_a=ctx_a, ctx_b=ctx_b,
                ctx=ctx_a + " " + ctx_b if ctx_b else ctx_a, split="val", split_type="indomain",
                label=label, endings=endings, source_id=source)


def random_examples(n, seed=0):
    rng = random.Random(seed)

    def sentence(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))
    examples = [make_example(0, 2, "[header] How to clean a grill [title] Heat the grill. [step] Let it",
                             "burn", ["off. [substeps] Wait.", "away the grease.", "cool [title] down.", "x"],
                             activity="Home and Garden", source="wikihow~123")]
    for i in range(1, n):
        examples.append(make_example(i, rng.randrange(4), sentence(rng.randint(3, 12)).capitalize() + ".",
                                     sentence(rng.randint(0, 2)),
                                     [sentence(rng.randint(1, 9)) + "." for _ in range(4)]))
    return examples


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**dict(CONFIG, **overrides)))
    with torch.no_grad():  # a random model with strong opinions: no near-ties between endings
        model.transformer.wte.weight.normal_(0.0, 1.0)
    return model.eval()


# -----------------------------------------------------------------------------
# naive reference: one ending at a time, no batching, no padding, a loop over the ending's tokens


def naive_clean(text):  # lm-eval-harness's HellaSwag preprocess, written out again
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def naive_scores(model, ex, style, enc):
    """Per ending: (summed loss, token count, char count); loss = -log softmax in float64."""
    if style == "completion":
        context, endings = ex["ctx"], ex["endings"]
    else:
        context = naive_clean(ex["activity_label"] + ": " + ex["ctx_a"] + " " + ex["ctx_b"].capitalize())
        endings = [naive_clean(e) for e in ex["endings"]]
    ctx_tokens, scores = enc.encode_ordinary(context), []
    for ending in endings:
        end_tokens = enc.encode_ordinary(" " + ending)
        row = torch.tensor([ctx_tokens + end_tokens])
        with torch.no_grad():
            logits, _ = model(row[:, :-1], row[:, 1:])
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        loss = sum(-logp[len(ctx_tokens) - 1 + j, t].item() for j, t in enumerate(end_tokens))
        scores.append((loss, len(end_tokens), len(ending)))
    return scores


def first_argmin(values):
    return min(range(len(values)), key=lambda i: values[i])  # min() keeps the first of equal values


def naive_predictions(model, examples, style, enc):
    preds = []
    for ex in examples:
        s = naive_scores(model, ex, style, enc)
        norm = [loss / (n if style == "completion" else chars) for loss, n, chars in s]
        preds.append((first_argmin([loss for loss, _, _ in s]), first_argmin(norm)))
    return preds


# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("style", ["completion", "harness"])
def test_batched_scoring_matches_naive_reference(style, gpt2_enc):
    model, examples = tiny_gpt(), random_examples(12)
    got = hs.score_examples(model, examples, gpt2_enc, "cpu", style, batch_size=3)
    want = naive_predictions(model, examples, style, gpt2_enc)
    assert got == want
    assert len({p for p, _ in got}) > 1 and len({p for _, p in got}) > 1  # not a constant answer


def test_padding_and_batching_keep_every_ending_loss(gpt2_enc):
    model, examples = tiny_gpt(), random_examples(5)
    rendered = [hs.render_example(ex, gpt2_enc, "completion") for ex in examples]
    sum_loss, n_tokens = hs.ending_losses(model, rendered, "cpu")  # 20 rows of different lengths
    naive = [naive_scores(model, ex, "completion", gpt2_enc) for ex in examples]
    torch.testing.assert_close(sum_loss, torch.tensor([[s[0] for s in row] for row in naive], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    assert n_tokens.tolist() == [[s[1] for s in row] for row in naive]


def test_long_rows_are_truncated_from_the_left(gpt2_enc):
    model = tiny_gpt(block_size=16)
    ex = make_example(0, 0, " ".join(WORDS), "", ["a b c.", "the dog.", "jumps over.", "water"])
    sum_loss, _ = hs.ending_losses(model, [hs.render_example(ex, gpt2_enc)], "cpu")
    context = gpt2_enc.encode_ordinary(ex["ctx"])
    for k, ending in enumerate(ex["endings"]):
        end_tokens = gpt2_enc.encode_ordinary(" " + ending)
        row = torch.tensor([(context + end_tokens)[-17:]])  # the last block_size + 1 tokens
        with torch.no_grad():
            logits, _ = model(row[:, :-1], row[:, 1:])
        loss = torch.nn.functional.cross_entropy(logits[0, -len(end_tokens):].double(), row[0, -len(end_tokens):],
                                                 reduction="sum")
        assert abs(sum_loss[0, k].item() - loss.item()) < 1e-4


def test_harness_rendering_strips_wikihow_markup(gpt2_enc):
    ex = make_example(0, 0, "[header] How to make tea [title] Boil water. [step] Pour it", "into",
                      ["a cup. [substeps] Wait.", "b", "c", "d"], activity="Food")
    context, endings, chars = hs.render_example(ex, gpt2_enc, "harness")
    assert gpt2_enc.decode(context) == "Food: How to make tea. Boil water. Pour it Into"
    assert gpt2_enc.decode(endings[0]) == " a cup. Wait." and chars[0] == len("a cup. Wait.")
    context, endings, _ = hs.render_example(ex, gpt2_enc, "completion")
    assert gpt2_enc.decode(context) == ex["ctx"] and gpt2_enc.decode(endings[1]) == " b"


class OracleModel(torch.nn.Module):
    """Knows the answers: logit +30 on the next token of the correct (context + ending) rows."""

    def __init__(self, examples, style, enc, vocab_size=50304):
        super().__init__()
        self.vocab_size, self.next_token = vocab_size, {}
        for ex in examples:
            context, endings, _ = hs.render_example(ex, enc, style)
            row = context + endings[ex["label"]]
            for t in range(1, len(row)):
                self.next_token[tuple(row[:t])] = row[t]

    def forward(self, idx, targets=None, reduction="mean"):
        logits = torch.zeros(*idx.shape, self.vocab_size)  # (B, T, V)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                if tuple(row[:t + 1]) in self.next_token:
                    logits[b, t, self.next_token[tuple(row[:t + 1])]] = 30.0
        return logits, token_losses(logits, targets)


class UniformModel(torch.nn.Module):
    """Every token has probability 1/V: each ending's loss is (its token count) * ln V."""

    def forward(self, idx, targets=None, reduction="mean"):
        logits = torch.zeros(1, 1, 1).expand(*idx.shape, 50304)  # (B, T, V) without the memory
        return logits, token_losses(logits, targets)


def token_losses(logits, targets):
    """What GPT.forward(..., reduction="none") returns: per-token CE (B, T), 0 where the target is -1."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                           reduction="none").view(targets.shape)


@pytest.mark.parametrize("style", ["completion", "harness"])
def test_model_that_knows_the_answers_scores_100_percent(style, gpt2_enc):
    examples = random_examples(8, seed=1)
    result = hs.evaluate(OracleModel(examples, style, gpt2_enc), examples, gpt2_enc, "cpu", style, batch_size=2)
    assert result == dict(acc=1.0, acc_norm=1.0, correct=8, correct_norm=8, total=8, style=style)


@pytest.mark.parametrize("style", ["completion", "harness"])
def test_uniform_model_follows_the_tie_rule(style, gpt2_enc):
    # token counts 3,1,1,2: acc picks the fewest tokens, the tie between 1 and 2 goes to the lower index.
    examples = [make_example(0, 1, "A man walks.", "he", ["a b c", "x", "y", "p q"]),
                make_example(1, 2, "A man walks.", "he", ["a b c", "x", "y", "p q"])] + random_examples(6, seed=2)[1:]
    preds = hs.score_examples(UniformModel(), examples, gpt2_enc, "cpu", style)
    for ex, (pred, pred_norm) in zip(examples, preds, strict=True):
        _, endings, chars = hs.render_example(ex, gpt2_enc, style)
        n = [len(e) for e in endings]
        assert pred == first_argmin(n)
        # completion: every mean loss is ln V, a 4-way tie -> ending 0; harness: fewest tokens per character
        per_char = [Fraction(k, c) for k, c in zip(n, chars, strict=True)]
        assert pred_norm == (0 if style == "completion" else first_argmin(per_char))
    assert preds[0][0] == preds[1][0] == 1
    result = hs.evaluate(UniformModel(), examples, gpt2_enc, "cpu", style)
    assert result["correct"] == sum(p == ex["label"] for (p, _), ex in zip(preds, examples, strict=True))


def test_evaluate_restores_train_mode_and_shards_by_rank(gpt2_enc):
    model, examples = tiny_gpt().train(), random_examples(7)
    full = hs.evaluate(model, examples, gpt2_enc, "cpu")
    assert model.training
    parts = [hs.evaluate(model, examples, gpt2_enc, "cpu", rank=r, world_size=2) for r in range(2)]  # no dist: partial
    assert [p["total"] for p in parts] == [4, 3]
    assert sum(p["correct_norm"] for p in parts) == full["correct_norm"]


# -----------------------------------------------------------------------------
# data files


def test_real_schema_loads_and_limit_keeps_the_first(tmp_path):
    examples = random_examples(5)
    path = write_jsonl(tmp_path / "val.jsonl", examples[:2] + [""] + examples[2:])  # blank lines are ignored
    assert hs.load_examples(path) == examples
    assert hs.load_examples(path, limit=3) == examples[:3]


def _drop(ex, key):
    return {k: v for k, v in ex.items() if k != key}


@pytest.mark.parametrize("bad, problem", [
    (lambda ex: json.dumps(_drop(ex, "endings")), "missing field"),
    (lambda ex: json.dumps(dict(ex, label=7)), "label"),
    (lambda ex: json.dumps(dict(ex, endings=ex["endings"][:3])), "4 strings"),
    (lambda ex: json.dumps(ex)[:-5], "bad JSON"),
])
def test_malformed_line_is_named_or_skipped(tmp_path, capsys, bad, problem):
    examples = random_examples(4)
    path = write_jsonl(tmp_path / "val.jsonl", examples[:2] + [bad(examples[2])] + examples[3:])
    with pytest.raises(SystemExit, match=rf"val\.jsonl:3: .*{problem}"):
        hs.load_examples(path)
    assert hs.load_examples(path, skip_bad=True) == examples[:2] + examples[3:]
    assert "skipped 1 malformed line" in capsys.readouterr().err


def test_binary_and_empty_files_are_one_line_errors(tmp_path):
    binary = tmp_path / "image.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)) * 4)
    with pytest.raises(SystemExit, match=rf"^error: {binary}:1: not UTF-8 text"):
        hs.load_examples(str(binary))
    with pytest.raises(SystemExit, match=rf"^error: {binary}: no HellaSwag examples, 3 malformed line"):
        hs.load_examples(str(binary), skip_bad=True)
    mixed = tmp_path / "mixed.jsonl"  # one bad line in a good file is named, or skipped like any other
    good = [json.dumps(ex).encode() + b"\n" for ex in random_examples(3)]
    mixed.write_bytes(good[0] + b"\xff\xfe{}\n" + b"".join(good[1:]))
    with pytest.raises(SystemExit, match=r"mixed.jsonl:2: not UTF-8"):
        hs.load_examples(str(mixed))
    assert hs.load_examples(str(mixed), skip_bad=True) == random_examples(3)
    for content in ("", "\n \n"):  # would score 0 out of 0
        (tmp_path / "empty.jsonl").write_text(content)
        with pytest.raises(SystemExit, match=r"^error: .*empty.jsonl: no HellaSwag examples \(an empty file\?\)$"):
            hs.load_examples(str(tmp_path / "empty.jsonl"))
    with pytest.raises(SystemExit, match=r"^error: cannot read .*: Is a directory$"):
        hs.load_examples(str(tmp_path))


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00", b""])
def test_cli_bad_data_file_is_one_line_before_any_model_loads(tmp_path, content):
    (tmp_path / "val.jsonl").write_bytes(content)
    out = subprocess.run([sys.executable, os.path.join(REPO, "hellaswag.py"), f"--data_file={tmp_path}/val.jsonl",
                          f"--checkpoint={tmp_path}/not_there.pt", "--device=cpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and out.stderr.startswith(f"error: {tmp_path}/val.jsonl")


def test_train_gpt2_with_a_binary_hellaswag_file_stops_with_one_line(tmp_path, gpt2_enc):
    """train_gpt2.py reads --hellaswag_file through load_examples: the same one-line error, exit 1. (Without
    the GPT-2 BPE files it skips HellaSwag before reading the file, hence the fixture.)"""
    tokens = np.random.default_rng(0).integers(0, 50257, 4000).astype(np.uint16)  # GPT-2 ids; no tokenizer needed
    data.write_shard(data.shard_name(tmp_path / "d", "t", "val", 0), tokens[:1000])
    data.write_shard(data.shard_name(tmp_path / "d", "t", "train", 1), tokens[1000:])
    data.write_meta(tmp_path / "d", {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256, "itos": None})
    (tmp_path / "hs.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    out = subprocess.run([sys.executable, os.path.join(REPO, "train_gpt2.py"), f"--data_dir={tmp_path}/d",
                          f"--out_dir={tmp_path}/run", "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16",
                          "--block_size=16", "--micro_batch_size=2", "--total_batch_size=32", "--max_steps=1",
                          "--eval_interval=0", "--sample_tokens=0", "--compile=False", "--hellaswag_interval=1",
                          f"--hellaswag_file={tmp_path}/hs.jsonl"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/hs.jsonl:1: not UTF-8 text (is it a binary " \
                                                  f"file?) (--skip_bad=True skips malformed lines)"


def test_harness_needs_its_fields(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", [_drop(random_examples(1)[0], "activity_label")])
    assert len(hs.load_examples(path)) == 1
    with pytest.raises(SystemExit, match=r":1: .*activity_label"):
        hs.load_examples(path, style="harness")


def test_offline_download_names_the_url_and_data_file(tmp_path, monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(requests, "get", offline)
    monkeypatch.setattr(hs.time, "sleep", lambda s: None)
    with pytest.raises(SystemExit) as e:
        hs.ensure_data(None, cache_dir=str(tmp_path))
    assert hs.URL in str(e.value) and "--data_file=" in str(e.value)
    assert len(calls) == 3 and os.listdir(tmp_path) == []  # retried, nothing half-written left


class FakeResponse:
    def __init__(self, body):
        self.body = body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size):
        return (self.body[i:i + 7] for i in range(0, len(self.body), 7))


def test_download_verifies_then_records_sha256(tmp_path, monkeypatch):
    body = "".join(json.dumps(ex) + "\n" for ex in random_examples(6)).encode()
    monkeypatch.setattr(hs, "N_LINES", 6)
    monkeypatch.setattr(hs.time, "sleep", lambda s: None)
    replies = [requests.ConnectionError("flaky"), FakeResponse(body[:-30])]  # then a truncated file

    def get(url, **kwargs):
        reply = replies.pop(0) if replies else FakeResponse(body)
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(requests, "get", get)
    with pytest.raises(SystemExit, match="malformed"):  # the truncated last line is caught, not saved
        hs.ensure_data(None, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    stale = tmp_path / ".tmp_hellaswag_val.jsonl.99999999.abc"  # left by a killed download (no such PID)
    stale.write_bytes(b"half")
    path = hs.ensure_data(None, cache_dir=str(tmp_path))  # good download
    assert open(path, "rb").read() == body and len(hs.load_examples(path)) == 6
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~utils.UMASK  # as any new file, not mkstemp's 0600
    assert sorted(os.listdir(tmp_path)) == ["hellaswag_val.jsonl", "hellaswag_val.jsonl.sha256"]
    monkeypatch.setattr(requests, "get", lambda *a, **k: pytest.fail("downloaded twice"))
    assert hs.ensure_data(None, cache_dir=str(tmp_path)) == path  # cached, sha256 checked
    with open(path, "ab") as f:
        f.write(b"\n")
    with pytest.raises(SystemExit, match="sha256"):
        hs.ensure_data(None, cache_dir=str(tmp_path))
    monkeypatch.setattr(hs, "N_LINES", 7)
    with pytest.raises(SystemExit, match="expected 7"):  # a wrong line count is refused as well
        hs.verify(path, source="x")


@pytest.mark.parametrize("kind", ["parent is a file", "full disk"])
def test_download_into_an_unwritable_folder_is_one_line(tmp_path, monkeypatch, kind):
    body = "".join(json.dumps(ex) + "\n" for ex in random_examples(6)).encode()
    monkeypatch.setattr(hs, "N_LINES", 6)
    if kind == "parent is a file":
        (tmp_path / "file").write_text("x")
        folder, cause = tmp_path / "file" / "hs", "Not a directory"
        monkeypatch.setattr(requests, "get", lambda *a, **k: FakeResponse(body))
    else:
        folder, cause = tmp_path / "hs", os.strerror(errno.ENOSPC)

        class FullDisk(FakeResponse):
            def iter_content(self, chunk_size):
                yield body[:10]
                raise OSError(errno.ENOSPC, cause)
        monkeypatch.setattr(requests, "get", lambda *a, **k: FullDisk(body))
    with pytest.raises(SystemExit) as e:
        hs.ensure_data(None, cache_dir=str(folder))
    assert str(e.value) == f"error: cannot write {folder}/hellaswag_val.jsonl: {cause}"
    assert not folder.exists() or os.listdir(folder) == []  # the temporary file is gone


# -----------------------------------------------------------------------------
# distributed (2 gloo processes) and the CLI


def _dist_worker(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        model = GPT(GPTConfig(**CONFIG))
        model.load_state_dict(torch.load(f"{tmp}/model.pt", weights_only=True))
        examples = hs.load_examples(f"{tmp}/val.jsonl")
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        result = hs.evaluate(model, examples, enc, "cpu", rank=rank, world_size=2, batch_size=2)
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_same_counts_as_one(tmp_path, gpt2_enc):
    model, examples = tiny_gpt(), random_examples(9)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    write_jsonl(tmp_path / "val.jsonl", examples)
    mp.spawn(_dist_worker, args=(str(tmp_path),), nprocs=2)
    single = hs.evaluate(model, examples, gpt2_enc, "cpu", batch_size=2)
    for rank in range(2):
        assert json.load(open(tmp_path / f"rank{rank}.json")) == single


def test_cli_on_a_checkpoint_prints_and_writes_json(tmp_path, gpt2_enc):
    model, examples = tiny_gpt(), random_examples(6)
    ckpt = dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config), step=0)
    torch.save(ckpt, tmp_path / "ckpt_000000.pt")
    data = write_jsonl(tmp_path / "val.jsonl", examples)
    out = subprocess.run([sys.executable, os.path.join(REPO, "hellaswag.py"), f"--checkpoint={tmp_path}/ckpt_000000.pt",
                          f"--data_file={data}", f"--json_out={tmp_path}/hs.json", "--device=cpu", "--limit=5",
                          "--batch_size=2"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    want = hs.evaluate(model, examples[:5], gpt2_enc, "cpu")
    line = (f"hellaswag (completion style) acc {want['acc']:.4f} acc_norm {want['acc_norm']:.4f} "
            f"({want['correct_norm']}/5)")
    assert line in out.stdout and "examples/s" in out.stdout
    got = json.load(open(tmp_path / "hs.json"))
    assert {k: got[k] for k in want} == want


@pytest.fixture
def hs_settings():
    """hellaswag's settings restored after a test that runs main() in-process (it overrides them in place)."""
    saved = utils.settings_of(vars(hs))
    yield hs
    vars(hs).update(saved)


@pytest.mark.parametrize("kind", ["parent is a file", "full disk"])
def test_json_out_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys, gpt2_enc, hs_settings, kind):
    model = tiny_gpt()
    torch.save(dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config)), tmp_path / "c.pt")
    data_file = write_jsonl(tmp_path / "val.jsonl", random_examples(3))
    if kind == "parent is a file":
        (tmp_path / "file").write_text("x")
        json_out, cause = tmp_path / "file" / "hs.json", "File exists"  # os.makedirs of the folder
    else:
        json_out, cause = tmp_path / "hs.json", os.strerror(errno.ENOSPC)

        def full(fd):
            raise OSError(errno.ENOSPC, cause)
        monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as e:
        hs.main([f"--checkpoint={tmp_path}/c.pt", f"--data_file={data_file}", f"--json_out={json_out}",
                 "--device=cpu"])
    assert str(e.value) == f"error: cannot write {json_out}: {cause}"
    assert "acc_norm" in capsys.readouterr().out  # the figures were printed before the write failed
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # no temporary file left


@pytest.mark.parametrize("argv, name", [
    (["--limit=-1"], "limit"),
    (["--batch_size=0"], "batch_size"),
    (["--style=lm"], "style"),
    (["--dtype=fp8"], "dtype"),
    (["--model=gpt2"], "checkpoint"),  # both --checkpoint and --model
    (["--checkpoint=None"], "checkpoint"),  # neither
])
def test_bad_settings_exit_2_naming_the_setting(hs_settings, capsys, argv, name):
    with pytest.raises(SystemExit) as e:
        hs.main(["--checkpoint=c.pt"] + argv)
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: --{name}")


def test_bad_checkpoints_give_clear_messages(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        hs.load_checkpoint(str(tmp_path / "missing.pt"), "cpu")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a checkpoint of train_gpt2.py"):
        hs.load_checkpoint(str(tmp_path / "other.pt"), "cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read"):
        hs.load_checkpoint(str(tmp_path / "junk.pt"), "cpu")


def test_checkpoint_of_a_non_gpt2_vocabulary_is_refused(tmp_path):
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=128)  # e.g. char-level
    torch.save({"model": GPT(cfg).state_dict(), "model_config": dataclasses.asdict(cfg)}, tmp_path / "char.pt")
    with pytest.raises(SystemExit, match="GPT-2 BPE"):
        hs.load_checkpoint(str(tmp_path / "char.pt"), "cpu")


def test_every_rank_waits_for_rank_0s_download_in_training(tmp_path, gpt2_enc):
    """The first multi-GPU run on a fresh machine: local rank 0 downloads HellaSwag (made to take 2 s here) while
    the other ranks wait, and then every rank scores it (they looked at once, saw no file, and skipped it for the
    whole run)."""
    import corpus
    tokens = np.array(gpt2_enc.encode_ordinary(corpus.play(60_000)), dtype=np.uint16)
    folder = tmp_path / "bpe"
    data.write_shard(data.shard_name(folder, "p", "val", 0), tokens[:3000])
    data.write_shard(data.shard_name(folder, "p", "train", 1), tokens[3000:])
    data.write_meta(folder, {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256})
    source = write_jsonl(tmp_path / "hellaswag_val.jsonl", random_examples(8))
    wrapper = tmp_path / "slow_download.py"
    wrapper.write_text(f"""import runpy, shutil, sys, time
sys.path.insert(0, {REPO!r})
import hellaswag
target = {str(tmp_path / 'cache' / 'hellaswag_val.jsonl')!r}
hellaswag.default_path = lambda cache_dir=None: target
def slow(folder):
    time.sleep(2)
    shutil.copy({source!r}, target)
    return target
hellaswag.download = slow
runpy.run_path({os.path.join(REPO, 'train_gpt2.py')!r}, run_name="__main__")
""")
    (tmp_path / "cache").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(wrapper), f"--data_dir={folder}", f"--out_dir={tmp_path / 'run'}", "--device=cpu",
                             "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--micro_batch_size=2",
                             "--total_batch_size=128", "--max_steps=1", "--eval_interval=0", "--sample_tokens=0",
                             "--hellaswag_interval=1", "--compile=False"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped" not in result.stdout and "hellaswag acc_norm" in result.stdout
    assert "/8, completion" in result.stdout


# -----------------------------------------------------------------------------
# the model first, then the data; paths


def gpt_checkpoint(path, meta=None, **config):
    cfg = GPTConfig(**dict(dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50304), **config))
    ckpt = {"model": GPT(cfg).state_dict(), "model_config": dataclasses.asdict(cfg), "step": 0}
    torch.save(dict(ckpt, meta=meta) if meta is not None else ckpt, path)
    return str(path)


CHAR_META = {"tokenizer": "char", "vocab_size": 3, "itos": ["a", "b", "c"], "eot": None, "unk": None}


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"),
    ("char meta", "works in char tokens; HellaSwag is scored in GPT-2 BPE tokens"),
    ("char vocabulary", "works in a vocabulary of 128 ids; HellaSwag is scored in GPT-2 BPE tokens"),
    ("recurrent", "holds a recurrent model (lstm) of train_lstm.py; hellaswag.py scores GPT checkpoints"),
    ("huge", "transformer.wte.weight is (50304, 16), the model_config needs (50304, 8192)"),
])
def test_the_model_is_checked_before_the_data_is_downloaded(tmp_path, monkeypatch, capsys, hs_settings, kind,
                                                              message):
    """With no --data_file, HellaSwag is downloaded: not for a model that cannot be scored. Nor are the GPT-2 BPE
    files asked for (offline, that was the error a char-level checkpoint got)."""
    path = tmp_path / "ckpt.pt"
    if kind == "char meta":  # a char-level model whose vocabulary was padded past 50257 still is not GPT-2 BPE
        gpt_checkpoint(path, meta=CHAR_META)
    elif kind == "char vocabulary":
        gpt_checkpoint(path, vocab_size=128)
    elif kind == "recurrent":
        torch.save(dict(model={"w": torch.zeros(1)}, model_config=dict(model="lstm", n_layer=1), step=0), path)
    elif kind == "huge":
        ckpt = torch.load(gpt_checkpoint(path), weights_only=True)
        torch.save(dict(ckpt, model_config=dict(ckpt["model_config"], n_embd=8192)), path)
    monkeypatch.setattr(requests, "get", lambda *a, **k: pytest.fail("downloaded HellaSwag for a model it refuses"))
    monkeypatch.setattr(data, "tiktoken_encoding", lambda *a: pytest.fail("asked for the GPT-2 BPE files"))
    with pytest.raises(SystemExit) as e:
        hs.main([f"--checkpoint={path}", f"--cache_dir={tmp_path}/cache", "--device=cpu"])
    assert message in str(e.value.code) and "\n" not in str(e.value.code), e.value.code
    assert not os.path.exists(tmp_path / "cache")


def test_a_gpt2_bpe_meta_is_scored(tmp_path, gpt2_enc):
    """A checkpoint that says what it was trained on (as train_gpt2.py's do): GPT-2 BPE is scored."""
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256, "itos": None, "unk": None}
    net = hs.load_checkpoint(gpt_checkpoint(tmp_path / "c.pt", meta=meta), "cpu")
    assert net.config.vocab_size == 50304 and not net.training
    bad = dict(meta, eot=60000)
    with pytest.raises(SystemExit, match=r"tokenizer description \(\"meta\"\) is unusable: eot must be a token id"):
        hs.load_checkpoint(gpt_checkpoint(tmp_path / "bad.pt", meta=bad), "cpu")


def test_neither_checkpoint_nor_model_says_what_to_give(hs_settings, capsys):
    """The README's third example named neither: the error says one of the two is required, and how."""
    with pytest.raises(SystemExit) as e:
        hs.main(["--data_file=hellaswag_val.jsonl", "--limit=1000", "--style=harness", "--json_out=hs.json"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --checkpoint or --model is required") and "--model=gpt2" in err, err


def test_help_describes_the_default_dtype_as_utils_picks_it():
    out = subprocess.run([sys.executable, os.path.join(REPO, "hellaswag.py"), "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    line = next(line for line in out.splitlines() if line.startswith("  --dtype="))
    assert "bfloat16 on GPUs with native bf16, float16 on older ones, bfloat16 on MPS, float32 on CPU" in line


def test_paths_follow_the_one_rule(tmp_path, gpt2_enc):
    """Run from another working directory: the files you name (--checkpoint, --data_file, --json_out) are read and
    written as given, relative to it; --cache_dir, a folder setting, is relative to the repo folder."""
    work = tmp_path / "work"
    (work / "in").mkdir(parents=True)
    model = tiny_gpt()
    torch.save(dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config), step=0),
               work / "in" / "ckpt.pt")
    write_jsonl(work / "in" / "val.jsonl", random_examples(4))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    common = [sys.executable, os.path.join(REPO, "hellaswag.py"), "--checkpoint=in/ckpt.pt", "--device=cpu"]
    named = subprocess.run(common + ["--data_file=in/val.jsonl", "--json_out=hs.json"], capture_output=True,
                           text=True, cwd=work, env=env, timeout=300)
    assert named.returncode == 0, named.stderr
    assert json.load(open(work / "hs.json"))["total"] == 4
    cache = tmp_path / "cache"  # a download already there: the file and its recorded sha256
    cache.mkdir()
    write_jsonl(cache / "hellaswag_val.jsonl", random_examples(4))
    hs.record_sha256(str(cache / "hellaswag_val.jsonl"))
    from_repo = os.path.relpath(cache, REPO)  # ../../tmp/...: from `work` that would be another folder
    cached = subprocess.run(common + [f"--cache_dir={from_repo}"], capture_output=True, text=True, cwd=work,
                            env=env, timeout=300)
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout.splitlines()[0] == named.stdout.splitlines()[0]  # the same 4 examples, the same figures
