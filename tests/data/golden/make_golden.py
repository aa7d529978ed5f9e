#!/usr/bin/env python3
"""Generate golden test data by running THUDM's ORIGINAL ChatGLM remote code.

This script contains no original code: it imports the original HF remote-code
files (modeling_chatglm.py, tokenization_chatglm.py, configuration_chatglm.py,
quantization.py) from folders given on the command line.  Each folder must
also hold the real tokenizer model and tokenizer_config.json of its release:

    v1 folder: chatglm-6b   files + ice_text.model  + tokenizer_config.json
    v2 folder: chatglm2-6b  files + tokenizer.model + tokenizer_config.json
    v3 folder: chatglm3-6b  files + tokenizer.model + tokenizer_config.json

It must run in a separate environment with the library versions the original
code was written for (see README.md next to this file):

    python make_golden.py --v1 ORIG/v1 --v2 ORIG/v2 --v3 ORIG/v3 \
        --out tests/data/golden
"""

import argparse
import copy
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys

import torch

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def load_original_package(alias, path):
    """Register `path` as a Python package called `alias` (the original files
    use relative imports such as `from .configuration_chatglm import ...`)."""
    spec = importlib.machinery.ModuleSpec(alias, None, is_package=True)
    pkg = importlib.util.module_from_spec(spec)
    pkg.__path__ = [os.path.abspath(path)]
    sys.modules[alias] = pkg

    def sub(name):
        return importlib.import_module(f"{alias}.{name}")

    return sub


def write_json(path, obj, compact=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if compact:  # one top-level key per line, arrays on one line
            f.write(
                "{\n"
                + ",\n".join(
                    f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False, separators=(',', ':'))}"
                    for k, v in obj.items()
                )
                + "\n}"
            )
        else:
            json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def rounded(t, nd=6):
    return [[round(float(x), nd) for x in row] for row in t.tolist()]


def safe(fn):
    try:
        return {"value": fn()}
    except Exception as e:  # record errors of the original code as data
        return {"error": f"{type(e).__name__}: {e}"}


TEXTS = [
    "你好世界，今天天气怎么样？",
    "Hello world! How are you doing today?",
    "ChatGLM是一个开源的对话语言模型，based on GLM架构。",
    "1234567890 3.1415",
    "a  b   c",
    "x" + " " * 10 + "y",
    "start" + " " * 81 + "end",
    "col1\tcol2\t\tcol3",
    "line1\nline2\n\nline4",
    "👋😀",
    "你好：世界！？，",
    "def f(x):\n    if x:\n        return x * 2\n    return 0\n",
    "hello <|user|> world",
    "  leading and trailing  ",
    "",
    "[gMASK] <sop> [MASK] sop text",
]

CHAT_HISTORY = [("问1", "答1"), ("问2", "答2")]
CHAT_QUERY = "你好"

TOOLS = [
    {
        "name": "track",
        "description": "追踪指定股票的实时价格",
        "parameters": {
            "type": "object",
            "properties": {"symbol": {"description": "需要追踪的股票代码"}},
            "required": ["symbol"],
        },
    }
]
TOOLS_SYSTEM = {
    "role": "system",
    "content": "Answer the following questions as best as you can. You have access to the following tools:",
    "tools": TOOLS,
}
V3_TOOL_HISTORY = [
    TOOLS_SYSTEM,
    {"role": "user", "content": "帮我追踪一下股票10111的价格"},
    {"role": "assistant", "metadata": "track", "content": " ```python\ntool_call(symbol='10111')\n```"},
    {"role": "observation", "content": '{"price": 12412}'},
]
V3_TOOL_QUERY = "他的价格是多少？"


def encode_texts(tok, n_special_prefix, n_special_suffix):
    rows = []
    for text in TEXTS:
        row = {"text": text}
        try:
            ids = tok.encode(text)
            row["ids"] = ids
            row["tokens"] = tok.convert_ids_to_tokens(ids)
            inner = ids[n_special_prefix : len(ids) - n_special_suffix]
            for key, seq in (("decoded", ids), ("decoded_text_ids", inner)):
                d = safe(lambda: tok.decode(seq))
                row[key] = d.get("value")
                if "error" in d:
                    row[key + "_error"] = d["error"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def batch_to_lists(enc):
    out = {}
    for k, v in enc.items():
        if hasattr(v, "tolist"):
            v = v.tolist()
        if hasattr(v, "dtype") or (isinstance(v, list) and v and hasattr(v[0], "tolist")):
            v = [x.tolist() for x in v]
        out[k] = v
    return out


# --------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------


def tokenizer_v1(mod_tok, path):
    tok = mod_tok.ChatGLMTokenizer.from_pretrained(path)
    res = {"class": "ChatGLMTokenizer", "vocab_size": tok.vocab_size}
    res["special_ids"] = {
        t: tok.convert_tokens_to_ids(t)
        for t in [
            "[MASK]",
            "[gMASK]",
            "[sMASK]",
            "<sop>",
            "<eop>",
            "</s>",
            "<pad>",
            "<unk>",
            "<n>",
            "<|tab|>",
            "<|blank_2|>",
            "<|blank_80|>",
        ]
    }
    res["special_ids"]["pad_token_id"] = tok.pad_token_id
    res["special_ids"]["bos_token_id"] = tok.bos_token_id
    res["special_ids"]["eos_token_id"] = tok.eos_token_id
    res["special_ids"]["gmask_token_id"] = tok.gmask_token_id
    res["special_ids"]["mask_token_id"] = tok.mask_token_id
    res["texts"] = encode_texts(tok, 0, 2)
    # chat prompt as built by the original ChatGLMForConditionalGeneration.chat()
    prompt = ""
    for i, (q, a) in enumerate(CHAT_HISTORY):
        prompt += f"[Round {i}]\n问：{q}\n答：{a}\n"
    prompt += f"[Round {len(CHAT_HISTORY)}]\n问：{CHAT_QUERY}\n答："
    enc = tok([prompt], return_tensors="pt")
    res["chat_prompts"] = [
        {
            "query": CHAT_QUERY,
            "history": CHAT_HISTORY,
            "prompt": prompt,
            "input_ids": enc["input_ids"][0].tolist(),
            "tokenizer_call_keys": sorted(enc.keys()),
            "encoded": batch_to_lists(enc),
        },
        {
            "query": CHAT_QUERY,
            "history": [],
            "prompt": CHAT_QUERY,
            "input_ids": tok([CHAT_QUERY], return_tensors="pt")["input_ids"][0].tolist(),
        },
    ]
    # padded batch (left padding, 2D position ids, bool mask) from the original _pad
    enc2 = tok(["你好", "Hello world, how are you"], padding=True, return_tensors="pt")
    res["padded_batch"] = {"texts": ["你好", "Hello world, how are you"], "encoded": batch_to_lists(enc2)}
    return tok, res


def tokenizer_v2(mod_tok, path):
    tok = mod_tok.ChatGLMTokenizer.from_pretrained(path)
    res = {"class": "ChatGLMTokenizer", "vocab_size": tok.vocab_size}
    res["special_ids"] = {
        t: tok.get_command(t) for t in ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<bos>", "<eos>", "<pad>"]
    }
    res["special_ids"]["pad_token_id"] = tok.pad_token_id
    res["special_ids"]["eos_token_id"] = tok.eos_token_id
    res["texts"] = encode_texts(tok, 2, 0)
    prompt = tok.build_prompt(CHAT_QUERY, history=CHAT_HISTORY)
    enc = tok([prompt], return_tensors="pt")
    prompt0 = tok.build_prompt(CHAT_QUERY, history=[])
    res["chat_prompts"] = [
        {
            "query": CHAT_QUERY,
            "history": CHAT_HISTORY,
            "prompt": prompt,
            "input_ids": enc["input_ids"][0].tolist(),
            "encoded": batch_to_lists(enc),
        },
        {
            "query": CHAT_QUERY,
            "history": [],
            "prompt": prompt0,
            "input_ids": tok([prompt0], return_tensors="pt")["input_ids"][0].tolist(),
        },
    ]
    enc2 = tok(["你好", "Hello world, how are you"], padding=True, return_tensors="pt")
    res["padded_batch"] = {"texts": ["你好", "Hello world, how are you"], "encoded": batch_to_lists(enc2)}
    res["decode_out_of_range"] = {"ids": [64793, 64794, 65000], **safe(lambda: tok.decode([64793, 64794, 65000]))}
    return tok, res


def tokenizer_v3(mod_tok, path):
    tok = mod_tok.ChatGLMTokenizer.from_pretrained(path)
    res = {
        "class": "ChatGLMTokenizer",
        "vocab_size": tok.vocab_size,
        "encode_special_tokens": getattr(tok, "encode_special_tokens", None),
    }
    res["special_ids"] = {
        t: tok.get_command(t)
        for t in [
            "[MASK]",
            "[gMASK]",
            "[sMASK]",
            "sop",
            "eop",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<bos>",
            "<eos>",
            "<pad>",
        ]
    }
    res["special_ids"]["pad_token_id"] = tok.pad_token_id
    res["special_ids"]["eos_token_id"] = tok.eos_token_id
    res["texts"] = encode_texts(tok, 2, 0)
    cases = [
        ("tools_system_history", V3_TOOL_QUERY, V3_TOOL_HISTORY, "user"),
        ("no_history", CHAT_QUERY, [], "user"),
        (
            "plain_history",
            CHAT_QUERY,
            [
                {"role": "user", "content": "问1"},
                {"role": "assistant", "content": "答1"},
                {"role": "user", "content": "问2"},
                {"role": "assistant", "content": "答2"},
            ],
            "user",
        ),
        ("observation_role", '{"price": 12412}', V3_TOOL_HISTORY[:3], "observation"),
    ]
    res["chat_prompts"] = []
    for name, query, history, role in cases:
        enc = tok.build_chat_input(query, history=copy.deepcopy(history), role=role)
        ids = enc["input_ids"][0].tolist()
        res["chat_prompts"].append(
            {
                "name": name,
                "query": query,
                "history": history,
                "role": role,
                "input_ids": ids,
                "encoded": batch_to_lists(enc),
                "decoded": tok.decode(ids),
            }
        )
    enc2 = tok(["你好", "Hello world, how are you"], padding=True, return_tensors="pt")
    res["padded_batch"] = {"texts": ["你好", "Hello world, how are you"], "encoded": batch_to_lists(enc2)}
    # decoding of out-of-range ids (padding rows of the 65024 embedding)
    res["decode_out_of_range"] = {"ids": [64797, 64798, 65000], **safe(lambda: tok.decode([64797, 64798, 65000]))}
    return tok, res


def process_response_samples_v3(mod_model):
    fn = mod_model.ChatGLMForConditionalGeneration.process_response  # uses no model state
    user_turn = {"role": "user", "content": "你好"}
    samples = [
        ("plain", "\n 你好👋！我是人工智能助手 ChatGLM3-6B，[[训练时间]]训练，很高兴见到你。 ", [user_turn]),
        (
            "tool_call",
            "track\n ```python\ntool_call(symbol='10111')\n```",
            [TOOLS_SYSTEM, {"role": "user", "content": "帮我追踪一下股票10111的价格"}],
        ),
        (
            "interpreter",
            "interpreter\n ```python\nimport math\nprint(math.sqrt(2))\n```",
            [
                {"role": "system", "content": "你是一位智能AI助手，你可以使用代码解释器。"},
                {"role": "user", "content": "计算根号2"},
            ],
        ),
        (
            "multi_segment",
            "track\n ```python\ntool_call(symbol='10111')\n```<|assistant|>\n 最终答案是 42。",
            [TOOLS_SYSTEM, {"role": "user", "content": "帮我追踪一下股票10111的价格"}],
        ),
    ]
    out = []
    for name, raw, history in samples:
        row = {"name": name, "output": raw, "history": history}
        try:
            content, new_history = fn(None, raw, copy.deepcopy(history))
            row["response"] = content
            row["new_history"] = new_history
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        out.append(row)
    return out


def process_response_samples_v1(mod_model):
    fn = mod_model.ChatGLMForConditionalGeneration.process_response
    raws = ["  你好,世界!今天是[[训练时间]]:晴天;对吗?  ", "Hello, world! a:b; c? ", "中文,English!混合?"]
    return [{"output": r, "response": fn(None, r)} for r in raws]


# --------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------


def init_uniform(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():  # shared (tied) tensors appear once
            p.uniform_(-0.5, 0.5)


def save_state_dict(model, folder, clone_keys=()):
    from safetensors.torch import save_file

    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if k in clone_keys:
            v = v.clone()
        sd[k] = v.contiguous()
    path = os.path.join(folder, "model.safetensors")
    save_file(sd, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)
    return sorted(sd.keys())


def tiny_v1(sub, out_dir):
    cfg_mod, mdl_mod = sub("configuration_chatglm"), sub("modeling_chatglm")
    config = cfg_mod.ChatGLMConfig(
        vocab_size=160,
        hidden_size=64,
        num_attention_heads=4,
        num_layers=2,
        inner_hidden_size=128,
        max_sequence_length=128,
        position_encoding_2d=True,
        layernorm_epsilon=1e-5,
        bos_token_id=150,
        eos_token_id=151,
        mask_token_id=152,
        gmask_token_id=153,
        pad_token_id=3,
        use_cache=True,
        torch_dtype="float32",
        architectures=["ChatGLMModel"],
    )
    torch.manual_seed(0)
    model = mdl_mod.ChatGLMForConditionalGeneration(config)  # params created as half, uninitialised
    model = model.float()
    model.tie_weights()  # lm_head <- transformer.word_embeddings (as from_pretrained does)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    init_uniform(model, 0)
    model.eval()

    folder = os.path.join(out_dir, "v1")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), config.to_dict())
    keys = save_state_dict(model, folder, clone_keys=("lm_head.weight",))

    input_ids = torch.tensor([[5, 17, 42, 99, 7, 153, 150, 20, 31, 44]])
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=False, return_dict=True)
        pos = model.get_position_ids(input_ids, mask_positions=[5], device="cpu", use_gmasks=[True])
        mask = model.get_masks(input_ids, device="cpu")
        gen_in = torch.tensor([[5, 17, 42, 99, 7, 153, 150]])
        gen_out = model.generate(
            gen_in, do_sample=False, max_new_tokens=20, output_scores=True, return_dict_in_generate=True
        )
        gen = gen_out.sequences
        scores = torch.stack([s[0] for s in gen_out.scores])  # [new_tokens, vocab], via the KV cache
    return {
        "config_note": "tiny random config, ORIGINAL field names; all params uniform(-0.5,0.5) seed 0; "
        "lm_head tied to transformer.word_embeddings (saved as a clone)",
        "state_dict_keys": keys,
        "input_ids": input_ids[0].tolist(),
        "position_ids": pos[0].tolist(),
        "attention_mask_true_is_masked": mask[0, 0].int().tolist(),
        "logits": rounded(out.logits[0]),
        "generate_input_ids": gen_in[0].tolist(),
        "generate_output_ids": gen[0].tolist(),
        "greedy_20": gen[0, gen_in.shape[1] :].tolist(),
        "greedy_scores": rounded(scores, 5),
    }


def build_v2(sub, pre_seq_len=None):
    cfg_mod, mdl_mod = sub("configuration_chatglm"), sub("modeling_chatglm")
    kw = dict(
        padded_vocab_size=128,
        hidden_size=64,
        ffn_hidden_size=96,
        kv_channels=16,
        num_attention_heads=4,
        multi_query_attention=True,
        multi_query_group_num=2,
        num_layers=2,
        seq_length=128,
        layernorm_epsilon=1e-5,
        rmsnorm=True,
        add_bias_linear=False,
        add_qkv_bias=True,
        apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True,
        post_layer_norm=True,
        original_rope=True,
        apply_residual_connection_post_layernorm=False,
        fp32_residual_connection=False,
        bias_dropout_fusion=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
        use_cache=True,
        tie_word_embeddings=False,
        architectures=["ChatGLMModel"],
    )
    if pre_seq_len is not None:
        kw.update(pre_seq_len=pre_seq_len, prefix_projection=False)
    config = cfg_mod.ChatGLMConfig(**kw)
    torch.manual_seed(0)
    model = mdl_mod.ChatGLMForConditionalGeneration(config)
    return config, model


def run_v2(model, input_ids):
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=False, return_dict=True)
        gen = model.generate(input_ids, do_sample=False, max_new_tokens=20)
    return out.logits[0], gen[0]


def tiny_v2(sub, out_dir):
    config, model = build_v2(sub)
    model = model.float()
    init_uniform(model, 0)
    model.eval()
    folder = os.path.join(out_dir, "v2")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), config.to_dict())
    keys = save_state_dict(model, folder)
    input_ids = torch.tensor([[1, 5, 17, 42, 99, 7, 20, 31]])
    logits, gen = run_v2(model, input_ids)
    res = {
        "config_note": "tiny random config, ORIGINAL field names; all params uniform(-0.5,0.5) seed 0",
        "state_dict_keys": keys,
        "input_ids": input_ids[0].tolist(),
        "logits": rounded(logits),
        "generate_output_ids": gen.tolist(),
        "greedy_20": gen[input_ids.shape[1] :].tolist(),
    }

    # P-Tuning v2 prefix variant: same base weights, prefix embedding uniform(-0.5,0.5) seed 1
    pconfig, pmodel = build_v2(sub, pre_seq_len=4)
    pmodel = pmodel.float()
    missing, unexpected = pmodel.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"transformer.prefix_encoder.embedding.weight"}, (missing, unexpected)
    torch.manual_seed(1)
    with torch.no_grad():
        pmodel.transformer.prefix_encoder.embedding.weight.uniform_(-0.5, 0.5)
    pmodel.eval()  # disables the Dropout(0.1) applied to the prefix
    pfolder = os.path.join(out_dir, "v2_prefix")
    os.makedirs(pfolder, exist_ok=True)
    write_json(os.path.join(pfolder, "config.json"), pconfig.to_dict())
    pkeys = save_state_dict(pmodel, pfolder)
    plogits, pgen = run_v2(pmodel, input_ids)
    pres = {
        "config_note": "v2 tiny weights + pre_seq_len 4, prefix_projection false; "
        "prefix_encoder.embedding uniform(-0.5,0.5) seed 1",
        "state_dict_keys": pkeys,
        "input_ids": input_ids[0].tolist(),
        "logits": rounded(plogits),
        "generate_output_ids": pgen.tolist(),
        "greedy_20": pgen[input_ids.shape[1] :].tolist(),
    }
    return res, pres


# --------------------------------------------------------------------------


def versions():
    import google.protobuf
    import numpy
    import safetensors
    import sentencepiece
    import tokenizers
    import transformers

    v = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "sentencepiece": sentencepiece.__version__,
        "numpy": numpy.__version__,
        "protobuf": google.protobuf.__version__,
        "safetensors": safetensors.__version__,
    }
    try:
        import accelerate

        v["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v1", required=True, help="folder with original chatglm-6b code + ice_text.model")
    ap.add_argument("--v2", required=True, help="folder with original chatglm2-6b code + tokenizer.model")
    ap.add_argument("--v3", required=True, help="folder with original chatglm3-6b code + tokenizer.model")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    torch.set_num_threads(2)

    subs = {g: load_original_package(f"orig_chatglm_{g}", getattr(args, g)) for g in ("v1", "v2", "v3")}

    tok_data = {"versions": versions()}
    _, tok_data["v1"] = tokenizer_v1(subs["v1"]("tokenization_chatglm"), args.v1)
    _, tok_data["v2"] = tokenizer_v2(subs["v2"]("tokenization_chatglm"), args.v2)
    _, tok_data["v3"] = tokenizer_v3(subs["v3"]("tokenization_chatglm"), args.v3)
    tok_data["v1"]["process_response"] = process_response_samples_v1(subs["v1"]("modeling_chatglm"))
    tok_data["v3"]["process_response"] = process_response_samples_v3(subs["v3"]("modeling_chatglm"))
    write_json(os.path.join(args.out, "tokenizer_ids.json"), tok_data)

    v1 = tiny_v1(subs["v1"], args.out)
    write_json(os.path.join(args.out, "v1", "logits.json"), v1, compact=True)
    v2, v2p = tiny_v2(subs["v2"], args.out)
    write_json(os.path.join(args.out, "v2", "logits.json"), v2, compact=True)
    write_json(os.path.join(args.out, "v2_prefix", "logits.json"), v2p, compact=True)
    print("v1 greedy_20:", v1["greedy_20"])
    print("v2 greedy_20:", v2["greedy_20"])
    print("v2_prefix greedy_20:", v2p["greedy_20"])


if __name__ == "__main__":
    main()
