"""The real release tokenizers give the ids, texts and prompts THUDM's original code gives.

Expected values in tests/data/golden/tokenizer_ids.json were produced by running the original
tokenization_chatglm.py files (see tests/data/golden/README.md).
"""

import json

import pytest
import torch

from chatglm import load_tokenizer
from chatglm.generation import process_response

from .conftest import GOLDEN, real_model_dir

GOLD = json.loads((GOLDEN / "tokenizer_ids.json").read_text(encoding="utf-8"))
VERSIONS = ["v1", "v2", "v3"]


@pytest.fixture(scope="module", params=VERSIONS)
def real(request):
    return request.param, load_tokenizer(str(real_model_dir(request.param)))


def test_class_and_vocab(real):
    version, tok = real
    assert tok.chatglm_version == version
    assert tok.vocab_size == GOLD[version]["vocab_size"]
    assert len(tok) == tok.vocab_size


@pytest.mark.parametrize("idx", range(len(GOLD["v1"]["texts"])))
def test_encode_decode_match_original(real, idx):
    version, tok = real
    item = GOLD[version]["texts"][idx]
    assert tok.encode(item["text"]) == item["ids"]
    assert tok.decode(item["ids"]) == item["decoded"]


def test_special_token_ids(real):
    version, tok = real
    specials = GOLD[version]["special_ids"]
    for name, expected in specials.items():
        if name.endswith("_id"):
            assert getattr(tok, name) == expected, name
        elif version == "v1":
            assert tok.convert_tokens_to_ids(name) == expected, name
        else:
            assert tok.get_command(name) == expected, name


def test_literal_special_ids():
    # The spec's numbers, written out, so a wrong golden file cannot hide a wrong tokenizer.
    v1 = load_tokenizer(str(real_model_dir("v1")))
    assert [v1.convert_tokens_to_ids(t) for t in ["[MASK]", "[gMASK]", "<sop>", "<eop>", "<pad>"]] == [
        130000, 130001, 130004, 130005, 3,
    ]  # fmt: skip
    v3 = load_tokenizer(str(real_model_dir("v3")))
    roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert [v3.get_command(t) for t in ["[gMASK]", "sop", "eop"] + roles] == [64790, 64792, 64793] + list(
        range(64794, 64798)
    )
    assert v3.encode("你好") == [64790, 64792, 36474, 54591]


def test_chat_prompts(real):
    version, tok = real
    for case in GOLD[version]["chat_prompts"]:
        if version == "v3":
            ids = tok.build_chat_input(case["query"], history=case["history"], role=case["role"])["input_ids"]
            assert ids[0].tolist() == case["input_ids"], case["name"]
            assert tok.decode(case["input_ids"]) == case["decoded"], case["name"]
        else:
            history = [tuple(h) for h in case["history"]]
            prompt = tok.build_prompt(case["query"], history)
            assert prompt == case["prompt"]
            assert tok([prompt], return_tensors="pt")["input_ids"][0].tolist() == case["input_ids"]


def test_padded_batch_is_left_padded_like_original(real):
    version, tok = real
    gold = GOLD[version]["padded_batch"]
    enc = tok(gold["texts"], padding=True, return_tensors="pt")
    for key, expected in gold["encoded"].items():
        got = enc[key]
        if key == "attention_mask" and version == "v1":
            assert got.dtype == torch.bool
        assert got.tolist() == expected, key


def test_decode_out_of_range():
    for version in ("v2", "v3"):
        tok = load_tokenizer(str(real_model_dir(version)))
        case = GOLD[version]["decode_out_of_range"]
        if "error" in case:
            with pytest.raises(IndexError):
                tok.decode(case["ids"])
        else:
            assert tok.decode(case["ids"]) == case["value"]


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_process_response_matches_original(version):
    for case in GOLD[version]["process_response"]:
        if version == "v1":
            assert process_response("v1", case["output"]) == case["response"]
        else:
            if "error" in case:
                continue
            response, history = process_response("v3", case["output"], case["history"])
            assert response == case["response"], case["name"]
            assert history == case["new_history"], case["name"]


def test_v3_encode_special_tokens_splits_role_tokens():
    path = str(real_model_dir("v3"))
    plain = load_tokenizer(path)
    split = load_tokenizer(path, encode_special_tokens=True)
    text = "<|user|>你好"
    assert 64795 not in plain.encode(text)
    assert split.encode(text)[2] == 64795
    assert split.encode(text)[3:] == plain.encode("你好")[2:]
