"""Sample text from a trained model: a checkpoint of train_gpt2.py or train_lstm.py, or GPT-2's own weights.

    python sample.py --out_dir=out --prompt="ROMEO:"           # the newest checkpoint in out/
    python sample.py --checkpoint=out/ckpt_000500.pt --prompt="ROMEO:" --num_samples=3 \\
        --max_new_tokens=200 --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --checkpoint=out/ckpt_000500.pt --prompt=FILE:prompt.txt
    python sample.py --checkpoint=gpt2 --prompt="Hello, I'm a language model,"   # needs transformers and the hub

Prompt and samples go through the tokenizer the model was trained with (GPT-2 BPE, char or word:
the data's meta.json, stored in every checkpoint). Each sample starts with the prompt and is
followed by a line of dashes; its control characters (an escape sequence, say) are printed escaped
(\\x1b), never raw to the terminal. The same seed gives the same text. A recurrent model of
train_lstm.py carries its state from token to token, so it has no context limit. --out_dir is
relative to the repo folder; the files you name (--checkpoint, a FILE: prompt) are read as given.
"""
import functools
import sys

import torch

import data
import utils
from model import GPT, SIZES, from_checkpoint

# -----------------------------------------------------------------------------
# settings (all overridable with --name=value)
checkpoint = ""        # a file (read as given) or gpt2 | gpt2-medium | gpt2-large | gpt2-xl; "" = newest in out_dir
out_dir = "out"        # a training run's folder (relative to the repo folder), read when --checkpoint is ""
prompt = "\n"          # the text every sample continues; FILE:path reads it from a file (the path as given)
num_samples = 3        # samples drawn, 1 to 1000: all in one batch, whose memory grows with it
max_new_tokens = 200   # tokens generated per sample, 1 to 100000
temperature = 0.8      # 0 = greedy, else 0.001 to 100; below 1 sharper, above 1 flatter than the model's
top_k = 200            # sample among the k likeliest tokens; 0 = among all
seed = 1337            # 0 to 2**63 - 1
device = ""            # "" = cuda, then mps, then cpu
dtype = ""             # "" = bfloat16 on GPUs with native bf16, float16 on older ones, bfloat16 on MPS, float32 on CPU

CHOICES = dict(dtype=utils.DTYPES)
MAXIMUM = dict(num_samples=1000, max_new_tokens=100_000)
# below 0.001, logits / temperature can overflow to inf (and NaN probabilities); 0 is greedy anyway.
# Above 100 every token is about as likely as any other: noise, not the model
TEMPERATURES = (1e-3, 100.0)
# GPT-2's own weights
GPT2_META = dict(tokenizer="gpt2", vocab_size=50257, eot=50256, itos=None, unk=None)
RULE = "-" * 15  # printed after every sample, as nanoGPT's sample.py does


def check_settings(settings):
    for name, most in MAXIMUM.items():
        utils.require(settings[name] >= 1, f"--{name} must be at least 1, got {settings[name]}")
        utils.require(settings[name] <= most, f"--{name} must be at most {most}, got {settings[name]}")
    low, high = TEMPERATURES
    utils.require(temperature == 0 or low <= temperature <= high,
                  f"--temperature must be 0 (greedy) or between {low} and {high:g}, got {temperature}")
    utils.require(top_k >= 0, f"--top_k must be >= 0 (0 = all tokens), got {top_k}")
    utils.require(0 <= seed < 2**63, f"--seed must be between 0 and 2**63 - 1, got {seed}")


# -----------------------------------------------------------------------------
# checkpoints


def load_model(name_or_path, folder):
    """(model, meta, what) for --checkpoint: GPT-2's weights by name, a file (as given), or the
    newest checkpoint in folder; a GPT or a recurrent model, on the CPU in eval mode."""
    if name_or_path in SIZES:
        try:
            return GPT.from_pretrained(name_or_path).eval(), GPT2_META, name_or_path
        except RuntimeError as e:  # no transformers, or offline without the hub's cache
            first_line = str(e).strip().splitlines()[0]
            raise SystemExit(f"error: --checkpoint={name_or_path}: {first_line}") from None
    if name_or_path:
        ckpt_path, ckpt = name_or_path, utils.load_checkpoint(name_or_path)
    else:
        warn = functools.partial(print, file=sys.stderr)  # stdout holds the samples only
        ckpt_path, ckpt = utils.load_latest_checkpoint(utils.in_repo(folder), warn)
        if ckpt_path is None:
            raise SystemExit(f"error: no checkpoint (ckpt_*.pt) in {utils.in_repo(folder)}: train "
                             f"with train_gpt2.py --out_dir={folder}, or name one with --checkpoint")
    try:
        net = from_checkpoint(ckpt)
    except ValueError as e:
        raise SystemExit(f"error: {ckpt_path}: {e}") from None
    return net, data.checkpoint_meta(ckpt, ckpt_path, net.config.vocab_size), ckpt_path


# -----------------------------------------------------------------------------
# the prompt and the samples


def read_prompt(text):
    if not text.startswith("FILE:"):
        return text
    path = text[len("FILE:"):]  # a file you name: as given
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


def main(argv):
    settings = utils.apply_overrides(globals(), argv, CHOICES)
    check_settings(settings)
    dev = utils.pick_device(device)
    device_type = dev.split(":")[0]
    precision = utils.pick_dtype(dtype, device_type)
    model, meta, source = load_model(checkpoint, out_dir)
    ids = encode_prompt(read_prompt(prompt), meta)
    if max(ids) >= model.config.vocab_size:  # a tiktoken encoding larger than the model's vocabulary
        raise SystemExit(f"error: {source}: its tokenizer {meta['tokenizer']!r} gives the prompt id "
                         f"{max(ids)}, past the model's {model.config.vocab_size} ids")

    torch.manual_seed(seed)
    generator = torch.Generator(device=dev).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    with utils.autocast_context(device_type, precision):
        out = model.to(dev).generate(idx, max_new_tokens,
                                     temperature=temperature, top_k=top_k or None,
                                     generator=generator, n_vocab=meta.get("vocab_size"))
    for row in out.tolist():
        print(data.printable(data.decode(row, meta)))
        print(RULE)


if __name__ == "__main__":
    utils.run_script(main)
