"""openai_api.py's surface as vLLM serves it (issue 34): fields it does not honour refused by name, penalties,
logit_bias, logprobs, tool_choice, /v1/completions, /v1/models, --api-key and SSE keep-alive comments; driven
through TestClient and, for streaming with usage, a tool round trip and the API key, the official openai client
against a live server. Replies are greedy, so each is checked against the model run directly."""

from __future__ import annotations

import json
import threading

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

import openai_api  # noqa: E402
from chatglm.generation import generate_stream  # noqa: E402
from chatglm.sampling import ForcePrefix, LogitBias, LogprobRecorder, PresenceFrequencyPenalty  # noqa: E402

from .test_servers import TIMEOUT, TOOLS, Scripted, serve, sse_chunks  # noqa: E402

HELLO = [{"role": "user", "content": "你好"}]


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": HELLO, "temperature": 0, **body})


def stream(client, path, body):
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        return sse_chunks(r.iter_lines())


# --- the processors -------------------------------------------------------------------------------------------


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    proc = PresenceFrequencyPenalty(presence=0.5, frequency=0.25)
    scores = torch.zeros(1, 6)
    assert torch.equal(proc(torch.tensor([[1, 1, 2]]), scores.clone()), scores)  # the prompt: not counted
    out = proc(torch.tensor([[1, 1, 2, 3, 3, 4]]), scores.clone())  # generated: 3, 3, 4
    assert out[0].tolist() == [0, 0, 0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0]


def test_logit_bias_and_force_prefix():
    assert LogitBias({2: 5.0, 4: -100.0})(None, torch.zeros(1, 5))[0].tolist() == [0, 0, 5, 0, -100]
    force = ForcePrefix([[7, 8], [7, 9, 1], [3]])
    scores = torch.arange(10.0)[None]
    first = force(torch.tensor([[0, 0]]), scores.clone())
    assert torch.isfinite(first).all()  # finite: the original's nan/inf guard would reset the scores
    assert (first[0] > -100).nonzero().flatten().tolist() == [3, 7]
    assert (force(torch.tensor([[0, 0, 7]]), scores.clone())[0] > -100).nonzero().flatten().tolist() == [8, 9]
    assert torch.equal(force(torch.tensor([[0, 0, 7, 8]]), scores.clone()), scores)  # a whole name: free again


def test_logprob_recorder_settles_each_token_with_its_step():
    rec = LogprobRecorder(top=2)
    logits = [torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[3.0, 0.0, 0.0]])]
    rec(torch.tensor([[5]]), logits[0].clone())
    assert rec.entries(1) == []  # the token of step 1 is not known yet
    rec(torch.tensor([[5, 2]]), logits[1].clone())
    entries = rec.finish([2, 0])
    want = [row.log_softmax(-1)[0] for row in logits]
    assert [(t, round(lp, 5)) for t, lp, _ in entries] == [
        (2, round(float(want[0][2]), 5)),
        (0, round(float(want[1][0]), 5)),
    ]
    assert [t for t, _ in entries[0][2]] == [2, 1]


# --- fields -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"functions": [{"name": "f"}]}, "functions"), ({"response_format": {"type": "json_object"}}, "response_format"),
     ({"top_logprobs": 2}, "top_logprobs"), ({"logit_bias": {"x": 1}}, "logit_bias"),
     ({"logit_bias": {"5": 101}}, "logit_bias"), ({"presence_penalty": 3}, "presence_penalty"),
     ({"tool_choice": "required"}, "tool_choice")],
)  # fmt: skip
def test_fields_not_honoured_are_refused_by_name(tiny, extra, param):
    with TestClient(openai_api.create_app(*tiny["v3"])) as client:
        r = chat(client, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_accepted_fields_that_change_nothing(tiny):
    model, tok = tiny["v2"]
    with TestClient(openai_api.create_app(model, tok)) as client:
        plain = chat(client, max_tokens=8).json()["choices"][0]["message"]["content"]
        same = chat(client, max_tokens=8, user="u-1", response_format={"type": "text"}, parallel_tool_calls=False)
    assert same.status_code == 200 and same.json()["choices"][0]["message"]["content"] == plain


def test_penalties_and_logit_bias_change_the_reply_as_the_processors_do(tiny):
    model, tok = tiny["v2"]
    opts = {"presence_penalty": 1.5, "frequency_penalty": 2.0}
    want = model.chat(tok, "你好", [], do_sample=False, max_new_tokens=12,
                      logits_processor=[PresenceFrequencyPenalty(1.5, 2.0)])[0]  # fmt: skip
    plain = model.chat(tok, "你好", [], do_sample=False, max_new_tokens=12)[0]
    assert want != plain  # the penalties matter on this reply
    token = tok.encode("好", add_special_tokens=False)[-1]
    with TestClient(openai_api.create_app(model, tok)) as client:
        assert chat(client, max_tokens=12, **opts).json()["choices"][0]["message"]["content"] == want
        biased = chat(client, max_tokens=6, logit_bias={str(token): 100}, logprobs=True).json()["choices"][0]
    assert [e["token"] for e in biased["logprobs"]["content"]] == [
        tok.convert_ids_to_tokens(token).replace("▁", " ")
    ] * 6


# --- logprobs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_logprobs_are_the_models_own_and_stream_as_the_plain_answer(tiny, version):
    model, tok = tiny[version]
    with TestClient(openai_api.create_app(model, tok)) as client:
        r = chat(client, max_tokens=10, logprobs=True, top_logprobs=3).json()
        chunks = stream(client, "/v1/chat/completions", {"messages": HELLO, "temperature": 0, "max_tokens": 10,
                                                         "logprobs": True, "top_logprobs": 3, "stream": True})  # fmt: skip
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] - (r["choices"][0]["finish_reason"] == "stop")
    for e in content:  # greedy: each token is the most likely one, listed first among its top 3
        assert len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["logprob"] == e["logprob"] <= 0
        assert e["top_logprobs"][0]["token"] == e["token"] and bytes(e["bytes"]).decode("utf-8", "replace")
    # the first token's log-probability from the model's logits, computed here
    ids = model._chat_inputs(tok, version, "你好", [], "user", None)["input_ids"]
    with torch.inference_mode():
        first = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
    assert content[0]["logprob"] == pytest.approx(float(first.max()), abs=1e-4)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]  # fmt: skip
    # the same tokens; the same values up to rounding (the second request reuses the first one's kept prompt)
    assert [(e["token"], e["bytes"]) for e in streamed] == [(e["token"], e["bytes"]) for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-5)


# --- tool_choice ------------------------------------------------------------------------------------------------


def test_tool_choice_named_and_required_make_the_reply_start_with_a_tool_name(tiny):
    model, tok = tiny["v3"]
    tools = TOOLS + [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    with TestClient(openai_api.create_app(model, tok)) as client:
        for choice, names in (({"type": "function", "function": {"name": "get_time"}}, ["get_time"]),
                              ("required", ["get_weather", "get_time"])):  # fmt: skip
            r = chat(client, tools=tools, tool_choice=choice, max_tokens=12, logprobs=True).json()
            written = [i for e in r["choices"][0]["logprobs"]["content"] for i in e["bytes"]]
            first_line = bytes(written).decode("utf-8", "replace").lstrip().split("\n")[0]
            assert first_line in names, first_line
            calls = r["choices"][0]["message"].get("tool_calls") or []
            assert all(c["function"]["name"] in names for c in calls)
        bad = chat(client, tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"
    with TestClient(openai_api.create_app(*tiny["v2"])) as client:
        assert chat(client, tools=TOOLS, tool_choice="required").status_code == 400


# --- /v1/completions and /v1/models ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_completions_continue_the_raw_prompt(tiny, version):
    model, tok = tiny[version]
    prompt = "The capital of France is"
    ids = tok([prompt], return_tensors="pt")["input_ids"]
    out = None
    for out in generate_stream(model, ids, max_new_tokens=9, do_sample=False, eos_token_id=[-1]):  # noqa: B007
        pass
    new = out[0, ids.shape[1] :].tolist()
    with TestClient(openai_api.create_app(model, tok)) as client:
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 9, "temperature": 0}).json()
        body = {"prompt": [prompt], "max_tokens": 9, "temperature": 0, "stream": True, "echo": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        chunks = stream(client, "/v1/completions", body)
        lp = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 9, "temperature": 0,
                                                  "logprobs": 2}).json()  # fmt: skip
        lp_chunks = stream(client, "/v1/completions", {"prompt": prompt, "max_tokens": 9, "temperature": 0,
                                                       "logprobs": 2, "stream": True})  # fmt: skip
        two = client.post("/v1/completions", json={"prompt": ["a", "b"]})
        echo_lp = client.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 1})
    choice = r["object"], r["choices"][0]
    assert choice[0] == "text_completion" and r["usage"]["prompt_tokens"] == ids.shape[1]
    stops = {tok.eos_token_id} | ({tok.get_command("<|user|>"), tok.get_command("<|observation|>")}
                                  if version == "v3" else set())  # fmt: skip
    if new[-1] in stops:  # the reply ended on a stop token: not part of the text
        new = new[: new.index(new[-1])] if version != "v3" else new[:-1]
    assert choice[1]["text"] == tok.decode(new)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == prompt + r["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == r["usage"]
    logprobs = lp["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"])
    assert all(len(t) == 2 for t in logprobs["top_logprobs"])
    streamed = [c["choices"][0]["logprobs"] for c in lp_chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [o for c in streamed for o in c["text_offset"]] == logprobs["text_offset"]  # offsets run across chunks
    assert two.status_code == 400 and echo_lp.status_code == 400


def test_models_list_and_card(tiny):
    with TestClient(openai_api.create_app(*tiny["v3"])) as client:
        (card,) = client.get("/v1/models").json()["data"]
        assert card["id"] == "chatglm3-6b" and card["max_model_len"] == tiny["v3"][0].config.seq_length
        assert client.get("/v1/models/chatglm3-6b").json() == card
        assert client.get("/v1/models/other").status_code == 404


# --- API key and keep-alive -------------------------------------------------------------------------------------


def test_api_key_is_required_and_compared(tiny):
    openai = pytest.importorskip("openai")
    with TestClient(openai_api.create_app(*tiny["v2"], api_key="s3cret")) as client:
        assert client.get("/health").status_code == 200  # probes stay open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = client.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with serve(openai_api.create_app(*tiny["v2"], api_key="s3cret")) as url:
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", timeout=TIMEOUT, max_retries=0)
        assert [m.id for m in good.models.list()] == ["chatglm2-6b"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", timeout=TIMEOUT, max_retries=0).models.list()


class Slow:
    """The model, but its first step waits `delay` seconds (a long prefill)."""

    def __init__(self, model, delay):
        self._model, self.delay = model, delay

    def __getattr__(self, name):
        return getattr(self._model, name)

    def chat_steps(self, *args, **kwargs):
        threading.Event().wait(self.delay)
        yield from self._model.chat_steps(*args, **kwargs)


def test_streams_send_keep_alive_comments_while_waiting(tiny):
    model, tok = tiny["v2"]
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 4, "stream": True}
    with TestClient(openai_api.create_app(Slow(model, 0.6), tok, keepalive=0.1)) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = list(r.iter_lines())
    assert sum(line == ": keep-alive" for line in lines) >= 2
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    want = model.chat(tok, "你好", [], do_sample=False, max_new_tokens=4)[0]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in data if c["choices"]) == want


# --- the official client ----------------------------------------------------------------------------------------


def test_official_client_streams_usage_and_makes_a_tool_round_trip(tiny):
    openai = pytest.importorskip("openai")
    model, tok = tiny["v3"]
    scripted = Scripted(model, tok, "get_weather\n```python\ntool_call(city='北京')\n```")
    with serve(openai_api.create_app(scripted, tok, keepalive=0.05)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        messages = [{"role": "user", "content": "北京天气怎么样"}]
        first = client.chat.completions.create(model="chatglm3-6b", messages=messages, tools=TOOLS,
                                               tool_choice="auto", temperature=0)  # fmt: skip
        (call,) = first.choices[0].message.tool_calls
        assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "北京"}
        messages += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "晴，25度"}]
        chunks = list(client.chat.completions.create(model="chatglm3-6b", messages=messages, tools=TOOLS,
                                                     stream=True, stream_options={"include_usage": True},
                                                     logprobs=True, temperature=0))  # fmt: skip
        assert chunks[-1].usage is not None and chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens >= 1
        text = client.completions.create(model="chatglm3-6b", prompt="Hello", max_tokens=5, temperature=0)
        assert text.choices[0].text is not None and text.usage.completion_tokens <= 5
