"""export_hf.py: the exported folder, loaded by transformers (the independent reference), computes what our GPT does."""
import dataclasses
import errno
import importlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import export_hf
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

transformers = pytest.importorskip("transformers")

CHAR_META = dict(tokenizer="char", vocab_size=90, itos=[chr(32 + i) for i in range(90)], unk=None, eot=None)
GPT2_META = dict(tokenizer="gpt2", vocab_size=50257, eot=50256, itos=None, unk=None)
MODERN = dict(pos_emb="rope", mlp="swiglu", norm="rmsnorm", norm_pos="pre", bias=False)
CLASSIC = dict(pos_emb="learned", mlp="gelu", norm="layernorm", norm_pos="pre", bias=True)


def write_checkpoint(path, meta=CHAR_META, vocab_size=96, **switches):
    """A checkpoint shaped as train_gpt2.py writes it, of a tiny GPT whose every weight is random (norm gains
    and biases too), so a weight mapped to the wrong place changes the logits. Returns the model."""
    config = GPTConfig(**{**dict(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32), **switches})
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.dim() == 1 and name.endswith("weight")
            p.copy_(1 + 0.2 * torch.randn_like(p) if gain else 0.2 * torch.randn_like(p))
    torch.save(dict(model=model.state_dict(), model_config=dataclasses.asdict(config), meta=meta, step=3,
                    settings=dict(data_dir="data/somewhere")), path)
    return model.eval()


def export(*args):
    """export_hf.py's main in this process, with fresh settings (they are the module's globals)."""
    importlib.reload(export_hf).main(list(args))


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("switches, architecture", [
    (dict(MODERN), "LlamaForCausalLM"),
    (dict(MODERN, tie_embeddings=False, bias=True, rope_base=500.0, mlp_hidden=48), "LlamaForCausalLM"),
    (dict(MODERN, qk_norm=True), "Qwen3ForCausalLM"),
    (dict(CLASSIC), "GPT2LMHeadModel"),
    (dict(CLASSIC, tie_embeddings=False), "GPT2LMHeadModel"),
])
def test_logits_and_greedy_tokens_match(switches, architecture, tmp_path, one_thread):
    ours = write_checkpoint(tmp_path / "ckpt.pt", **switches)
    export(f"--checkpoint={tmp_path}/ckpt.pt", f"--out_dir={tmp_path}/hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "model.safetensors"]
    theirs = load_hf(tmp_path / "hf")
    assert type(theirs).__name__ == architecture
    assert theirs.config.vocab_size == 96 and theirs.config.tie_word_embeddings == ours.config.tie_embeddings
    idx = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = ours(idx, idx)  # with targets: the logits of every position
        assert (logits - theirs(idx).logits).abs().max() < 1e-4
    prompt = idx[:1, :8]
    ours_ids = ours.generate(prompt, 20, temperature=0)
    theirs_ids = theirs.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert ours_ids.tolist() == theirs_ids.tolist()


def test_bfloat16_weights(tmp_path, one_thread):
    ours = write_checkpoint(tmp_path / "ckpt.pt", tie_embeddings=False)
    export(f"--checkpoint={tmp_path}/ckpt.pt", f"--out_dir={tmp_path}/hf", "--dtype=bfloat16")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert theirs.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(theirs.lm_head.weight, ours.lm_head.weight.to(torch.bfloat16))
    q, _, _ = ours.transformer.h[1].attn.c_attn.weight.chunk(3)
    assert torch.equal(theirs.model.layers[1].self_attn.q_proj.weight, q.to(torch.bfloat16))


@pytest.mark.parametrize("switches, named", [
    (dict(MODERN, pos_emb="none"), "pos_emb='none'"),
    (dict(MODERN, mlp="gelu"), "mlp='gelu' (Llama needs 'swiglu')"),
    (dict(MODERN, norm="layernorm"), "norm='layernorm' (Llama needs 'rmsnorm')"),
    (dict(MODERN, norm_pos="post"), "norm_pos='post' (Llama needs 'pre')"),
    (dict(MODERN, qk_norm=True, bias=True), "bias=True (Qwen3 needs False)"),
    (dict(CLASSIC, mlp="relu2"), "mlp='relu2' (GPT-2 needs 'gelu')"),
    (dict(CLASSIC, qk_norm=True), "qk_norm=True (GPT-2 needs False)"),
    (dict(CLASSIC, bias=False), "bias=False (GPT-2 needs True)"),
    (dict(CLASSIC, mlp_hidden=64), "mlp_hidden=64 (GPT-2 needs 128"),
])
def test_unmatched_switches_are_named(switches, named, tmp_path):
    write_checkpoint(tmp_path / "ckpt.pt", **switches)
    with pytest.raises(SystemExit) as exit_info:
        export(f"--checkpoint={tmp_path}/ckpt.pt", f"--out_dir={tmp_path}/hf")
    message = str(exit_info.value.code)
    assert message.startswith("error: no Hugging Face architecture matches") and named in message, message
    assert "\n" not in message and not os.path.exists(tmp_path / "hf")


def test_out_dir_is_replaced_only_with_force(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    run.mkdir()
    write_checkpoint(run / "ckpt_000001.pt", mlp="swiglu", tie_embeddings=False)
    write_checkpoint(run / "ckpt_000002.pt", **CLASSIC)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        export(f"--checkpoint={run}", f"--out_dir={tmp_path}/hf")
    assert exit_info.value.code == 2 and "--force=True" in capsys.readouterr().err
    assert os.listdir(tmp_path / "hf") == ["notes.txt"]
    export(f"--checkpoint={run}", f"--out_dir={tmp_path}/hf", "--force=True")  # a folder: its newest checkpoint
    assert "notes.txt" not in os.listdir(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]  # no temporary folder left beside it
    assert type(load_hf(tmp_path / "hf")).__name__ == "GPT2LMHeadModel"  # ckpt_000002.pt, the classic one


def test_recurrent_checkpoint_is_refused(tmp_path):
    torch.save(dict(model={}, model_config=dict(model="context_vector")), tmp_path / "lstm.pt")
    with pytest.raises(SystemExit, match=r"context_vector\) of train_lstm.py"):
        export(f"--checkpoint={tmp_path}/lstm.pt", f"--out_dir={tmp_path}/hf")


def random_texts(n, seed=0):
    """Texts that stress a byte-level BPE: whitespace runs, newlines, tabs, unicode, contractions, specials."""
    rng = random.Random(seed)
    pieces = ["Hello", " world", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "'s", "'ll", " don't", "123",
              " 4.5", "é", "日本語", "🙂", "\u00a0", "<|endoftext|>", "!!", " ?", "ÅÄÖ", "\u200b", "x" * 30, " "]
    return [''.join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def test_gpt2_tokenizer_matches_tiktoken(gpt2_enc, tmp_path, one_thread):
    write_checkpoint(tmp_path / "ckpt.pt", meta=GPT2_META, vocab_size=50304, n_layer=1)
    export(f"--checkpoint={tmp_path}/ckpt.pt", f"--out_dir={tmp_path}/hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    fixed = ["Hello, I'm a language model,", "  two  spaces\n\n\nthree newlines   \t tab ",
             "unicode: héllo wörld 日本語 🙂", "a<|endoftext|>b <|endoftext|> c", "trailing   "]
    for text in fixed + random_texts(300):
        ids = tokenizer.encode(text)
        assert ids == gpt2_enc.encode(text, allowed_special="all"), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50256
    assert tokenizer.encode("Hello") == [15496]  # no prefix space: " Hello" would be 18435
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 50304 and config["eos_token_id"] == 50256  # padded rows kept
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 50256
    assert load_hf(tmp_path / "hf").model.embed_tokens.weight.shape == (50304, 32)


def test_gpt2_tokenizer_files_missing(tmp_path, monkeypatch):
    import tiktoken.load

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken.load, "read_file_cached", offline)
    write_checkpoint(tmp_path / "ckpt.pt", meta=GPT2_META, vocab_size=50304, n_layer=1)
    with pytest.raises(SystemExit, match="cannot load GPT-2's BPE files .* TIKTOKEN_CACHE_DIR"):
        export(f"--checkpoint={tmp_path}/ckpt.pt", f"--out_dir={tmp_path}/hf")
    assert not os.path.exists(tmp_path / "hf")


def test_without_transformers_one_line(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when not installed
    with pytest.raises(SystemExit) as exit_info:
        export(f"--checkpoint={tmp_path}/ckpt.pt", f"--out_dir={tmp_path}/hf")
    message = str(exit_info.value.code)
    assert message.startswith("error: export_hf.py needs the transformers package") and "\n" not in message
    assert message.endswith("pip install transformers") and not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_a_symlinked_out_dir_is_written_where_it_points(content, tmp_path, one_thread):
    """out_dir a link to a folder (empty, or replaced with --force): the folder it names gets the export, the link
    stays a link, and nothing is left beside either (before: a misleading error and an empty .old_* folder)."""
    write_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "models" / "real").mkdir(parents=True)
    if content:
        (tmp_path / "models" / "real" / content).write_text("old")
    os.symlink(tmp_path / "models" / "real", tmp_path / "link")
    export(f"--checkpoint={tmp_path}/ckpt.pt", f"--out_dir={tmp_path}/link", *(["--force=True"] if content else []))
    assert os.path.islink(tmp_path / "link") and os.path.realpath(tmp_path / "link") == str(tmp_path / "models/real")
    assert sorted(os.listdir(tmp_path / "models" / "real")) == ["config.json", "generation_config.json",
                                                               "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "link", "models"] and os.listdir(tmp_path / "models") == ["real"]
    assert type(load_hf(tmp_path / "link")).__name__ == "LlamaForCausalLM"


def test_a_symlink_to_nowhere_is_written_where_it_points(tmp_path, one_thread):
    write_checkpoint(tmp_path / "ckpt.pt")
    os.symlink(tmp_path / "models" / "new", tmp_path / "link")
    export(f"--checkpoint={tmp_path}/ckpt.pt", f"--out_dir={tmp_path}/link")
    assert "config.json" in os.listdir(tmp_path / "link") and os.listdir(tmp_path / "models") == ["new"]


def test_a_failed_replace_puts_the_old_folder_back(tmp_path, monkeypatch):
    """--force moves the old folder aside before renaming the new one in: if that rename fails, the old folder is
    put back and no temporary folder stays."""
    write_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    real_replace = os.replace

    def failing_rename_of_the_new_folder(src, dst):
        if os.path.basename(src).startswith(".tmp_hf.") and dst == str(tmp_path / "hf"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", failing_rename_of_the_new_folder)
    with pytest.raises(SystemExit, match="cannot write .*hf: No space left on device"):
        export(f"--checkpoint={tmp_path}/ckpt.pt", f"--out_dir={tmp_path}/hf", "--force=True")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "hf"] and os.listdir(tmp_path / "hf") == ["notes.txt"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused(bad, tmp_path):
    write_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["model"]["transformer.h.1.mlp.c_fc.weight"][3, 4] = bad
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as exit_info:
        export(f"--checkpoint={tmp_path}/ckpt.pt", f"--out_dir={tmp_path}/hf")
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {tmp_path}/ckpt.pt: ") and "transformer.h.1.mlp.c_fc.weight holds NaN or inf" \
        in message and "\n" not in message
    assert not os.path.exists(tmp_path / "hf")


def test_a_gptconfig_field_export_hf_does_not_know_is_refused(tmp_path, monkeypatch, one_thread):
    """A fork adds a switch to GPTConfig: a model that uses it is refused, naming it, until export_hf.py learns what
    it means; at its default the model is the plain one and exports."""
    import model

    @dataclasses.dataclass
    class Forked(model.GPTConfig):
        new_knob: int = 0  # a switch export_hf.py has never heard of

    monkeypatch.setattr(model, "GPTConfig", Forked)
    write_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.save(dict(ckpt, model_config=dict(ckpt["model_config"], new_knob=3)), tmp_path / "knob.pt")
    with pytest.raises(SystemExit) as exit_info:
        export(f"--checkpoint={tmp_path}/knob.pt", f"--out_dir={tmp_path}/hf")
    message = str(exit_info.value.code)
    assert message.startswith("error: export_hf.py does not know how to export new_knob=3") and "\n" not in message
    assert not os.path.exists(tmp_path / "hf")
    torch.save(dict(ckpt, model_config=dict(ckpt["model_config"], new_knob=0)), tmp_path / "plain.pt")
    export(f"--checkpoint={tmp_path}/plain.pt", f"--out_dir={tmp_path}/hf")
    assert type(load_hf(tmp_path / "hf")).__name__ == "LlamaForCausalLM"


def test_paths_follow_the_one_rule(tmp_path):
    """Run from another working directory: --checkpoint, a file you name, is read as given (relative to it);
    --out_dir, a folder setting, is relative to the repo folder."""
    work = tmp_path / "work"
    (work / "in").mkdir(parents=True)
    write_checkpoint(work / "in" / "ckpt.pt")
    out_dir = os.path.relpath(tmp_path / "hf", REPO)  # ../../tmp/...: from `work` that would be another folder
    result = subprocess.run([sys.executable, os.path.join(REPO, "export_hf.py"), "--checkpoint=in/ckpt.pt",
                             f"--out_dir={out_dir}"], capture_output=True, text=True, cwd=work, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert "config.json" in os.listdir(tmp_path / "hf") and sorted(os.listdir(work)) == ["in"]
