"""Export a train_gpt2.py checkpoint as a Hugging Face model folder that needs no custom code.

    python export_hf.py --checkpoint=out/ckpt_038146.pt --out_dir=hf/my-gpt
    python export_hf.py --checkpoint=out --out_dir=hf/my-gpt --dtype=bfloat16 --force=True  # newest in out/

    model = transformers.AutoModelForCausalLM.from_pretrained("hf/my-gpt")
    lm_eval --model hf --model_args pretrained=hf/my-gpt --tasks hellaswag

The architecture is chosen from the model's switches, and must match exactly:
    modern (rope, swiglu, rmsnorm, pre-norm)  LlamaForCausalLM (our RoPE pairs x[i] with
        x[i + hs/2]: Llama's rotate_half); with qk_norm=True Qwen3ForCausalLM (per-head q/k RMSNorm
        before RoPE); biases only without qk_norm
    classic (learned, gelu, layernorm, pre-norm, biases, 4x MLP)  GPT2LMHeadModel
Refused in one line: any other combination, train_lstm.py's recurrent models, weights that are not
finite, a GPTConfig field not known here yet. Tied or untied embeddings both work; the padded
vocabulary rows stay (config.json's vocab_size is the model's). The folder (config.json,
model.safetensors, generation_config.json; the tokenizer for GPT-2 BPE) replaces out_dir whole.
"""
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile

import torch

import data
import utils
from model import NORM_EPS, gpt_from_checkpoint

# -----------------------------------------------------------------------------
# settings (all overridable with --name=value)
checkpoint = ""      # a train_gpt2.py checkpoint file, or a run folder (its newest checkpoint); as given
out_dir = ""         # the Hugging Face model folder to write (relative: to the repo folder)
dtype = "float32"    # float32 | bfloat16: precision of the saved weights
force = False        # True = replace out_dir when it is not empty

CHOICES = dict(dtype=("float32", "bfloat16"))
# tiktoken's GPT-2 files (tiktoken_ext/openai_public.py), read from its cache or downloaded there
GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
EOT_TEXT = "<|endoftext|>"
# the GPTConfig fields hf_architecture and hf_config handle (dropout is exported as 0); a new switch
# is refused unless it has its default value: the exported model would silently lack it
HANDLED_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "pos_emb", "mlp",
                  "norm", "norm_pos", "qk_norm", "tie_embeddings", "bias", "dropout", "rope_base",
                  "mlp_hidden")
# our modules of each layer -> Llama's and Qwen3's: c_attn stacks q, k and v on its output dim,
# c_fc gate and up (gate first, as MLP.forward chunks it)
LLAMA_LAYER = {"ln_1": ["input_layernorm"], "ln_2": ["post_attention_layernorm"],
               "attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               "attn.c_proj": ["self_attn.o_proj"], "attn.q_norm": ["self_attn.q_norm"],
               "attn.k_norm": ["self_attn.k_norm"],
               "mlp.c_fc": ["mlp.gate_proj", "mlp.up_proj"], "mlp.c_proj": ["mlp.down_proj"]}


def check_settings(settings):
    for name in ("checkpoint", "out_dir"):
        utils.require(settings[name], f"--{name} is required (--help shows an example)")
    out = utils.in_repo(out_dir)
    utils.require(not os.path.exists(out) or os.path.isdir(out),
                  f"--out_dir={out_dir} is a file, not a folder")
    utils.require(force or not os.path.isdir(out) or not os.listdir(out),
                  f"--out_dir={out_dir} is not empty: choose another folder, "
                  f"or pass --force=True to replace it")


# -----------------------------------------------------------------------------
# the checkpoint, and which Hugging Face architecture computes it


def load_gpt(path):
    """(GPT, meta, checkpoint path) of a checkpoint file or of the newest one in a run folder."""
    if os.path.isdir(path):
        warn = functools.partial(print, file=sys.stderr)
        ckpt_path, ckpt = utils.load_latest_checkpoint(path, warn)
        if ckpt_path is None:
            raise SystemExit(f"error: --checkpoint={path}: no checkpoint (ckpt_*.pt) in that folder")
    else:
        ckpt_path, ckpt = path, utils.load_checkpoint(path)
    try:
        net = gpt_from_checkpoint(ckpt, "export_hf.py takes GPT checkpoints of train_gpt2.py")
    except ValueError as e:  # a hostile or damaged file, a NaN weight: named, nothing exported
        raise SystemExit(f"error: {ckpt_path}: {e}") from None
    return net, data.checkpoint_meta(ckpt, ckpt_path, net.config.vocab_size), ckpt_path


def hf_architecture(config):
    """'llama', 'qwen3' or 'gpt2'; a one-line exit naming the switches none of them matches."""
    unknown = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
               if f.name not in HANDLED_FIELDS and getattr(config, f.name) != f.default]
    if unknown:
        raise SystemExit(f"error: export_hf.py does not know how to export {', '.join(unknown)}: no "
                         f"Hugging Face architecture is known to compute it (teach HANDLED_FIELDS "
                         f"and hf_config about it, or train without it)")
    if config.pos_emb == "rope":
        name, family = ("qwen3", "Qwen3") if config.qk_norm else ("llama", "Llama")
        wanted = dict(mlp="swiglu", norm="rmsnorm", norm_pos="pre")
        if config.qk_norm:
            wanted["bias"] = False  # Qwen3 has attention biases but no MLP biases
    elif config.pos_emb == "learned":
        name, family = "gpt2", "GPT-2"
        wanted = dict(mlp="gelu", norm="layernorm", norm_pos="pre", bias=True, qk_norm=False)
    else:
        raise SystemExit(f"error: no Hugging Face architecture matches pos_emb={config.pos_emb!r}: "
                         f"Llama and Qwen3 need 'rope', GPT-2 needs 'learned'")
    wrong = [f"{k}={getattr(config, k)!r} ({family} needs {v!r})" for k, v in wanted.items()
             if getattr(config, k) != v]
    if name == "gpt2" and config.mlp_hidden_size != 4 * config.n_embd:
        wrong.append(f"mlp_hidden={config.mlp_hidden} "
                     f"(GPT-2 needs {4 * config.n_embd}, i.e. 4 x n_embd)")
    if wrong:
        raise SystemExit(f"error: no Hugging Face architecture matches this model: "
                         f"pos_emb={config.pos_emb!r} makes it {family}-like, but it has "
                         + ", ".join(wrong))
    return name


def hf_config(name, config, eot, precision):
    """The transformers config of architecture `name` computing exactly what GPT(config) does."""
    import transformers  # here: --help and the setting checks need no transformers
    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings,
                  bos_token_id=eot, eos_token_id=eot, dtype=precision)
    if name == "gpt2":
        return transformers.GPT2Config(
            n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
            n_positions=config.block_size, n_inner=4 * config.n_embd, layer_norm_epsilon=NORM_EPS,
            activation_function="gelu_new",  # the tanh approximation, as ours
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    cls = transformers.Qwen3Config if name == "qwen3" else transformers.LlamaConfig
    extra = {} if name == "qwen3" else dict(mlp_bias=config.bias)
    hf = cls(hidden_size=config.n_embd, intermediate_size=config.mlp_hidden_size,
             num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
             num_key_value_heads=config.n_head, head_dim=config.n_embd // config.n_head,
             hidden_act="silu", max_position_embeddings=config.block_size, rms_norm_eps=NORM_EPS,
             rope_parameters=dict(rope_type="default", rope_theta=config.rope_base),
             attention_bias=config.bias, **extra, **common)
    hf.rope_theta = config.rope_base  # beside rope_parameters: transformers 4.x reads only this
    return hf


def llama_state_dict(model):
    """Our modern GPT's weights under Llama/Qwen3 names (LLAMA_LAYER)."""
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}  # wte itself when tied
    for key, tensor in sd.items():
        if key.startswith("transformer.h."):
            _, _, i, rest = key.split(".", 3)  # transformer.h.3.attn.c_attn.weight
            module, _, kind = rest.rpartition(".")
            theirs = LLAMA_LAYER[module]
            for name, part in zip(theirs, tensor.chunk(len(theirs)), strict=True):
                out[f"model.layers.{i}.{name}.{kind}"] = part
    return out


# -----------------------------------------------------------------------------
# the GPT-2 tokenizer, and the folder, written whole or not at all


def gpt2_tokenizer(block_size):
    """A fast tokenizer that encodes exactly as tiktoken's gpt2; <|endoftext|> is its eos token."""
    import tiktoken.load
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    try:  # tiktoken's cache (TIKTOKEN_CACHE_DIR) holds each file under sha1(url), else it downloads
        encoder = tiktoken.load.read_file_cached(GPT2_FILES + "encoder.json", ENCODER_JSON_SHA256)
        bpe = tiktoken.load.read_file_cached(GPT2_FILES + "vocab.bpe", VOCAB_BPE_SHA256).decode()
    except Exception as e:  # offline: requests' ConnectionError deep inside tiktoken
        raise SystemExit(f"error: cannot load GPT-2's BPE files ({type(e).__name__}). Offline, set "
                         f"TIKTOKEN_CACHE_DIR to a folder where tiktoken has cached them") from None
    merges = [tuple(line.split()) for line in bpe.split("\n")[1:-1]]  # a version line first, "" last
    tokenizer = Tokenizer(models.BPE(vocab=json.loads(encoder), merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([EOT_TEXT])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=block_size,
                                   bos_token=EOT_TEXT, eos_token=EOT_TEXT, unk_token=EOT_TEXT,
                                   clean_up_tokenization_spaces=False)  # decode: the exact text


def write_folder(out, write_fn):
    """write_fn(folder) into a temporary folder beside `out` (where a symlinked `out` points), then
    renamed to `out`, an old `out` moved aside first and back if that fails; nothing left beside."""
    out = os.path.realpath(out)
    parent, tmp, old = os.path.dirname(out), None, None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp_{os.path.basename(out)}.")
        write_fn(tmp)
        for file in os.listdir(tmp):  # the usual permissions: mkdtemp and safetensors make 0600
            os.chmod(os.path.join(tmp, file), 0o666 & ~utils.UMASK)
        os.chmod(tmp, 0o777 & ~utils.UMASK)
        if os.path.isdir(out):  # empty, or --force
            old = tempfile.mkdtemp(dir=parent, prefix=f".old_{os.path.basename(out)}.")
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as e:
        message = f"error: cannot write {out}: {e.strerror or e}"
        if old is not None and not os.path.exists(out):  # moved aside: put it back
            try:
                os.replace(old, out)
            except OSError:
                message += f"; its previous content is in {old}"
                old = None  # kept
        raise SystemExit(message) from None
    finally:  # old: the replaced folder, or still the empty one mkdtemp made
        for folder in filter(None, (tmp, old)):
            shutil.rmtree(folder, ignore_errors=True)


def main(argv):
    settings = utils.apply_overrides(globals(), argv, CHOICES)
    check_settings(settings)
    try:
        import transformers
    except ImportError as e:  # before any work: the export cannot happen without it
        raise SystemExit(f"error: export_hf.py needs the transformers package ({e}): "
                         f"pip install transformers") from None
    model, meta, ckpt_path = load_gpt(checkpoint)
    name = hf_architecture(model.config)
    transformers.utils.logging.disable_progress_bar()
    eot = meta.get("eot")
    config = hf_config(name, model.config, eot, dtype)
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    weights = model.to_hf_state_dict() if name == "gpt2" else llama_state_dict(model)
    hf_model.load_state_dict(weights)  # strict: a weight left out or left over is a bug here
    tokenizer = gpt2_tokenizer(model.config.block_size) if meta.get("tokenizer") == "gpt2" else None

    def write(folder):
        hf_model.save_pretrained(folder)
        transformers.GenerationConfig(bos_token_id=eot, eos_token_id=eot).save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
            # a class transformers 4.x knows too (5 names its own): both load it from tokenizer.json
            path = os.path.join(folder, "tokenizer_config.json")
            with open(path) as f:
                tokenizer_config = dict(json.load(f), tokenizer_class="PreTrainedTokenizerFast")
            utils.atomic_write_json(path, tokenizer_config)

    out = utils.in_repo(out_dir)
    write_folder(out, write)
    print(f"exported {ckpt_path} as {type(hf_model).__name__} ({dtype}) to {out}")
    if tokenizer is None:
        print(f"no tokenizer saved: the model uses a {meta.get('tokenizer')} vocabulary, which "
              f"Hugging Face tokenizers do not provide; encode with data.encode and pass token ids")


if __name__ == "__main__":
    utils.run_script(main)
