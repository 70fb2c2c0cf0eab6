"""Sample text from a trained GPT: a checkpoint of train_gpt2.py, or GPT-2's own weights.

    python sample.py --out_dir=out --prompt="ROMEO:"           # the newest checkpoint in out/
    python sample.py --checkpoint=out/ckpt_000500.pt --prompt="ROMEO:" --num_samples=3 \
        --max_new_tokens=200 --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --checkpoint=out/ckpt_000500.pt --prompt=FILE:prompt.txt
    python sample.py --checkpoint=gpt2 --prompt="Hello, I'm a language model,"   # needs transformers and the hub

The prompt is encoded and the samples decoded with the tokenizer the model was trained with (GPT-2
BPE, char or word: the data's meta.json, which train_gpt2.py stores in every checkpoint). The
samples are printed one after the other, each starting with the prompt and followed by a line of
dashes. The same seed gives the same text. Relative paths are relative to this file's folder, as in
train_gpt2.py.
"""
import os
import sys

import torch

import data
import utils
from model import GPT, SIZES, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# settings (all overridable with --name=value)
checkpoint = ""        # a file or gpt2 | gpt2-medium | gpt2-large | gpt2-xl; "" = newest in out_dir
out_dir = "out"        # a training run's folder, read when --checkpoint is ""
prompt = "\n"          # the text every sample continues; FILE:path reads it from a file
num_samples = 3        # samples drawn, all in one batch
max_new_tokens = 200   # tokens generated per sample
temperature = 0.8      # 0 = greedy; below 1 sharper, above 1 flatter than the model's distribution
top_k = 200            # sample among the k likeliest tokens; 0 = among all
seed = 1337
device = ""            # "" = cuda, then mps, then cpu
dtype = ""             # "" = bfloat16 autocast on GPUs (float16 without bf16), float32 on CPU

CHOICES = dict(dtype=utils.DTYPES)
# GPT-2's own weights
GPT2_META = dict(tokenizer="gpt2", vocab_size=50257, eot=50256, itos=None, unk=None)
RULE = "-" * 15  # printed after every sample, as nanoGPT's sample.py does


def resolve(path):
    return path if os.path.isabs(path) else os.path.join(HERE, path)


def check_settings(settings):
    for name in ("num_samples", "max_new_tokens"):
        utils.require(settings[name] >= 1, f"--{name} must be at least 1, got {settings[name]}")
    utils.require(temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    utils.require(top_k >= 0, f"--top_k must be >= 0 (0 = all tokens), got {top_k}")


# -----------------------------------------------------------------------------
# checkpoints (export_hf.py reads them through these functions too)


def load_gpt(ckpt, ckpt_path):
    """(GPT on the CPU in eval mode, meta) from a loaded train_gpt2.py checkpoint;
    a one-line exit otherwise."""
    config = ckpt.get("model_config") if isinstance(ckpt, dict) else None
    if isinstance(config, dict) and "model" in config:
        raise SystemExit(f"error: {ckpt_path} holds a recurrent model ({config['model']}) "
                         f"of train_lstm.py; sample.py and export_hf.py take GPT checkpoints "
                         f"of train_gpt2.py")
    if not isinstance(config, dict) or not isinstance(ckpt.get("model"), dict):
        raise SystemExit(f"error: {ckpt_path} is not a checkpoint of train_gpt2.py "
                         f"(no model and model_config)")
    try:
        model = GPT(GPTConfig(**config))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        # load_state_dict lists keys over several lines
        raise SystemExit(f"error: {ckpt_path}: its weights do not fit a GPT of its model_config "
                         f"({' '.join(str(e).split())[:300]})") from None
    return model.eval()


def checkpoint_meta(ckpt, ckpt_path):
    """The tokenizer description (data.py's meta.json) a checkpoint was trained with.
    Checkpoints written before train_gpt2.py stored it name their data folder, whose meta.json
    is read instead."""
    if ckpt.get("meta"):
        return ckpt["meta"]
    data_dir = (ckpt.get("settings") or {}).get("data_dir")
    if data_dir:
        meta = data.read_meta(resolve(data_dir))
        if meta:
            return meta
        if os.path.isdir(resolve(data_dir)):
            # llm.c's shards come without meta.json: GPT-2 BPE, as train_gpt2.py assumes
            return GPT2_META
    raise SystemExit(f"error: {ckpt_path} does not record its tokenizer and its data folder "
                     f"{data_dir!r} is not here to read meta.json from: sample from a checkpoint "
                     f"of the current train_gpt2.py, or put the data folder back")


def load_model(name_or_path, folder):
    """(GPT, meta, what) for --checkpoint: GPT-2's weights by name, a file,
    or the newest checkpoint in folder."""
    if name_or_path in SIZES:
        try:
            return GPT.from_pretrained(name_or_path).eval(), GPT2_META, name_or_path
        except RuntimeError as e:  # no transformers, or offline without the hub's cache
            first_line = str(e).strip().splitlines()[0]
            raise SystemExit(f"error: --checkpoint={name_or_path}: {first_line}") from None
    if name_or_path:
        ckpt_path = resolve(name_or_path)
        ckpt = utils.load_checkpoint(ckpt_path)
    else:
        ckpt_path, ckpt = utils.load_latest_checkpoint(resolve(folder))
        if ckpt_path is None:
            raise SystemExit(f"error: no checkpoint (ckpt_*.pt) in {resolve(folder)}: train with "
                             f"train_gpt2.py --out_dir={folder}, or name one with --checkpoint")
    return load_gpt(ckpt, ckpt_path), checkpoint_meta(ckpt, ckpt_path), ckpt_path


# -----------------------------------------------------------------------------
# the prompt


def read_prompt(text):
    if not text.startswith("FILE:"):
        return text
    path = resolve(text[len("FILE:"):])
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"error: {path}: cannot read the prompt file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise SystemExit(f"error: {path}: the prompt file is not UTF-8 text") from None


def encode_prompt(text, meta):
    """Token ids of the prompt. data.encode would map symbols outside a char/word vocabulary to its
    unknown id silently; they are an error here, naming them."""
    if meta.get("itos") is not None:
        known = set(meta["itos"])
        pieces = text if meta["tokenizer"] == "char" else text.split()
        missing = sorted({p for p in pieces if p not in known})
        kind = "characters" if meta["tokenizer"] == "char" else "words"
        shown = " ".join(repr(p) for p in missing[:20]) + (" ..." if len(missing) > 20 else "")
        utils.require(not missing, f"--prompt has {kind} the model's vocabulary lacks: {shown}")
    ids = data.encode(text, meta)
    utils.require(ids, f"--prompt={text!r} encodes to no tokens: give some text to continue")
    return ids


# -----------------------------------------------------------------------------


def main(argv):
    settings = utils.apply_overrides(globals(), argv, CHOICES)
    check_settings(settings)
    dev = utils.pick_device(device)
    device_type = dev.split(":")[0]
    precision = utils.pick_dtype(dtype, device_type)
    model, meta, _ = load_model(checkpoint, out_dir)
    ids = encode_prompt(read_prompt(prompt), meta)

    torch.manual_seed(seed)
    generator = torch.Generator(device=dev).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    with utils.autocast_context(device_type, precision):
        out = model.to(dev).generate(idx, max_new_tokens,
                                     temperature=temperature, top_k=top_k or None,
                                     generator=generator, n_vocab=meta.get("vocab_size"))
    for row in out.tolist():
        print(data.decode(row, meta))
        print(RULE)


if __name__ == "__main__":
    main(sys.argv[1:])
