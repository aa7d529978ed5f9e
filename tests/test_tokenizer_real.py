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


def _as_messages(version, case):
    """A golden chat prompt as the messages list apply_chat_template takes."""
    if version == "v3":
        return case["history"] + [{"role": case["role"], "content": case["query"]}]
    pairs = [
        m for q, r in case["history"] for m in ({"role": "user", "content": q}, {"role": "assistant", "content": r})
    ]
    return pairs + [{"role": "user", "content": case["query"]}]


def test_chat_template_gives_the_original_prompt_ids(real):
    """apply_chat_template = the ids THUDM's own prompt builders produced (the golden file), for every role."""
    version, tok = real
    assert tok.chat_template  # present though the release's tokenizer_config.json has none
    for case in GOLD[version]["chat_prompts"]:
        messages = _as_messages(version, case)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == case["input_ids"], case.get("name", case["query"])
        batch = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        assert batch["input_ids"][0].tolist() == case["input_ids"]


V3_HARD_HISTORY = [
    {"role": "system", "content": "你是助手 <b>&\"x\"\n第二行", "tools": [{"name": "track", "description": "追踪",
                                                                      "parameters": {"symbol": "str"}}]},
    {"role": "user", "content": "查一下 AAPL\n多行\n\n 文本  "},
    {"role": "assistant", "metadata": "track", "content": " ```python\ntool_call(symbol='AAPL')\n```"},
    {"role": "observation", "content": '{"price": 12.5}'},
    {"role": "assistant", "content": "AAPL 价格 12.5\n"},
]  # fmt: skip


@pytest.mark.parametrize("role", ["user", "observation", "system", "assistant"])
def test_v3_chat_template_equals_build_chat_input(role):
    tok = load_tokenizer(str(real_model_dir("v3")))
    for history in ([], V3_HARD_HISTORY):
        for query in ("你好", "  two\nlines\n", ""):
            expected = tok.build_chat_input(query, history=history, role=role)["input_ids"][0].tolist()
            messages = history + [{"role": role, "content": query}]
            assert tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == expected
            without = tok.apply_chat_template(messages, return_dict=False)
            assert without == expected[:-1]  # no generation prompt: no trailing <|assistant|>


def test_v3_chat_template_takes_tools_as_transformers_passes_them():
    tok = load_tokenizer(str(real_model_dir("v3")))
    tool = {"name": "track", "description": "追踪股票", "parameters": {"type": "object", "properties": {}}}
    system = {"role": "system", "content": "Answer the following questions as best as you can. You have access to "
              "the following tools:", "tools": [tool]}  # fmt: skip
    expected = tok.build_chat_input("hi", history=[system])["input_ids"][0].tolist()
    messages = [{"role": "user", "content": "hi"}]
    for tools in ([tool], [{"type": "function", "function": tool}]):
        assert tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=False) == expected


def test_chat_template_refuses_roles_the_format_lacks():
    for version in ("v1", "v2"):
        tok = load_tokenizer(str(real_model_dir(version)))
        with pytest.raises(Exception, match="user and assistant turns only"):
            tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}])
    tok = load_tokenizer(str(real_model_dir("v3")))
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}])


def test_decode_remembers_pieces_without_changing_the_text_or_the_errors(real):
    """Decoding remembers each id's piece (a stream decodes its reply whole at every token): the text is the one
    the ids' pieces give converted one by one, the second time too, and an id out of range still raises."""
    version, tok = real
    g = torch.Generator().manual_seed(7)
    size = tok.sp.vocab_size() if version != "v1" else tok.vocab_size
    ids = torch.randint(0, size, (300,), generator=g).tolist() + tok.encode(
        "你好，世界！\n  x = 1", add_special_tokens=False
    )
    kept = [t for t in ids if version != "v1" or t != tok.pad_token_id]  # v1 drops its pad ids first
    one_by_one = tok.convert_tokens_to_string([tok._convert_id_to_token(t) for t in kept])
    tok.__dict__.pop("_piece_cache", None)  # nothing remembered yet
    assert tok._decode_ids(ids) == one_by_one and tok._decode_ids(ids) == one_by_one  # cold, then remembered
    assert tok.decode(ids[:40]) == tok.decode(ids[:40])
    if version == "v2":
        for _ in range(2):
            with pytest.raises(IndexError):
                tok.decode([size + 100])


def test_stream_decoder_gives_the_whole_replys_text_at_every_token(real):
    """StreamDecoder decodes only the newest tokens of a growing reply; at every prefix of replies drawn from
    pieces that join across tokens (bytes of one character, "<n>" and "<|blank_12|>" written in pieces, " n't" and
    " ." for transformers' clean-up, spaces, special tokens) and from the whole vocabulary, it gives what decoding
    the whole prefix gives (None while that ends in a broken character); also when a reply is cut back."""
    from chatglm.generation import StreamDecoder

    version, tok = real
    size = tok.sp.vocab_size() if version != "v1" else tok.vocab_size
    pool = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in "好😀".encode()]
    for text in ["<", "n", ">", "<|", "blank", "_", "1", "2", "|>", "<n>", "<|blank_12|>", "<|tab|>", " n't", "'t",
                 " 's", " .", ".", " ,", " ", "  ", "\n", "你好", "x = 1", "'", "?"]:  # fmt: skip
        pool += tok.encode(text, add_special_tokens=False)
    pool += [t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None and t < size]
    g = torch.Generator().manual_seed(11)

    def want(ids):
        text = tok.decode(ids)
        return None if text.rstrip().endswith("\ufffd") else text

    for reply in range(6):
        picks = torch.randint(0, len(pool), (160,), generator=g).tolist()
        noise = torch.randint(0, size, (160,), generator=g).tolist()
        ids = [noise[i] if reply % 3 == 0 and i % 4 == 0 else pool[p] for i, p in enumerate(picks)]
        decode = StreamDecoder(tok)
        for n in range(len(ids) + 1):
            assert decode(ids[:n]) == want(ids[:n]), (version, reply, n)
        assert decode(ids[:50]) == want(ids[:50])  # cut back: decoded whole again
        assert decode(ids[:60]) == want(ids[:60])
        # several tokens at a time (a server's engine hands them over together): the newest whole text among them
        decode, n = StreamDecoder(tok), 0
        for jump in torch.randint(1, 6, (40,), generator=g).tolist():
            prev, n = n, min(n + jump, len(ids))
            got = decode(ids[:n])
            got = decode.longest_whole(ids[:n]) if got is None else got
            assert got == next((want(ids[:k]) for k in range(n, prev, -1) if want(ids[:k]) is not None), None)
