"""composite_demo/: tool-call parsing (hostile inputs included), the registry and built-in tools, the tool and
code-interpreter loops (a scripted model double, and once the tiny ChatGLM3), the real Jupyter kernel, and the
Streamlit page with AppTest in each mode plus one real-browser screenshot."""

import ast
import datetime
import json
import os
import socket
import sys
import time
from typing import Annotated

import pytest

from chatglm.generation import parse_tool_call, process_response
from chatglm.sampling import ForceTokens
from composite_demo import agent, code_kernel, tools
from composite_demo.agent import Mode
from composite_demo.client import Client, set_client_factory
from composite_demo.conversation import Message, Role, extract_code, from_history, to_history
from composite_demo.demonstration import CHAT_REPLY, NOTICE, DemonstrationClient
from composite_demo.tool_registry import REGISTRY, ToolCallError, ToolRegistry, dump_tool_list, load_tool_list
from kernels.settings import settings

from .composite_double import ScriptedModel, tool_then_answer
from .conftest import REPO
from .test_web_demos import browser  # noqa: F401 - the headless Chromium fixture

GEN = {"top_p": 0.8, "temperature": 0.95, "repetition_penalty": 1.1, "max_new_tokens": 32}
PLOT = "import matplotlib.pyplot as plt\nplt.plot([0, 1, 2], [0, 1, 4])\nplt.title('squares')\nplt.show()"


@pytest.fixture(scope="module")
def tok(tiny_dirs):
    import chatglm

    return chatglm.load_tokenizer(str(tiny_dirs["v3"]))


@pytest.fixture(scope="module")
def kernel():
    """One real Jupyter kernel shared by this module's tests, always shut down."""
    k = code_kernel.CodeKernel(timeout=30)
    try:
        yield k.start()
    finally:
        k.close()
    assert not os.path.exists(k.workdir)


def scripted(tok, reply):
    model = ScriptedModel(tok, reply)
    return model, Client(model, tok)


# --- tool-call parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, expected",
    [
        ("tool_call(seed=42, range=(1, 100))", {"seed": 42, "range": (1, 100)}),
        ("tool_call()", {}),
        ('tool_call(a={"x": [1, 2.5, {"y": (3, None)}], "z": {True, False}}, b=-7, c=1e-3, d=b"ok")',
         {"a": {"x": [1, 2.5, {"y": (3, None)}], "z": {True, False}}, "b": -7, "c": 1e-3, "d": b"ok"}),
        ("tool_call(text='he said \"hi\"\\nand \\'bye\\'', raw=r'C:\\temp')",
         {"text": "he said \"hi\"\nand 'bye'", "raw": "C:\\temp"}),
        ('tool_call(doc="""line one\nline two "quoted" \'single\'""", cjk="北京")',
         {"doc": "line one\nline two \"quoted\" 'single'", "cjk": "北京"}),
        ("\n  tool_call(\n    city_name = 'Beijing',\n  )\n", {"city_name": "Beijing"}),
    ],
)  # fmt: skip
def test_tool_call_parsing_accepts_literal_keyword_arguments(code, expected):
    assert parse_tool_call(code) == expected


def hostile_calls(sentinel):
    touch = f"__import__('pathlib').Path({str(sentinel)!r}).touch()"
    return [
        f"__import__('os').system('touch {sentinel}')",
        f"tool_call(x=__import__('os').system('touch {sentinel}'))",
        f"tool_call(x={touch})",
        "tool_call(x=os.environ)",
        "tool_call(x=().__class__.__bases__[0].__subclasses__())",
        "tool_call(x=open('/etc/passwd').read())",
        "tool_call(x=(lambda: 1)())",
        "tool_call(x=[i for i in range(10**9)])",
        "tool_call(x=f'{__import__(\"os\")}')",
        "tool_call(x=10**10**10)",
        "tool_call(x=1 if True else 2)",
        "tool_call(x=a)",
        "tool_call(**{'x': 1})",
        "tool_call(1, 2)",
        "other_function(x=1)",
        "tool_call.__globals__",
        f"tool_call(x=1); {touch}",
        f"tool_call(x=1)\n{touch}",
        "tool_call(x=(yield))",
        "tool_call(x=1",
    ]


def test_tool_call_parsing_rejects_hostile_input_without_running_it(tmp_path):
    sentinel = tmp_path / "pwned"
    for code in hostile_calls(sentinel):
        t0 = time.monotonic()
        with pytest.raises(ValueError):
            parse_tool_call(code)
        assert time.monotonic() - t0 < 1, code
    assert not sentinel.exists()


def test_hostile_tool_calls_from_the_model_are_refused_end_to_end(tok, tmp_path):
    """Through the model's process_response and the tool loop: an error observation, nothing executed."""
    sentinel = tmp_path / "pwned"
    system = {"role": "system", "content": "tools", "tools": REGISTRY.active().schemas()}
    for code in hostile_calls(sentinel):
        response, _ = process_response("v3", f"calculator\n```python\n{code}\n```", [system])
        assert set(response) == {"name", "content"}, code  # not parsed into parameters
        model, client = scripted(tok, tool_then_answer("calculator", code))
        messages = [Message(Role.USER, "go")]
        list(agent.run(client, messages, Mode.TOOL, GEN, registry=REGISTRY.active()))
        assert [m.role for m in messages] == [Role.USER, Role.TOOL, Role.OBSERVATION, Role.ASSISTANT]
        assert messages[2].content.startswith("Error: the call to calculator could not be read"), code
    assert not sentinel.exists()


# --- the registry -------------------------------------------------------------------------------------------


def make_registry():
    registry = ToolRegistry()

    @registry.register
    def book(
        city: Annotated[str, "Where to", True],
        nights: Annotated[int, "How many nights", True],
        budget: Annotated[float, "Per night", False] = 100.0,
        pair: Annotated[tuple[int, str], "A number and a word", False] = (1, "a"),
        tags: Annotated[list[str], "Labels", False] = None,
        extra: Annotated[dict, "Anything else", False] = None,
        smoking: bool = False,
    ):
        """Book a hotel.

        Returns the booking."""
        return {"city": city, "nights": nights, "budget": budget, "pair": pair, "smoking": smoking}

    @registry.register(name="boom")
    def explode(x: Annotated[int, "anything", True]):
        """Always fails."""
        raise RuntimeError(f"kaput {x}")

    @registry.register(opt_in=True)
    def secret():
        """Only when enabled."""
        return "s"

    return registry


def test_register_tool_builds_the_schema_from_name_docstring_and_annotations():
    registry = make_registry()
    book = registry.get("book").schema()
    assert book == {
        "name": "book",
        "description": "Book a hotel. Returns the booking.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "Where to"},
                "nights": {"type": "integer", "description": "How many nights"},
                "budget": {"type": "number", "description": "Per night"},
                "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                         "minItems": 2, "maxItems": 2, "description": "A number and a word"},
                "tags": {"type": "array", "items": {"type": "string"}, "description": "Labels"},
                "extra": {"type": "object", "description": "Anything else"},
                "smoking": {"type": "boolean"},
            },
            "required": ["city", "nights"],
        },
    }  # fmt: skip
    rng = REGISTRY.get("random_number_generator").schema()["parameters"]
    assert rng["required"] == ["seed", "range"]
    assert rng["properties"]["range"] == {"type": "array", "items": {"type": "integer"}, "minItems": 2,
                                          "maxItems": 2, "description": "The range of the generated numbers"}  # fmt: skip
    assert [t["name"] for t in registry.schemas()] == ["book", "boom", "secret"]
    assert [t["name"] for t in registry.active().schemas()] == ["book", "boom"]
    assert [t["name"] for t in registry.active({"secret"}).schemas()] == ["book", "boom", "secret"]
    json.dumps(REGISTRY.schemas())  # the prompt serialises them
    with pytest.raises(TypeError, match="docstring"):
        registry.register(lambda x: x)


def test_dispatch_validates_against_the_schema_before_calling():
    registry = make_registry()
    ok = json.loads(registry.dispatch("book", {"city": "Paris", "nights": 2, "pair": [3, "b"]}))
    assert ok == {"city": "Paris", "nights": 2, "budget": 100.0, "pair": [3, "b"], "smoking": False}
    assert registry.dispatch("book", {"city": "Paris", "nights": 2, "budget": 80})  # an int is a JSON number
    refused = {
        "no tool named 'nope'": ("nope", {}),
        "missing the required parameter(s) nights": ("book", {"city": "Paris"}),
        "no parameter(s) color": ("book", {"city": "Paris", "nights": 1, "color": "red"}),
        "'nights' must be of type integer, got str": ("book", {"city": "Paris", "nights": "2"}),
        "'nights' must be of type integer, got bool": ("book", {"city": "Paris", "nights": True}),
        "'city' must be of type string": ("book", {"city": ["Paris"], "nights": 1}),
        "'pair'[1] must be of type string": ("book", {"city": "P", "nights": 1, "pair": (1, 2)}),
        "'pair' must have 2 items": ("book", {"city": "P", "nights": 1, "pair": (1, "a", 3)}),
        "'tags'[0] must be of type string": ("book", {"city": "P", "nights": 1, "tags": [1]}),
        "'smoking' must be of type boolean": ("book", {"city": "P", "nights": 1, "smoking": "yes"}),
        "no tool named 'secret'": ("secret", {}),
    }
    active = registry.active()
    for message, (name, params) in refused.items():
        out = active.dispatch(name, params)
        assert out.startswith("Error: ") and message in out, (message, out)
    assert registry.dispatch("boom", {"x": 1}) == "Error: boom failed: RuntimeError: kaput 1"
    with pytest.raises(ToolCallError):
        registry.get("book").validate([1, 2])


def test_manual_mode_tool_list_reads_yaml_and_json():
    tools_yaml = dump_tool_list(REGISTRY.active().schemas())
    assert load_tool_list(tools_yaml) == REGISTRY.active().schemas()
    assert load_tool_list('[{"name": "track", "description": "x", "when": 2024-01-01}]') == [
        {"name": "track", "description": "x", "when": "2024-01-01"}
    ]
    assert load_tool_list("name: one") == [{"name": "one"}]
    assert load_tool_list("  ") == []
    for bad in ["[1, 2]", "- description: no name", "{unclosed", "!!python/object:os.system {}"]:
        with pytest.raises(ValueError):
            load_tool_list(bad)


# --- the built-in tools -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, value",
    [("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2 ** 10", 1024), ("-3 ** 2", -9), ("7 // 2", 3), ("7 % 4", 3),
     ("1 / 4", 0.25), ("sqrt(16) + abs(-2)", 6.0), ("round(pi, 3)", 3.142), ("factorial(5)", 120),
     ("max(1, 5, 3) - min(4, 2)", 3), ("2 ** -1", 0.5), ("3 × 4 ÷ 2", 6.0), ("log(e)", 1.0),
     ("2 ** 4000 // 2 ** 3999", 2)],
)  # fmt: skip
def test_calculator_computes_arithmetic(expression, value):
    assert tools.calculate(expression) == pytest.approx(value)
    assert REGISTRY.dispatch("calculator", {"expression": expression}) == str(tools.calculate(expression))


def test_calculator_is_safe_and_bounded(tmp_path):
    sentinel = tmp_path / "pwned"
    hostile = [
        f"__import__('os').system('touch {sentinel}')", "().__class__.__bases__", "open('/etc/passwd')",
        "x", "lambda: 1", "[1, 2]", "'a' * 10", "sqrt.__self__", "eval('1')", "exp(x=1)",
        "9 ** 9 ** 9", "10 ** 10 ** 10", "2 ** 5000", "factorial(100000)", "1e308 * 10 ** 400",
        "2.0 ** 100000", "(-8) ** (1 / 3)", "1 / 0", "5 % 0", "sqrt(-1)", "log(0)", "2 ^ 3", "1 +", "",
        "(" * 300 + "1" + ")" * 300, "1" * 600, "True + 1", "1 if 1 else 2", "sqrt(*[4])",
    ]  # fmt: skip
    for expression in hostile:
        t0 = time.monotonic()
        out = REGISTRY.dispatch("calculator", {"expression": expression})
        assert out.startswith("Error: "), (expression, out)
        assert time.monotonic() - t0 < 1, expression
    assert "write **" in REGISTRY.dispatch("calculator", {"expression": "2 ^ 3"})
    assert not sentinel.exists()


def test_random_number_generator_is_reproducible_and_in_range():
    values = {REGISTRY.dispatch("random_number_generator", {"seed": s, "range": (3, 7)}) for s in range(50)}
    assert values == {"3", "4", "5", "6"}
    once = REGISTRY.dispatch("random_number_generator", {"seed": 1, "range": [0, 1000]})
    assert once == REGISTRY.dispatch("random_number_generator", {"seed": 1, "range": (0, 1000)})
    assert REGISTRY.dispatch("random_number_generator", {"seed": 1, "range": (5, 5)}).startswith("Error")


def test_time_tool_returns_the_current_local_time():
    out = REGISTRY.dispatch("get_current_time", {})
    stamp = datetime.datetime.strptime(out[:19], "%Y-%m-%d %H:%M:%S")
    assert abs((stamp - datetime.datetime.now()).total_seconds()) < 60
    assert datetime.datetime.now().strftime("%A") in out
    assert REGISTRY.dispatch("get_current_time", {"timezone": "Not/AZone"}) == "Error: unknown time zone 'Not/AZone'"
    assert REGISTRY.dispatch("get_current_time", {"timezone": 8}).startswith("Error")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_weather_tool_says_when_the_network_is_not_there(monkeypatch):
    monkeypatch.setattr(tools, "WEATHER_URL", f"http://127.0.0.1:{closed_port()}/{{city}}?format=j1")
    monkeypatch.setattr(tools, "NETWORK_TIMEOUT", 2)
    t0 = time.monotonic()
    out = REGISTRY.dispatch("get_weather", {"city_name": "Beijing"})
    assert out.startswith("Network not available: get_weather needs internet access"), out
    assert time.monotonic() - t0 < 5


def test_weather_tool_reads_the_service_answer(monkeypatch):
    seen = []
    payload = {"current_condition": [{"temp_C": "21", "FeelsLikeC": "20", "humidity": "40", "windspeedKmph": "9",
                                      "observation_time": "08:00 AM", "weatherDesc": [{"value": "Sunny"}]}]}  # fmt: skip

    def fake_get(url, timeout):
        seen.append((url, timeout))
        return json.dumps(payload).encode()

    monkeypatch.setattr(tools, "http_get", fake_get)
    out = json.loads(REGISTRY.dispatch("get_weather", {"city_name": "北京 city"}))
    assert out == {"temperature_C": "21", "feels_like_C": "20", "humidity_percent": "40", "wind_kmph": "9",
                   "observation_time": "08:00 AM", "description": "Sunny"}  # fmt: skip
    assert seen == [("https://wttr.in/%E5%8C%97%E4%BA%AC%20city?format=j1", tools.NETWORK_TIMEOUT)]
    monkeypatch.setattr(tools, "http_get", lambda url, timeout: b"<html>")
    assert REGISTRY.dispatch("get_weather", {"city_name": "x"}).startswith("Error: the weather service")


def test_shell_tool_is_off_unless_enabled_and_never_uses_a_shell(tmp_path, monkeypatch):
    assert "shell" not in REGISTRY.active() and "shell" not in [t["name"] for t in REGISTRY.active().schemas()]
    assert REGISTRY.active().dispatch("shell", {"command": "echo hi"}).startswith("Error: there is no tool named")
    monkeypatch.delenv("COMPOSITE_DEMO_ENABLE_SHELL", raising=False)
    assert not tools.shell_enabled_by_env()
    monkeypatch.setenv("COMPOSITE_DEMO_ENABLE_SHELL", "1")
    assert tools.shell_enabled_by_env()
    enabled = REGISTRY.active({"shell"})
    sentinel = tmp_path / "made"
    out = enabled.dispatch("shell", {"command": f"echo 'a; touch {sentinel}' $HOME"})
    assert out == f"a; touch {sentinel} $HOME\n\n[exit code 0]" and not sentinel.exists()
    assert (
        enabled.dispatch("shell", {"command": "no-such-command-xyz"}) == "Error: command not found: no-such-command-xyz"
    )
    assert enabled.dispatch("shell", {"command": "ls /no/such/dir"}).endswith("[exit code 2]")
    monkeypatch.setattr(tools, "SHELL_TIMEOUT", 0.5)
    t0 = time.monotonic()
    assert "did not finish within 0.5 s" in enabled.dispatch("shell", {"command": "sleep 10"})
    assert time.monotonic() - t0 < 5


# --- conversation and the loops -----------------------------------------------------------------------------


def test_transcript_to_v3_history_and_back():
    messages = [
        Message(Role.USER, "q"),
        Message(Role.TOOL, "```python\ntool_call(a=1)\n```", tool="calc"),
        Message(Role.OBSERVATION, "2"),
        Message(Role.INTERPRETER, "```python\nprint(1)\n```", tool="interpreter"),
        Message(Role.ASSISTANT, "done"),
    ]
    history = to_history(messages, {"role": "system", "content": "s"})
    assert history == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "metadata": "calc", "content": "```python\ntool_call(a=1)\n```"},
        {"role": "observation", "content": "2"},
        {"role": "assistant", "metadata": "interpreter", "content": "```python\nprint(1)\n```"},
        {"role": "assistant", "metadata": "", "content": "done"},
    ]
    assert from_history(history[2:]) == messages[1:]
    assert extract_code("```python\nx = 1\ny = 2\n```") == "x = 1\ny = 2"
    assert extract_code("```\nunfinished") == "unfinished" and extract_code("plain") == "plain"
    assert agent.truncate("x" * 1024) == "x" * 1024
    assert agent.truncate("x" * 1025) == "x" * 1024 + " [TRUNCATED]"


def expected_prompt(tok, items):
    """The v3 prompt written out from the format (CHATGLM_REFERENCE.md), not with build_chat_input."""
    ids = [tok.get_command("[gMASK]"), tok.get_command("sop")]
    for role, metadata, content in items:
        ids += [tok.get_command(f"<|{role}|>")] + tok.sp.encode(f"{metadata}\n") + tok.sp.encode(content)
    return ids + [tok.get_command("<|assistant|>")]


def test_tool_loop_sends_the_observation_back_in_the_v3_format(tok):
    call = "tool_call(seed=42, range=(1, 100))"
    model, client = scripted(tok, tool_then_answer("random_number_generator", call, "Your number is {observation}."))
    messages = [Message(Role.USER, "Pick a number between 1 and 99")]
    registry = REGISTRY.active()
    events = list(agent.run(client, messages, Mode.TOOL, GEN, registry=registry))
    number = str(__import__("random").Random(42).randrange(1, 100))
    assert [m.role for m in messages] == [Role.USER, Role.TOOL, Role.OBSERVATION, Role.ASSISTANT]
    assert messages[1].tool == "random_number_generator" and extract_code(messages[1].content) == call
    assert messages[2].content == number and messages[3].content == f"Your number is {number}."
    assert [e.kind for e in events if e.kind != "partial"] == ["message"] * 3
    assert [e.response for e in events if e.kind == "partial"][-1] == f"Your number is {number}."
    assert [c["role"] for c in model.calls] == ["user", "observation"]
    assert model.calls[1]["gen"] == GEN
    system = agent.TOOL_SYSTEM_PROMPT + "\n" + json.dumps(registry.schemas(), indent=4, ensure_ascii=False)
    assert model.prompts[0] == expected_prompt(tok, [("system", "", system), ("user", "", messages[0].content)])
    assert model.prompts[1] == expected_prompt(tok, [
        ("system", "", system),
        ("user", "", "Pick a number between 1 and 99"),
        ("assistant", "random_number_generator", f"```python\n{call}\n```"),
        ("observation", "", number),
    ])  # fmt: skip
    text = model.prompt_text(1)
    assert text.endswith("<|assistant|>") and f"<|observation|> \n {number}<|assistant|>" in text.replace("  ", " ")


def test_tool_loop_truncates_long_results_and_stops_after_five_rounds(tok):
    registry = ToolRegistry()

    @registry.register
    def long_text(n: Annotated[int, "length", True]):
        """Returns n characters."""
        return "y" * n

    model, client = scripted(tok, lambda q, role, h: "long_text\n```python\ntool_call(n=5000)\n```")
    messages = [Message(Role.USER, "again and again")]
    events = list(agent.run(client, messages, Mode.TOOL, GEN, registry=registry))
    observations = [m.content for m in messages if m.role is Role.OBSERVATION]
    assert observations == ["y" * 1024 + " [TRUNCATED]"] * agent.MAX_ROUNDS == ["y" * 1024 + " [TRUNCATED]"] * 5
    assert len(model.calls) == 6 and events[-1].kind == "notice" and "more than 5 calls" in events[-1].text
    assert model.calls[-1]["query"] == "y" * 1024 + " [TRUNCATED]"


def test_manual_mode_waits_for_the_user_to_type_the_observation(tok):
    tool_list = [{"name": "track", "description": "Track a stock", "parameters": {"symbol": "str"}}]
    model, client = scripted(tok, tool_then_answer("track", "tool_call(symbol='GOOG')", "GOOG is at {observation}"))
    messages = [Message(Role.USER, "How is GOOG?")]
    events = list(agent.run(client, messages, Mode.TOOL, GEN, tools=tool_list, manual=True))
    assert events[-1].kind == "awaiting_observation" and events[-1].text == "track"
    assert [m.role for m in messages] == [Role.USER, Role.TOOL] and len(model.calls) == 1
    assert model.calls[0]["history"][0] == {"role": "system", "content": agent.TOOL_SYSTEM_PROMPT, "tools": tool_list}
    messages.append(Message(Role.OBSERVATION, "111.3"))
    list(agent.run(client, messages, Mode.TOOL, GEN, tools=tool_list, manual=True))
    assert messages[-1] == Message(Role.ASSISTANT, "GOOG is at 111.3")
    assert model.calls[1]["role"] == "observation" and model.calls[1]["query"] == "111.3"


def test_chat_mode_uses_the_system_prompt_and_never_dispatches(tok):
    model, client = scripted(tok, lambda q, role, h: "calculator\n```python\ntool_call(expression='1+1')\n```")
    messages = [Message(Role.USER, "hi")]
    list(agent.run(client, messages, Mode.CHAT, GEN, system_prompt="Be brief."))
    assert [m.role for m in messages] == [Role.USER, Role.TOOL] and len(model.calls) == 1
    assert model.calls[0]["history"] == [{"role": "system", "content": "Be brief."}]
    list(agent.run(client, [Message(Role.USER, "hi")], Mode.CHAT, GEN, system_prompt="  "))
    assert model.calls[1]["history"] == []
    assert agent.retry_point(messages) == messages[:1] and agent.retry_point([]) == []


def test_client_maps_the_sidebar_settings_onto_stream_chat(tok):
    model, client = scripted(tok, lambda q, role, h: "ok")
    list(client.stream_chat("q", [], top_p=0.8, temperature=0.0, repetition_penalty=1.1, max_new_tokens=9))
    assert model.calls[-1]["gen"] == {"repetition_penalty": 1.1, "max_new_tokens": 9, "do_sample": False}
    list(client.stream_chat("q", [], top_p=0.7, temperature=0.5, repetition_penalty=0.0, max_new_tokens=None))
    assert model.calls[-1]["gen"] == {"top_p": 0.7, "temperature": 0.5}
    with pytest.raises(TypeError, match="unexpected generation settings"):
        list(client.stream_chat("q", [], max_length=5))


class ForcedModel:
    """The tiny ChatGLM3 made to write the given replies token by token (a logits processor picks each token)."""

    def __init__(self, model, tokenizer, replies):
        self.model, self.config, self.replies = model, model.config, list(replies)
        self.tokenizer = tokenizer

    def stream_chat(self, tokenizer, query, history=None, role="user", **gen):
        text, stop = self.replies.pop(0)
        ids = tokenizer.encode(text, add_special_tokens=False) + [stop]
        yield from self.model.stream_chat(tokenizer, query, history=history, role=role, logits_processor=[ForceTokens(ids)],
                                          **gen)  # fmt: skip


def test_tool_loop_with_the_tiny_chatglm3(tiny):
    model, tok = tiny["v3"]
    replies = [("get_current_time\n```python\ntool_call(timezone='')\n```", tok.get_command("<|observation|>")),
               ("It is late.", tok.eos_token_id)]  # fmt: skip
    client = Client(ForcedModel(model, tok, replies), tok)
    messages = [Message(Role.USER, "What time is it?")]
    list(agent.run(client, messages, Mode.TOOL, dict(GEN, max_new_tokens=64), registry=REGISTRY.active()))
    assert [m.role for m in messages] == [Role.USER, Role.TOOL, Role.OBSERVATION, Role.ASSISTANT]
    assert messages[1].tool == "get_current_time"
    assert messages[2].content[:4] == str(datetime.date.today().year)
    assert messages[3].content == "It is late."


def test_demonstration_mode_shows_a_tool_call_and_a_code_cell_on_the_tiny_model(tiny, kernel):
    """`-- --demo`: the tiny ChatGLM3 writes the script through the real generation, tools and kernel."""
    model, tok = tiny["v3"]
    client = DemonstrationClient(model, tok, tiny=True)
    messages = [Message(Role.USER, "What is (3 + 4) * 2 ** 10?")]
    list(agent.run(client, messages, Mode.TOOL, GEN, registry=REGISTRY.active()))
    assert [m.role for m in messages] == [Role.USER, Role.TOOL, Role.OBSERVATION, Role.ASSISTANT]
    assert messages[1].tool == "calculator" and messages[2].content == "7168" and "7168" in messages[3].content
    messages = [Message(Role.USER, "Run some Python")]
    list(agent.run(client, messages, Mode.CI, GEN, kernel=kernel))
    assert [m.role for m in messages] == [Role.USER, Role.INTERPRETER, Role.OBSERVATION, Role.ASSISTANT]
    assert messages[2].content.startswith("sum of 1..100 = 5050") and messages[2].images[0].startswith(b"\x89PNG")
    messages = [Message(Role.USER, "hello")]
    list(agent.run(client, messages, Mode.CHAT, GEN))
    assert messages[-1].content == CHAT_REPLY


def test_demonstration_mode_flag_and_page_notice(tiny_dirs, tmp_path, monkeypatch):
    from composite_demo import client as client_module

    monkeypatch.setattr(settings, "model_cache", str(tmp_path))
    monkeypatch.delenv("MODEL_PATH", raising=False)
    demo = client_module.create_client(["--demo", "--device", "cpu", "--max-batch", "1"])
    plain = client_module.create_client(["--device", "cpu", "--max-batch", "1"])
    assert isinstance(demo, DemonstrationClient) and demo.tiny and not isinstance(plain, DemonstrationClient)
    assert "Demonstration mode" in NOTICE and "--demo" in NOTICE


# --- the code interpreter -----------------------------------------------------------------------------------


def test_kernel_runs_prints_in_its_session_folder(kernel):
    result = kernel.execute("import os\nprint('hello', 6 * 7)\nos.getcwd()")
    assert result.text.startswith("hello 42\n")
    assert kernel.execute("import sys\nprint(sys.executable)").text == sys.executable + "\n"  # this venv's Python
    assert os.path.samefile(ast.literal_eval(result.text.splitlines()[1]), kernel.workdir)
    assert result.error is None and not result.timed_out and result.images == []
    assert os.path.basename(kernel.workdir).startswith("chatglm3-ci-")


def test_kernel_returns_an_exception_without_ansi_codes(kernel):
    result = kernel.execute("x = 5\n1 / 0")
    assert "ZeroDivisionError" in result.error and "division by zero" in result.error
    assert "\x1b[" not in result.error
    assert "ZeroDivisionError" in result.observation()
    assert kernel.execute("x").text == "5\n"  # the kernel keeps its state


def test_kernel_interrupts_a_run_past_the_timeout(kernel):
    kernel.execute("y = 7")
    t0 = time.monotonic()
    result = kernel.execute("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout=1.5)
    assert result.timed_out and result.error.startswith("Timeout: the code ran longer than 1.5 s")
    assert result.text == "started\n" and not result.restarted
    assert time.monotonic() - t0 < 10
    assert kernel.execute("y").text == "7\n"  # interrupted, not restarted


def test_kernel_keeps_a_bounded_output_and_says_so(kernel):
    result = kernel.execute("print('x' * 20_000_000)", timeout=60)  # 20 MB of output
    assert len(result.text) == code_kernel.MAX_OUTPUT and result.dropped_chars == 20_000_001 - code_kernel.MAX_OUTPUT
    assert f"[output truncated: {result.dropped_chars} more characters were not kept]" in result.observation()
    assert kernel.execute("print('still here')").text == "still here\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")
def test_kernel_memory_is_capped(kernel):
    result = kernel.execute(f"x = bytearray({(code_kernel.MEMORY_MB + 512) * 2**20})")
    assert result.error and "MemoryError" in result.error
    assert kernel.execute("print(1 + 1)").text == "2\n"  # the kernel lives on


def test_kernel_returns_matplotlib_figures_as_png(kernel):
    result = kernel.execute(PLOT)
    assert (
        len(result.images) == 1 and result.images[0].startswith(b"\x89PNG\r\n\x1a\n") and len(result.images[0]) > 2000
    )
    assert result.observation() == "[Image]"


def test_kernel_restarts_cleanly_after_a_crash(kernel):
    result = kernel.execute("import os\nos._exit(1)")
    assert result.restarted and "kernel died" in result.error
    assert kernel.is_alive() and kernel.execute("print('back')").text == "back\n"
    kernel.km.shutdown_kernel(now=True)  # killed between two runs
    result = kernel.execute("print('again')")
    assert result.text == "again\n" and result.restarted


def test_unknown_kernel_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("IPYKERNEL", "no-such-kernel")
    k = code_kernel.CodeKernel()
    try:
        assert k.kernel_name == "no-such-kernel"
        with pytest.raises(code_kernel.KernelError, match="no Jupyter kernel named 'no-such-kernel'.*python3"):
            k.start()
    finally:
        k.close()


def test_kernel_pool_gives_each_session_its_own_folder():
    made = []

    class Fake:
        def __init__(self):
            self.workdir, self.closed = f"/tmp/fake-{len(made)}", False
            made.append(self)

        def close(self):
            self.closed = True

    pool = code_kernel.KernelPool(max_kernels=2, factory=Fake)
    a, b = pool.get("a"), pool.get("b")
    assert a is pool.get("a") and a.workdir != b.workdir
    pool.get("c")  # b is now the least recently used
    assert b.closed and not a.closed
    pool.close_all()
    assert all(k.closed for k in made)


def test_interpreter_loop_runs_code_in_the_kernel(tok, kernel):
    def reply(query, role, history):
        if role == "user":
            return f"interpreter\n```python\nprint(sum(range(10)))\n{PLOT}\n```"
        return "The sum is 45 and here is the plot."

    model, client = scripted(tok, reply)
    messages = [Message(Role.USER, "sum 0..9 and plot squares")]
    list(agent.run(client, messages, Mode.CI, GEN, kernel=kernel))
    assert [m.role for m in messages] == [Role.USER, Role.INTERPRETER, Role.OBSERVATION, Role.ASSISTANT]
    assert messages[2].content == "45\n[Image]" and messages[2].images[0].startswith(b"\x89PNG")
    system = model.calls[0]["history"][0]
    assert system["role"] == "system" and "tools" not in system and kernel.workdir in system["content"]
    assert model.prompts[1] == expected_prompt(tok, [
        ("system", "", system["content"]),
        ("user", "", "sum 0..9 and plot squares"),
        ("assistant", "interpreter", f"```python\nprint(sum(range(10)))\n{PLOT}\n```"),
        ("observation", "", "45\n[Image]"),
    ])  # fmt: skip
    model.reply = lambda q, role, h: "calculator\n```python\ntool_call(expression='1')\n```" if role == "user" else "ok"
    messages = [Message(Role.USER, "x")]
    list(agent.run(client, messages, Mode.CI, GEN, kernel=kernel))
    assert messages[2].content.startswith("Error: there is no tool named 'calculator' here")


# --- the Streamlit page -------------------------------------------------------------------------------------


@pytest.fixture
def page(tiny_dirs, tmp_path, monkeypatch):
    """An AppTest of composite_demo/main.py; `page(client=None)` (None: the built-in tiny ChatGLM3 via utils.py)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    (tmp_path / "tiny-v3").symlink_to(tiny_dirs["v3"])  # the built-in model, already built
    monkeypatch.delenv("MODEL_PATH", raising=False)
    monkeypatch.setattr(settings, "model_cache", str(tmp_path))
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.delenv("COMPOSITE_DEMO_ENABLE_SHELL", raising=False)
    monkeypatch.setattr(sys, "argv", ["main.py"])

    def start(client=None):
        set_client_factory((lambda: client) if client is not None else None)
        st.cache_resource.clear()
        at = AppTest.from_file(str(REPO / "composite_demo" / "main.py"), default_timeout=60).run()
        assert not at.exception, at.exception
        return at

    try:
        yield start
    finally:
        set_client_factory(None)
        code_kernel.set_shared_pool(None)
        st.cache_resource.clear()


def names(at):
    return [m.name for m in at.chat_message]


def test_page_chat_mode_with_the_tiny_model(page):
    at = page()
    assert at.radio(key="mode").options == ["💬 Chat", "🛠️ Tool", "🧑‍💻 Code Interpreter"]
    assert at.radio(key="mode").value == "💬 Chat"
    assert [(s.label, s.value) for s in at.sidebar.slider] == [
        ("top_p", 0.8),
        ("temperature", 0.95),
        ("repetition_penalty", 1.1),
        ("Output length (max new tokens)", 256),
    ]
    assert (at.sidebar.slider[1].min, at.sidebar.slider[1].max) == (0.0, 1.5)
    assert (at.sidebar.slider[3].min, at.sidebar.slider[3].max) == (5, 32000)
    assert at.sidebar.text_area(key="system_prompt").value == agent.CHAT_SYSTEM_PROMPT
    assert "tiny random ChatGLM3" in at.info[0].value
    at.sidebar.slider(key="max_new_tokens").set_value(12)
    at.chat_input(key="chat_input_chat").set_value("你好").run()
    assert not at.exception and names(at)[0] == "user" and len(names(at)) >= 2
    assert at.chat_message[0].markdown[0].value == "你好"
    first = list(at.session_state["messages_CHAT"])
    at.sidebar.button(key="retry").click().run()
    assert not at.exception and at.session_state["messages_CHAT"][0] == first[0]
    assert len(at.session_state["messages_CHAT"]) >= 2
    at.sidebar.button(key="clear").click().run()
    assert not at.exception and at.session_state["messages_CHAT"] == [] and names(at) == []


def test_page_tool_mode_runs_a_tool(page, tok):
    model, client = scripted(tok, tool_then_answer("calculator", "tool_call(expression='(3 + 4) * 6')"))
    at = page(client)
    assert not at.info  # the scripted client is not the tiny model
    at.radio(key="mode").set_value("🛠️ Tool").run()
    assert at.sidebar.text_area.len == 0  # the system prompt box is Chat mode's
    assert at.toggle(key="manual_mode").value is False and at.toggle(key="enable_shell").value is False
    at.chat_input(key="chat_input_tool").set_value("What is (3 + 4) * 6?").run()
    assert not at.exception
    assert names(at) == ["user", "tool", "observation", "assistant"]
    assert at.chat_message[1].code[0].value == "tool_call(expression='(3 + 4) * 6')"
    assert at.chat_message[2].code[0].value == "42"
    assert at.chat_message[3].markdown[0].value == "The result is 42."
    assert [t["name"] for t in model.calls[0]["history"][0]["tools"]] == [
        "random_number_generator", "calculator", "get_current_time", "get_weather"]  # fmt: skip
    at.toggle(key="enable_shell").set_value(True).run()
    at.chat_input(key="chat_input_tool").set_value("again").run()
    assert "shell" in [t["name"] for t in model.calls[-1]["history"][0]["tools"]]


def test_page_tool_manual_mode(page, tok):
    model, client = scripted(tok, tool_then_answer("track", "tool_call(symbol='GOOG')", "GOOG is at {observation}."))
    at = page(client)
    at.radio(key="mode").set_value("🛠️ Tool").run()
    at.toggle(key="manual_mode").set_value(True).run()
    assert "random_number_generator" in at.text_area(key="tools_text").value
    at.text_area(key="tools_text").set_value("- name: track\n  description: Track a stock price\n").run()
    at.chat_input(key="chat_input_tool").set_value("GOOG?").run()
    assert not at.exception and names(at) == ["user", "tool"]
    assert at.session_state["awaiting"] == "track" and "type the result of `track`" in at.info[-1].value
    assert model.calls[0]["history"][0]["tools"] == [{"name": "track", "description": "Track a stock price"}]
    at.chat_input(key="chat_input_tool").set_value("111.3").run()
    assert not at.exception and names(at) == ["user", "tool", "observation", "assistant"]
    assert model.calls[1]["role"] == "observation" and at.chat_message[3].markdown[0].value == "GOOG is at 111.3."
    at.text_area(key="tools_text").set_value("[unclosed").run()
    assert "not valid YAML/JSON" in at.error[0].value and at.chat_input(key="chat_input_tool").disabled
    assert names(at) == ["user", "tool", "observation", "assistant"]  # the conversation stays on the page


def test_page_code_interpreter_mode(page, tok, kernel):
    def reply(query, role, history):
        return f"interpreter\n```python\nprint(open('data.csv').read())\n{PLOT}\n```" if role == "user" else "Here."

    model, client = scripted(tok, reply)
    code_kernel.set_shared_pool(code_kernel.KernelPool(factory=lambda: kernel))
    at = page(client)
    at.radio(key="mode").set_value("🧑‍💻 Code Interpreter").run()
    assert kernel.workdir in at.caption[0].value
    at.file_uploader(key="upload").upload("../../data.csv", b"a,b\n1,4").run()  # into the session folder
    assert open(os.path.join(kernel.workdir, "data.csv"), "rb").read() == b"a,b\n1,4"
    at.chat_input(key="chat_input_ci").set_value("Plot the squares").run()
    assert not at.exception
    assert names(at) == ["user", "interpreter", "observation", "assistant"]
    assert at.chat_message[1].code[0].value.startswith("print(open('data.csv').read())\nimport matplotlib")
    assert at.chat_message[2].code[0].value == "a,b\n1,4\n[Image]"
    assert len(at.chat_message[2].image) == 1
    observation = at.session_state["messages_CI"][2]
    assert observation.images[0].startswith(b"\x89PNG")
    assert kernel.workdir in model.calls[0]["history"][0]["content"]


# --- a real browser -----------------------------------------------------------------------------------------

WRAPPER = """
import runpy, sys
sys.path.insert(0, {repo!r})
import chatglm
from composite_demo import client
from tests.composite_double import ScriptedModel

def reply(query, role, history):
    if role == "user":
        return "interpreter\\n```python\\n" + {code!r} + "\\n```"
    return "Here is the plot of sin(x) on [0, 2π]; its maximum is 1."

def factory():
    tok = chatglm.load_tokenizer({tiny!r})
    return client.Client(ScriptedModel(tok, reply), tok)

client.set_client_factory(factory)
runpy.run_path({main!r}, run_name="__main__")
"""
SINE = ("import numpy as np\nimport matplotlib.pyplot as plt\nx = np.linspace(0, 2 * np.pi, 200)\n"
        "plt.figure(figsize=(5, 3))\nplt.plot(x, np.sin(x))\nplt.title('sin(x)')\nplt.show()\n"
        "print('max', round(float(np.sin(x).max()), 3))")  # fmt: skip


def settled(check):
    """check(), or False while the elements it reads come and go (Streamlit reruns the page)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def run():
        try:
            return check()
        except (StaleElementReferenceException, IndexError):
            return False

    return run


def test_composite_demo_in_a_browser(request, tiny_dirs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from .test_web_demos import free_port, screenshot, start_server, stop_server, wait_for

    wrapper = tmp_path / "composite_page.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO), code=SINE, tiny=str(tiny_dirs["v3"]),
                                      main=str(REPO / "composite_demo" / "main.py")))  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    args = ["-m", "streamlit", "run", str(wrapper), "--server.headless", "true", "--server.port", str(port),
            "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
            "--browser.gatherUsageStats", "false"]  # fmt: skip
    d = request.getfixturevalue("browser")  # skips when Chromium is not installed
    proc = start_server(args, {"CHATGLM_CACHE": str(tmp_path)}, tmp_path / "log", url)
    try:
        d.get(url)

        wait_for(d, lambda: d.find_elements(By.CSS_SELECTOR, "textarea"), 90, "the chat input")
        labels = "[data-testid=stRadio] label"
        click = settled(
            lambda: [e for e in d.find_elements(By.CSS_SELECTOR, labels) if "Code" in e.text][0].click() or 1
        )
        wait_for(d, click, 30, "the mode switch")

        def ci_input():  # the Code Interpreter's own box (Chat mode's may linger while the page reruns)
            boxes = d.find_elements(By.CSS_SELECTOR, "[data-testid=stChatInput] textarea")
            return [b for b in boxes if "compute" in (b.get_attribute("placeholder") or "")]

        wait_for(d, settled(lambda: ci_input() and "session folder" in d.page_source), 60, "Code Interpreter mode")
        time.sleep(0.5)  # let the rerun settle
        wait_for(d, settled(lambda: ci_input()[0].send_keys("Plot sin(x) over one period", Keys.ENTER) or True), 30)
        select = "[data-testid=stChatMessage]"
        try:
            wait_for(d, settled(lambda: len(d.find_elements(By.CSS_SELECTOR, select)) == 4
                     and d.find_elements(By.CSS_SELECTOR, f"{select} img")), 90, "the code, the plot and the answer")  # fmt: skip
        except Exception:
            screenshot(d, "composite_demo_failed.png")
            pytest.fail(f"no answer on the page; server log:\n{(tmp_path / 'log').read_text()[-3000:]}")
        text = " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, select))
        assert "max 1.0" in text and "maximum is 1" in text
        image = d.find_elements(By.CSS_SELECTOR, f"{select} img")[-1]
        wait_for(d, lambda: d.execute_script("return arguments[0].naturalWidth", image) > 100, 30, "the plot")
        screenshot(d, "composite_demo.png")
    finally:
        stop_server(proc)


def test_demonstration_mode_in_a_browser(request, tmp_path):
    """`streamlit run composite_demo/main.py -- --demo`: one tool call and one code cell end to end, as a newcomer
    without a model sees them; screenshots in artifacts/."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from .test_web_demos import free_port, screenshot, start_server, stop_server, wait_for

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    args = ["-m", "streamlit", "run", str(REPO / "composite_demo" / "main.py"), "--server.headless", "true",
            "--server.port", str(port), "--server.fileWatcherType", "none", "--", "--demo", "--device", "cpu"]  # fmt: skip
    d = request.getfixturevalue("browser")  # skips when Chromium is not installed
    env = {"CHATGLM_CACHE": str(tmp_path), "MODEL_PATH": ""}
    proc = start_server(args, env, tmp_path / "log", url)
    select = "[data-testid=stChatMessage]"

    def mode(word):
        labels = "[data-testid=stRadio] label"
        click = settled(lambda: [e for e in d.find_elements(By.CSS_SELECTOR, labels) if word in e.text][0].click() or 1)
        wait_for(d, click, 30, f"the {word} mode switch")

    def send(placeholder_word, text):
        def box():
            boxes = d.find_elements(By.CSS_SELECTOR, "[data-testid=stChatInput] textarea")
            return [b for b in boxes if placeholder_word in (b.get_attribute("placeholder") or "")]

        wait_for(d, settled(lambda: box()), 60, f"the input box ({placeholder_word})")
        time.sleep(0.5)  # let the rerun settle
        wait_for(d, settled(lambda: box()[0].send_keys(text, Keys.ENTER) or True), 30)

    try:
        d.get(url)
        wait_for(d, lambda: "Demonstration mode" in d.page_source, 90, "the demonstration notice")
        mode("Tool")
        send("ChatGLM3", "What is (3 + 4) * 2 ** 10?")
        wait_for(d, settled(lambda: len(d.find_elements(By.CSS_SELECTOR, select)) == 4
                 and "end of this demonstration turn" in d.page_source), 90, "the tool call and its result")  # fmt: skip
        text = " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, select))
        assert "calculator" in text and "7168" in text
        screenshot(d, "composite_demo_demonstration_tool.png")
        mode("Code")
        send("compute", "Show me some Python")
        wait_for(d, settled(lambda: len(d.find_elements(By.CSS_SELECTOR, select)) == 4
                 and d.find_elements(By.CSS_SELECTOR, f"{select} img")
                 and "end of this demonstration turn" in d.page_source), 120, "the code cell, its output and plot")  # fmt: skip
        text = " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, select))
        assert "sum of 1..100 = 5050" in text
        screenshot(d, "composite_demo_demonstration_code.png")
    except Exception as e:
        screenshot(d, "composite_demo_demonstration_failed.png")
        log = (tmp_path / "log").read_text()[-3000:]
        raise AssertionError(f"the demonstration did not run: {e}; server log:\n{log}") from e
    finally:
        stop_server(proc)
