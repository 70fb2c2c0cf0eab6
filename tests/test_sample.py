"""sample.py on checkpoints written by train_gpt2.py (tiny, char level) and on hand-built ones: the user's runs."""
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import data
import sample
import utils
from model import GPT, GPTConfig, LSTMConfig, build_recurrent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULE = "-" * 15
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--micro_batch_size=4",
        "--total_batch_size=128", "--warmup_steps=1", "--max_lr=1e-2", "--eval_interval=0",
        "--hellaswag_interval=0", "--sample_tokens=0", "--compile=False"]


def run(script, *args, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def sample_main(*args):
    """sample.py's main in this process, with fresh settings (they are the module's globals)."""
    importlib.reload(sample).main(list(args))


@pytest.fixture(scope="module")
def run_dir(char_shards, tmp_path_factory):
    """A train_gpt2.py run of 3 steps that checkpoints after each: ckpt_000001.pt .. ckpt_000003.pt."""
    out = tmp_path_factory.mktemp("run")
    result = run("train_gpt2.py", f"--data_dir={char_shards}", f"--out_dir={out}", *TINY, "--max_steps=3",
                 "--checkpoint_interval=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def samples(stdout):
    """The samples of sample.py's output: each one is followed by a line of dashes."""
    assert stdout.endswith(RULE + "\n"), stdout[-200:]
    return stdout[:-len(RULE) - 2].split("\n" + RULE + "\n")


def test_seeded_samples_start_with_the_prompt(run_dir, capsys):
    ckpt_path = os.path.join(run_dir, "ckpt_000003.pt")
    args = [f"--checkpoint={ckpt_path}", "--prompt=ROMEO:", "--num_samples=3", "--max_new_tokens=40",
            "--device=cpu"]
    first, again = run("sample.py", *args), run("sample.py", *args)
    assert first.returncode == 0, first.stderr
    sample_main(*args, "--seed=7")
    assert first.stdout == again.stdout != capsys.readouterr().out
    texts = samples(first.stdout)
    assert len(texts) == 3 and len(set(texts)) > 1  # one batch, but each row samples on its own
    itos = set(torch.load(ckpt_path, weights_only=True)["meta"]["itos"])
    for text in texts:
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 40  # char level: one token a character
        assert set(text) <= itos  # decoded with the char vocabulary the data was written with


def test_out_dir_takes_the_newest_checkpoint(run_dir, capsys):
    common = ["--prompt=KING:", "--num_samples=2", "--max_new_tokens=30", "--device=cpu"]
    sample_main(f"--out_dir={run_dir}", *common)
    newest = capsys.readouterr().out
    sample_main(f"--checkpoint={run_dir}/ckpt_000003.pt", *common)
    assert capsys.readouterr().out == newest
    sample_main(f"--checkpoint={run_dir}/ckpt_000001.pt", *common)
    assert capsys.readouterr().out != newest


def test_prompt_from_a_file_and_greedy(run_dir, tmp_path, capsys):
    prompt = "JULIET:\nO Romeo, "
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    sample_main(f"--checkpoint={run_dir}/ckpt_000003.pt", f"--prompt=FILE:{tmp_path}/prompt.txt", "--temperature=0",
                "--num_samples=2", "--max_new_tokens=10", "--device=cpu")
    first, second = samples(capsys.readouterr().out)
    assert first.startswith(prompt) and first == second  # greedy: every sample is the same


def test_checkpoint_without_meta_is_refused(run_dir, tmp_path, capsys):
    """Every checkpoint the trainers write carries its tokenizer description ("meta"); one without it cannot be
    sampled, and sample.py no longer guesses it from the data folder the run once read."""
    ckpt = torch.load(os.path.join(run_dir, "ckpt_000003.pt"), weights_only=True)
    del ckpt["meta"]
    torch.save(ckpt, tmp_path / "old.pt")  # its settings still name the data folder, which is there
    code, err = exit_of(capsys, f"--checkpoint={tmp_path}/old.pt", "--device=cpu")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path}/old.pt lacks its tokenizer description"), err


def write_gpt_checkpoint(path, meta, vocab_size):
    config = GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    torch.save(dict(model=GPT(config).state_dict(), model_config=dataclasses.asdict(config), meta=meta,
                    settings={}, step=0), path)


def test_word_level_checkpoint(tmp_path, capsys):
    itos = ["the", "king", "queen", "is", "dead", "<unk>", "<eos>"]
    write_gpt_checkpoint(tmp_path / "word.pt", dict(tokenizer="word", vocab_size=7, itos=itos, unk=5, eos=6,
                                                    eot=None), 64)
    sample_main(f"--checkpoint={tmp_path}/word.pt", "--prompt=the king is", "--max_new_tokens=8",
                "--device=cpu")
    for text in samples(capsys.readouterr().out):
        assert text.startswith("the king is")
    with pytest.raises(SystemExit):
        sample_main(f"--checkpoint={tmp_path}/word.pt", "--prompt=the prince is dead\nlong live the king",
                    "--device=cpu")
    assert "--prompt has words the model's vocabulary lacks: 'live' 'long' 'prince'\n" in capsys.readouterr().err


def test_gpt2_bpe_checkpoint(gpt2_enc, tmp_path, capsys):
    write_gpt_checkpoint(tmp_path / "bpe.pt", dict(tokenizer="gpt2", vocab_size=50257, eot=50256), 50304)
    sample_main(f"--checkpoint={tmp_path}/bpe.pt", "--prompt=Hello, I'm a language model,", "--num_samples=2",
                "--max_new_tokens=10", "--device=cpu")
    for text in samples(capsys.readouterr().out):
        assert text.startswith("Hello, I'm a language model,")


def exit_of(capsys, *args):
    """(exit status, stderr) that sample.py's main ends with, as the interpreter reports a SystemExit."""
    with pytest.raises(SystemExit) as exit_info:
        sample_main(*args)
    code, err = exit_info.value.code, capsys.readouterr().err
    return (1, f"{code}\n") if isinstance(code, str) else (code, err)


def test_errors_are_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint" * 100)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    torch.save(dict(model={}, model_config=dict(model="nested_lstm", vocab_size=56), step=0), tmp_path / "lstm.pt")
    cases = [
        ([f"--checkpoint={tmp_path}/corrupt.pt"], 1, "cannot read checkpoint"),
        ([f"--checkpoint={tmp_path}/lstm.pt"], 1, "nested_lstm) of train_lstm.py"),
        ([f"--out_dir={tmp_path}"], 1, "no checkpoint (ckpt_*.pt) in"),
        ([f"--out_dir={run_dir}", "--prompt=ROMEO: \u2603 caf\u00e9 \u2603"], 2,
         "--prompt has characters the model's vocabulary lacks: '\u00e9' '\u2603'"),
        ([f"--out_dir={run_dir}", f"--prompt=FILE:{tmp_path}/none.txt"], 1, "cannot read the prompt file"),
        ([f"--out_dir={run_dir}", f"--prompt=FILE:{tmp_path}/latin1.txt"], 1, "the prompt file is not UTF-8"),
        ([f"--out_dir={run_dir}", "--num_samples=0"], 2, "--num_samples must be at least 1"),
    ]
    for args, status, message in cases:
        code, err = exit_of(capsys, *args, "--device=cpu")
        assert code == status and message in err and err.count("\n") == 1, (args, code, err)
        assert capsys.readouterr().out == ""
    result = run("sample.py", f"--checkpoint={tmp_path}/missing.pt")  # once as a process: status and stderr
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: checkpoint {tmp_path}/missing.pt: no such file\n"


def test_gpt2_weights_offline_is_one_line(tmp_path):
    """--checkpoint=gpt2 without the hub and without its cache: one line, not a transformers traceback."""
    result = run("sample.py", "--checkpoint=gpt2", "--device=cpu",
                 env=dict(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path)))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --checkpoint=gpt2: ")
    assert "Traceback" not in result.stderr


# -----------------------------------------------------------------------------
# recurrent models, checkpoints that are not what they say, settings out of range, paths, pipes

CHAR_ITOS = [chr(c) for c in range(32, 127)] + ["\n"]
CHAR_META = dict(tokenizer="char", vocab_size=len(CHAR_ITOS), itos=CHAR_ITOS, unk=None, eot=None)


@pytest.mark.parametrize("name", ["lstm", "nested_lstm", "context_vector"])
def test_recurrent_checkpoints_sample(name, tmp_path, capsys, one_thread):
    """A checkpoint in train_lstm.py's layout (model_config = its LSTMConfig, model, meta): greedy samples are
    the model's own generate, decoded; drawn ones start with the prompt and run the length asked for."""
    config = LSTMConfig(model=name, vocab_size=128, n_embd=16, n_hidden=24, n_layer=2, ffn_hidden=16, context_dim=16,
                        chunk_sizes=(1, 4), surprise_weights=(0.1,))
    torch.manual_seed(0)
    net = build_recurrent(config).eval()
    torch.save(dict(model=net.state_dict(), model_config=dataclasses.asdict(config), meta=CHAR_META, step=0,
                    settings={}), tmp_path / "lstm.pt")
    common = [f"--checkpoint={tmp_path}/lstm.pt", "--prompt=ROMEO:", "--num_samples=2", "--max_new_tokens=30",
              "--device=cpu"]
    sample_main(*common, "--temperature=0")
    prompt = torch.tensor([data.encode("ROMEO:", CHAR_META)])
    want = data.decode(net.generate(prompt, 30, temperature=0, n_vocab=len(CHAR_ITOS))[0].tolist(), CHAR_META)
    assert samples(capsys.readouterr().out) == [want, want]
    sample_main(*common)
    for text in samples(capsys.readouterr().out):
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30 and set(text) <= set(CHAR_ITOS)


def test_a_train_lstm_run_samples(char_shards, tmp_path, capsys):
    """The real thing, once train_lstm.py stores the data's meta.json in its checkpoints as train_gpt2.py does."""
    out = tmp_path / "run"
    result = run("train_lstm.py", f"--data_dir={char_shards}", f"--out_dir={out}", "--device=cpu", "--n_embd=16",
                 "--n_hidden=32", "--n_layer=1", "--ffn_hidden=16", "--micro_batch_size=4", "--block_size=16",
                 "--max_steps=2", "--eval_interval=2", "--val_steps=1", "--log_interval=1", "--chunk_sizes=1,2",
                 "--surprise_weights=0.1", "--checkpoint_interval=0", "--dtype=float32")
    assert result.returncode == 0, result.stderr[-3000:]
    if "meta" not in torch.load(out / "ckpt_000002.pt", weights_only=True):
        pytest.skip("train_lstm.py does not store meta in its checkpoints yet")
    sample_main(f"--out_dir={out}", "--prompt=ROMEO:", "--max_new_tokens=20", "--device=cpu")
    assert all(text.startswith("ROMEO:") for text in samples(capsys.readouterr().out))


def test_meta_is_checked_before_it_is_used(run_dir, tmp_path, capsys):
    """A checkpoint's meta is read as a meta.json is: a control character in its vocabulary (an escape sequence
    for the terminal) or a vocabulary larger than the model's is one line naming the checkpoint."""
    ckpt = torch.load(os.path.join(run_dir, "ckpt_000003.pt"), weights_only=True)
    vocab = ckpt["model_config"]["vocab_size"]
    for name, meta, problem in [
        ("escape", dict(ckpt["meta"], itos=["\x1b[2J"] + ckpt["meta"]["itos"][1:]), "holds a control character"),
        ("large", dict(ckpt["meta"], vocab_size=vocab + 1), f"vocab_size {vocab + 1} is more than the model's"),
        ("shape", [1, 2], "expected a JSON object"),
    ]:
        torch.save(dict(ckpt, meta=meta), tmp_path / f"{name}.pt")
        code, err = exit_of(capsys, f"--checkpoint={tmp_path}/{name}.pt", "--device=cpu")
        assert code == 1 and err.count("\n") == 1 and "\x1b" not in err, err
        assert err.startswith(f"error: {tmp_path}/{name}.pt: its tokenizer description") and problem in err, err


def test_control_characters_in_samples_are_printed_escaped(gpt2_enc, tmp_path, capsys, one_thread):
    """Byte-level BPE has a token for every byte, ESC included: a model (hostile, or just odd) that emits it would
    drive the terminal. Samples print it as \\x1b instead."""
    config = GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False)
    net = GPT(config)
    (esc,) = gpt2_enc.encode("\x1b")
    with torch.no_grad():  # every position's features are all ones, and only the ESC row of the head sees them
        for name, p in net.named_parameters():
            p.fill_(1.0 if name.endswith(("wte.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
        net.lm_head.weight[esc] = 1.0
    torch.save(dict(model=net.state_dict(), model_config=dataclasses.asdict(config), step=0, settings={},
                    meta=dict(tokenizer="gpt2", vocab_size=50257, eot=50256, itos=None, unk=None)),
               tmp_path / "esc.pt")
    sample_main(f"--checkpoint={tmp_path}/esc.pt", "--prompt=Hello", "--num_samples=1", "--max_new_tokens=4",
                "--device=cpu")
    out = capsys.readouterr().out
    assert "\x1b" not in out and samples(out) == ["Hello" + "\\x1b" * 4]


@pytest.mark.parametrize("arg, name", [
    ("--temperature=1e-45", "temperature"),  # logits / temperature overflowed: a RuntimeError traceback
    ("--temperature=inf", "temperature"),  # uniform noise
    ("--temperature=nan", "temperature"),
    ("--temperature=-1", "temperature"),
    ("--temperature=1000", "temperature"),
    ("--num_samples=1e9", "num_samples"),  # a MemoryError traceback
    ("--max_new_tokens=1e9", "max_new_tokens"),
    ("--seed=-1", "seed"),
    ("--seed=1e30", "seed"),  # a RuntimeError traceback from torch's generator
])
def test_settings_out_of_range_are_one_line(run_dir, capsys, monkeypatch, arg, name):
    """Refused before any work: were the setting let through, a billion samples would fill the memory."""
    monkeypatch.setattr(utils, "pick_device", lambda *a: pytest.fail(f"{arg} passed the setting checks"))
    code, err = exit_of(capsys, f"--out_dir={run_dir}", "--device=cpu", arg)
    assert code == 2 and err.startswith(f"error: --{name} must be") and err.count("\n") == 1, err


def test_greedy_and_the_smallest_temperature_agree(run_dir, capsys):
    common = [f"--out_dir={run_dir}", "--device=cpu", "--num_samples=1", "--max_new_tokens=20", "--prompt=ROMEO:"]
    sample_main(*common, "--temperature=0")
    greedy = capsys.readouterr().out
    sample_main(*common, "--temperature=1e-3", "--top_k=2")
    assert capsys.readouterr().out == greedy


def test_a_newest_checkpoint_that_does_not_load_is_skipped_on_stderr(run_dir, tmp_path, capsys):
    """stdout holds the samples only (it is often piped): the warning about a damaged checkpoint goes to stderr."""
    shutil.copy(os.path.join(run_dir, "ckpt_000002.pt"), tmp_path / "ckpt_000002.pt")
    (tmp_path / "ckpt_000003.pt").write_bytes(b"truncated by a full disk")
    sample_main(f"--out_dir={tmp_path}", "--device=cpu", "--prompt=ROMEO:", "--max_new_tokens=5")
    captured = capsys.readouterr()
    assert len(samples(captured.out)) == 3 and "warning: skipping" not in captured.out
    assert captured.err.startswith(f"warning: skipping {tmp_path}/ckpt_000003.pt")


def run_in(cwd, script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=cwd)


def test_paths_follow_the_one_rule(run_dir, tmp_path):
    """Run from another working directory: the files you name (--checkpoint, a FILE: prompt) are read as given,
    relative to it; --out_dir, a folder setting, is relative to the repo folder."""
    work = tmp_path / "work"
    (work / "in").mkdir(parents=True)
    shutil.copy(os.path.join(run_dir, "ckpt_000003.pt"), work / "in" / "ckpt.pt")
    (work / "in" / "prompt.txt").write_text("JULIET:", encoding="utf-8")
    common = ["--num_samples=1", "--max_new_tokens=8", "--temperature=0", "--device=cpu"]
    named = run_in(work, "sample.py", "--checkpoint=in/ckpt.pt", "--prompt=FILE:in/prompt.txt", *common)
    assert named.returncode == 0, named.stderr
    assert samples(named.stdout)[0].startswith("JULIET:")
    from_repo = os.path.relpath(run_dir, REPO)  # ../../tmp/...: from `work` that would be another folder
    assert not os.path.exists(work / from_repo)
    newest = run_in(work, "sample.py", f"--out_dir={from_repo}", "--prompt=JULIET:", *common)
    assert newest.returncode == 0, newest.stderr
    assert newest.stdout == named.stdout  # ckpt_000003.pt both times
    help_text = run_in(work, "sample.py", "--help").stdout
    assert "relative to the repo folder" in help_text and "relative to this file's folder" not in help_text


def run_measured(cwd, *args):
    """(exit status, stderr, peak resident memory in bytes) of `python args` as its own process: os.wait4 gives
    that one process's rusage (RUSAGE_CHILDREN would mix in every child this test session has had)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=err, cwd=cwd,
                                env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
        deadline = time.monotonic() + 120
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"{args} ran for more than 120 s")
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        err.seek(0)
        return proc.returncode, err.read().decode(), usage.ru_maxrss * 1024  # Linux counts kilobytes


@pytest.mark.parametrize("script", ["sample.py", "export_hf.py", "hellaswag.py"])
def test_a_huge_config_over_tiny_weights_is_refused_without_allocating(script, tmp_path):
    """A checkpoint of a few kilobytes whose model_config claims n_embd=4096 (1.6 GB of float32 weights; 2.4 GB
    with GPT-2's vocabulary): each script refuses it in one line naming the first weight that does not fit, and
    its peak memory stays far below the model's size (before, every script built the whole model first)."""
    gpt2 = script == "hellaswag.py"  # HellaSwag scores GPT-2 BPE models only
    small = GPTConfig(block_size=64, vocab_size=50304 if gpt2 else 96, n_layer=2, n_head=2, n_embd=16)
    huge = dataclasses.replace(small, n_embd=4096, n_head=32)
    meta = dict(tokenizer="gpt2", vocab_size=50257, eot=50256, itos=None, unk=None) if gpt2 else \
        dict(CHAR_META, itos=CHAR_ITOS[:90], vocab_size=90)
    torch.save(dict(model=GPT(small).state_dict(), model_config=dataclasses.asdict(huge), meta=meta, step=0,
                    settings={}), tmp_path / "huge.pt")
    example = dict(ind=0, activity_label="Cooking", ctx_a="A man cuts an onion.", ctx_b="he", label=0, split="val",
                   ctx="A man cuts an onion. he", endings=["cries.", "sings.", "runs.", "swims."], split_type="x",
                   source_id="x")
    (tmp_path / "val.jsonl").write_text(json.dumps(example) + "\n")
    extra = {"sample.py": ["--device=cpu"], "export_hf.py": [f"--out_dir={tmp_path}/hf"],
             "hellaswag.py": ["--device=cpu", f"--data_file={tmp_path}/val.jsonl"]}[script]
    start = time.monotonic()
    code, err, peak = run_measured(tmp_path, os.path.join(REPO, script), f"--checkpoint={tmp_path}/huge.pt", *extra)
    assert peak < 1_000_000_000, f"{script} peaked at {peak / 1e9:.2f} GB"
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path}/huge.pt: a GPT of train_gpt2.py whose weights do not fit") \
        and "transformer.wte.weight is" in err, err
    assert time.monotonic() - start < 60 and not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("script, args", [
    ("sample.py", ["--help"]), ("export_hf.py", ["--help"]), ("hellaswag.py", ["--help"]), ("sample.py", None)])
def test_a_closed_pipe_ends_quietly(script, args, run_dir):
    """`python sample.py ... | head`: the reader leaves early. Here it is gone before the script writes a byte (its
    imports take a second), so the write always meets a closed pipe: no BrokenPipeError traceback, exit 1."""
    args = args if args is not None else [f"--out_dir={run_dir}", "--device=cpu", "--max_new_tokens=20"]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 1 and err == "", err
