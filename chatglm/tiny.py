"""Write a tiny random ChatGLM checkpoint in the original layout, for tests and as the demos' built-in model.

    python -m chatglm.tiny --version v3 --out DIR [--seed 0] [--format bin|safetensors] [--shards 2]

The directory gets config.json (original field names), sharded weights with their index, the tokenizer file
(a small SentencePiece model trained on the corpus shipped in chatglm/data) and tokenizer_config.json. The
same seed gives the same files. Its answers are random: it exists to exercise the real code paths.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile

import torch

from kernels.settings import settings

from .atomic import replacing_directory
from .config import ChatGLMConfig
from .loading import model_class, save_model

CORPUS = os.path.join(os.path.dirname(__file__), "data", "tiny_corpus.txt")
V1_CONTROL = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
V1_USER = ["<n>"] + ["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
AUTO_MAP_V1 = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}
AUTO_MAP_V2 = dict(AUTO_MAP_V1, AutoModelForCausalLM="modeling_chatglm.ChatGLMForConditionalGeneration")


def train_tokenizer(version: str, out_file: str, vocab_size: int = 600) -> None:
    """A small SentencePiece model with the same kinds of pieces as the real one of that generation."""
    import sentencepiece as spm

    model = io.BytesIO()
    common = dict(
        input=CORPUS,
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    if version == "v1":  # unigram, NFKC, <n>/<|tab|>/<|blank_N|> user symbols, GLM control tokens
        spm.SentencePieceTrainer.train(
            model_type="unigram", normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=V1_USER, control_symbols=V1_CONTROL,
            **common,
        )  # fmt: skip
    else:  # BPE, identity normalization, whitespace kept; specials are appended by the tokenizer
        spm.SentencePieceTrainer.train(
            model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, allow_whitespace_only_pieces=True, **common,
        )  # fmt: skip
    with open(out_file, "wb") as f:
        f.write(model.getvalue())


def tiny_config(version: str, vocab: dict[str, int] | None = None, sp_size: int = 0) -> ChatGLMConfig:
    if version == "v1":
        return ChatGLMConfig(
            _name_or_path="tiny-chatglm-6b", architectures=["ChatGLMModel"], auto_map=AUTO_MAP_V1,
            vocab_size=sp_size, hidden_size=64, num_attention_heads=4, num_layers=2, inner_hidden_size=128,
            max_sequence_length=2048, layernorm_epsilon=1e-5, position_encoding_2d=True,
            bos_token_id=vocab["<sop>"], eos_token_id=vocab["<eop>"], mask_token_id=vocab["[MASK]"],
            gmask_token_id=vocab["[gMASK]"], pad_token_id=vocab["<pad>"], torch_dtype="float32",
            chatglm_version="v1",
        )  # fmt: skip
    padded = (sp_size + 9 + 63) // 64 * 64  # room for the 9 special tokens, rounded like the release
    return ChatGLMConfig(
        _name_or_path=f"tiny-chatglm{version[1]}-6b", architectures=["ChatGLMModel"], auto_map=AUTO_MAP_V2,
        num_layers=2, padded_vocab_size=padded, hidden_size=64, ffn_hidden_size=128, kv_channels=16,
        num_attention_heads=4, seq_length=8192 if version == "v3" else 32768, multi_query_attention=True,
        multi_query_group_num=2, eos_token_id=2, pad_token_id=0, torch_dtype="float32", chatglm_version=version,
    )  # fmt: skip


def tokenizer_config(version: str) -> dict:
    cfg = {"name_or_path": f"tiny-chatglm{'' if version == 'v1' else version[1]}-6b", "remove_space": False,
           "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
           "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}  # fmt: skip
    if version == "v1":
        cfg.update(bos_token="<sop>", eos_token="<eop>", end_token="</s>", gmask_token="[gMASK]",
                   mask_token="[MASK]", pad_token="<pad>", unk_token="<unk>", num_image_tokens=0)  # fmt: skip
    return cfg


def make_tiny_checkpoint(out: str, version: str = "v3", seed: int = 0, fmt: str = "bin", shards: int = 2,
                         force: bool = False) -> str:  # fmt: skip
    """Write the checkpoint to `out` and return it. A directory that holds anything already is refused unless
    `force`, which replaces it whole; either way the checkpoint appears all at once (chatglm/atomic.py)."""
    if version not in ("v1", "v2", "v3"):
        raise ValueError(f"version must be v1, v2 or v3, got {version!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out!r} is a file, not a directory: choose a new directory")
    if os.path.exists(out) and os.listdir(out) and not force:
        raise FileExistsError(f"{out!r} is not empty: choose a new directory, or pass --force to replace it whole")
    here, target = os.path.realpath(os.getcwd()), os.path.realpath(out)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        raise ValueError(f"{out!r} holds the current directory: --force replaces it whole; choose a new directory")
    with replacing_directory(out, keep=lambda name: False) as tmp:
        _write_tiny(tmp, version, seed, fmt, shards)
    return out


def _write_tiny(out: str, version: str, seed: int, fmt: str, shards: int) -> None:
    import sentencepiece as spm

    tok_file = os.path.join(out, "ice_text.model" if version == "v1" else "tokenizer.model")
    train_tokenizer(version, tok_file)
    sp = spm.SentencePieceProcessor(model_file=tok_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    config = tiny_config(version, vocab, sp.vocab_size())
    torch.manual_seed(seed)
    model = model_class(config)(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    model._reset_buffers()
    save_model(model, out, num_shards=shards, safe_serialization=fmt == "safetensors")
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(version), f, indent=2, ensure_ascii=False)


def default_tiny_model(version: str = "v3") -> str:
    """The built-in model of the demos: built once into the user cache directory."""
    root = settings.model_cache
    out = os.path.join(root, f"tiny-{version}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root)
        _write_tiny(tmp, version, 0, "bin", 2)
        try:
            os.replace(tmp, out)  # atomic: a half-written model is never picked up
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chatglm.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", choices=["v1", "v2", "v3"], default="v3",
                        help="generation: v1 ChatGLM-6B, v2 ChatGLM2-6B, v3 ChatGLM3-6B (default v3)")  # fmt: skip
    parser.add_argument("--out", required=True, help="directory to write (new or empty; see --force)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (same seed, same files)")
    parser.add_argument("--format", choices=["bin", "safetensors"], default="bin",
                        help="weight file format (default bin, as the releases)")  # fmt: skip
    parser.add_argument("--shards", type=int, default=2, help="number of weight shards, with an index (default 2)")
    parser.add_argument("--force", action="store_true", help="replace OUT whole if it holds anything")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.exit(2, f"error: --shards must be at least 1, got {args.shards}\n")
    try:
        make_tiny_checkpoint(args.out, args.version, args.seed, args.format, args.shards, force=args.force)
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    shards = sum(name.endswith((".bin", ".safetensors")) for name in os.listdir(args.out))
    note = f" (as many as its tensors split into; {args.shards} asked)" if shards < args.shards else ""
    print(f"wrote a tiny random ChatGLM {args.version} checkpoint to {args.out}: {shards} weight shards{note}")


if __name__ == "__main__":
    main()
