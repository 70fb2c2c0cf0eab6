"""sample.py on checkpoints written by train_gpt2.py (tiny, char level) and on hand-built ones: the user's runs."""
import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
import torch

import sample
from model import GPT, GPTConfig

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


def test_checkpoint_without_meta_reads_its_data_folder(run_dir, tmp_path, capsys):
    """Checkpoints from before train_gpt2.py stored the tokenizer: meta.json from settings["data_dir"]."""
    ckpt = torch.load(os.path.join(run_dir, "ckpt_000003.pt"), weights_only=True)
    args = ["--prompt=ROMEO:", "--max_new_tokens=20", "--device=cpu"]
    sample_main(f"--checkpoint={run_dir}/ckpt_000003.pt", *args)
    with_meta = capsys.readouterr().out
    del ckpt["meta"]
    torch.save(ckpt, tmp_path / "old.pt")
    sample_main(f"--checkpoint={tmp_path}/old.pt", *args)
    assert capsys.readouterr().out == with_meta
    ckpt["settings"]["data_dir"] = str(tmp_path / "gone")
    torch.save(ckpt, tmp_path / "orphan.pt")
    with pytest.raises(SystemExit, match="does not record its tokenizer"):
        sample_main(f"--checkpoint={tmp_path}/orphan.pt", *args)


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
