"""Chat API, sampling and tool-call parsing on tiny models."""

import pytest
import torch

from chatglm.generation import (
    InvalidScoreLogitsProcessor,
    StreamDecoder,
    apply_repetition_penalty,
    parse_tool_call,
    process_response,
    warp,
)

VERSIONS = ["v1", "v2", "v3"]


@pytest.mark.parametrize("version", VERSIONS)
def test_greedy_chat_is_deterministic(tiny, version):
    model, tok = tiny[version]
    a = model.chat(tok, "你好", history=[], do_sample=False, max_length=80)
    b = model.chat(tok, "你好", history=[], do_sample=False, max_length=80)
    assert a == b
    response, history = a
    if version == "v3":
        assert history[0] == {"role": "user", "content": "你好"}
        assert history[-1]["role"] == "assistant"
    else:
        assert history == [("你好", response)]


@pytest.mark.parametrize("version", VERSIONS)
def test_stream_equals_non_stream(tiny, version):
    model, tok = tiny[version]
    history = [("问", "答")] if version != "v3" else [{"role": "user", "content": "问"}, {"role": "assistant",
                                                                                      "metadata": "", "content": "答"}]  # fmt: skip
    final = None
    seen = []
    torch.manual_seed(3)  # sampled, so the random tiny model says something printable
    for response, new_history in model.stream_chat(tok, "晚上睡不着应该怎么办", history=history, max_length=120):
        seen.append(response)
        final = (response, new_history)
        assert "\ufffd" != (response[-1:] if isinstance(response, str) else "")  # whole characters only
    torch.manual_seed(3)
    assert final == model.chat(tok, "晚上睡不着应该怎么办", history=history, max_length=120)
    assert len(seen) > 1


@pytest.mark.parametrize("version", VERSIONS)
def test_chat_steps_is_the_one_stream_under_stream_chat(tiny, version):
    """chat_steps yields every generated token (ids, the held-back raw text, its delta); stream_chat is the steps
    whose text grew, each run through process_response."""
    model, tok = tiny[version]
    torch.manual_seed(5)
    steps = list(model.chat_steps(tok, "晚上睡不着应该怎么办", [], max_length=100))
    torch.manual_seed(5)
    chats = list(model.stream_chat(tok, "晚上睡不着应该怎么办", [], max_length=100))
    grown = [s for s in steps if s.grew]
    assert len(chats) == max(1, len(grown)) and len(grown) > 1
    assert [len(s.ids) for s in steps] == list(range(1, len(steps) + 1))  # one step per generated token
    assert steps[0].prompt_tokens + len(steps) <= 100
    history = [{"role": "user", "content": "晚上睡不着应该怎么办"}] if version == "v3" else []
    assert chats[-1] == model._chat_result(version, grown[-1].text, "晚上睡不着应该怎么办", history, None, False)
    held = grown[-1].ids[:-1] if version == "v3" else grown[-1].ids  # v3 holds back its last token
    assert tok.decode(held) == grown[-1].text == steps[-1].text
    text = ""
    for s in steps:  # the deltas rebuild the text wherever it grew by appending
        assert text + s.delta == s.text or s.delta == ""
        text = s.text
    assert all(not s.text.rstrip().endswith("\ufffd") for s in steps)  # never half a character at the end


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_incremental_chat_with_past_key_values(tiny, version):
    model, tok = tiny[version]
    past, history = None, []
    for turn in ("你好", "再见"):
        for response, history, past in model.stream_chat(tok, turn, history=history, past_key_values=past,
                                                         return_past_key_values=True, do_sample=False,
                                                         max_length=60):  # fmt: skip
            pass
    assert len(history) == (2 if version == "v2" else 4)
    assert past[0][0].shape[2] > 60  # the cache holds both rounds


def test_v3_stops_on_role_tokens(tiny):
    model, tok = tiny["v3"]
    stop = tok.get_command("<|user|>")

    class ForceUserToken:  # a scripted model step: emit <|user|> at the third new token
        def __init__(self):
            self.n = 0

        def __call__(self, ids, scores):
            self.n += 1
            if self.n == 3:
                scores[:] = -1e9
                scores[:, stop] = 0
            return scores

    ids = tok.build_chat_input("你好")["input_ids"]
    out = model.generate(ids, do_sample=False, max_length=200, logits_processor=[ForceUserToken()],
                         eos_token_id=[2, stop, tok.get_command("<|observation|>")])  # fmt: skip
    assert out.shape[1] == ids.shape[1] + 3 and out[0, -1].item() == stop


def test_sampling_is_seeded_and_varies(tiny):
    model, tok = tiny["v2"]
    torch.manual_seed(1)
    a = model.chat(tok, "你好", max_length=60, temperature=1.5)[0]
    torch.manual_seed(1)
    b = model.chat(tok, "你好", max_length=60, temperature=1.5)[0]
    torch.manual_seed(2)
    c = model.chat(tok, "你好", max_length=60, temperature=1.5)[0]
    assert a == b and a != c


def test_max_new_tokens_and_eos(tiny):
    model, tok = tiny["v2"]
    ids = tok(["你好"], return_tensors="pt")["input_ids"]
    out = model.generate(ids, do_sample=False, max_new_tokens=5, eos_token_id=[-1])
    assert out.shape[1] == ids.shape[1] + 5
    first = out[0, ids.shape[1]].item()
    stopped = model.generate(ids, do_sample=False, max_new_tokens=5, eos_token_id=first)
    assert stopped.shape[1] == ids.shape[1] + 1


def test_bad_generation_arguments(tiny):
    model, tok = tiny["v2"]
    with pytest.raises(ValueError, match="beam"):
        model.chat(tok, "hi", num_beams=4)
    with pytest.raises(ValueError, match="temperature"):
        model.chat(tok, "hi", temperature=0)
    with pytest.raises(TypeError, match="unexpected"):
        model.generate(tok(["hi"], return_tensors="pt")["input_ids"], bogus=1)
    with pytest.raises(ValueError, match="ChatGLM3"):
        model.chat(tok, "hi", role="observation")


def test_warpers_match_definitions():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.isinf(warp(scores, top_k=2)[0, :2]).all() and torch.isfinite(warp(scores, top_k=2)[0, 2:]).all()
    probs = scores.softmax(-1)[0]  # [.032, .087, .237, .644]
    kept = torch.isfinite(warp(scores, top_p=0.8))[0].tolist()
    assert kept == [False, False, True, True] and probs[2:].sum() > 0.8
    assert torch.allclose(warp(scores, temperature=2.0), scores / 2)
    pen = apply_repetition_penalty(torch.tensor([[0, 3]]), torch.tensor([[-1.0, 2.0, 3.0, 4.0]]), 2.0)
    assert pen.tolist() == [[-2.0, 2.0, 3.0, 2.0]]
    bad = torch.tensor([[float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    fixed = InvalidScoreLogitsProcessor()(None, bad)
    assert fixed.argmax().item() == 5 and torch.isfinite(fixed).all()
    for value in (float("inf"), float("-inf")):  # the original's guard also takes infinities
        worse = torch.tensor([[1.0, value, 2.0, 3.0, 4.0, 0.0]])
        assert InvalidScoreLogitsProcessor()(None, worse).argmax().item() == 5
    fine = torch.tensor([[1.0, 9.0, 2.0, 3.0, 4.0, 0.0]])
    assert torch.equal(InvalidScoreLogitsProcessor()(None, fine.clone()), fine)  # untouched when all finite


def test_stream_decoder_holds_back_partial_characters(tiny):
    _, tok = tiny["v2"]
    decode = StreamDecoder(tok)
    byte_ids = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in "好".encode()]
    assert decode(byte_ids[:2]) is None
    assert decode(byte_ids) == "好"


@pytest.mark.parametrize(
    "code, expected",
    [
        ("tool_call(symbol='10111')", {"symbol": "10111"}),
        (
            'tool_call(a=1, b=[1, {"x": (2, 3)}], c=None, d=-2.5)',
            {"a": 1, "b": [1, {"x": (2, 3)}], "c": None, "d": -2.5},
        ),
        ("tool_call(text='it\\'s \"quoted\"\\nnew line')", {"text": 'it\'s "quoted"\nnew line'}),
        ("tool_call()", {}),
    ],
)
def test_parse_tool_call_accepts_literals(code, expected):
    assert parse_tool_call(code) == expected


@pytest.mark.parametrize(
    "code",
    [
        "__import__('os').system('echo pwned')",
        "tool_call(x=__import__('os').system('echo pwned'))",
        "tool_call(x=open('/etc/passwd').read())",
        "tool_call(x=os.environ)",
        "tool_call(**{'a': 1})",
        "tool_call(1, 2)",
        "tool_call(x=[i for i in range(3)])",
        "tool_call(x=1); import os",
        "other(x=1)",
        "tool_call(x=lambda: 1)",
    ],
)
def test_parse_tool_call_rejects_code(code, capfd):
    with pytest.raises(ValueError):
        parse_tool_call(code)
    assert "pwned" not in capfd.readouterr().out


def test_v3_tool_call_response_is_parsed_without_eval():
    history = [{"role": "system", "content": "tools", "tools": [{"name": "track"}]}, {"role": "user", "content": "q"}]
    out = "track\n ```python\ntool_call(symbol='10111')\n```"
    response, new_history = process_response("v3", out, history)
    assert response == {"name": "track", "parameters": {"symbol": "10111"}}
    hostile = "track\n ```python\ntool_call(x=__import__('os').getcwd())\n```"
    response, _ = process_response("v3", hostile, history)
    assert response["name"] == "track" and "parameters" not in response
    assert new_history[-1]["metadata"] == "track"
