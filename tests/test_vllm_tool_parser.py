"""serving/vllm_tool_parser.py: ChatGLM3's tool calls read for vLLM with our parser, on replies in the format
ChatGLM3 writes (its tool-use README's examples). vLLM itself needs a GPU and the THUDM code, so the parser class
runs here against a stand-in for the few vLLM classes it uses."""

from __future__ import annotations

import importlib
import json
import sys
import types
from dataclasses import dataclass, field

import pytest

from serving.vllm_tool_parser import parse_chatglm3

CALL = "get_weather\n```python\ntool_call(city_name='北京')\n```"
PLAIN = "\n你好👋！我是人工智能助手 ChatGLM3-6B，很高兴见到你，欢迎问我任何问题。"
RECORDED = [
    (CALL, None, [{"name": "get_weather", "arguments": '{"city_name": "北京"}'}]),
    ("track\n```python\ntool_call(symbol='AAPL', days=[1, 2])\n```<|observation|>", None,
     [{"name": "track", "arguments": '{"symbol": "AAPL", "days": [1, 2]}'}]),
    (PLAIN, PLAIN.strip(), []),
    ("interpreter\n```python\nprint(1 + 1)\n```", "interpreter\n```python\nprint(1 + 1)\n```", []),
    ("get_weather\n```python\ntool_call(city=__import__('os').getcwd())\n```",
     "get_weather\n```python\ntool_call(city=__import__('os').getcwd())\n```", []),  # read, never run
]  # fmt: skip


@pytest.mark.parametrize(("text", "content", "calls"), RECORDED)
def test_recorded_replies(text, content, calls):
    assert parse_chatglm3(text) == (content, calls)


@dataclass
class _Model:  # what vLLM's pydantic protocol classes are, for these tests
    kwargs: dict = field(default_factory=dict)

    def __getattr__(self, name):
        return self.kwargs.get(name)


def _model(name):
    return type(name, (_Model,), {"__init__": lambda self, **kw: _Model.__init__(self, kw)})


@pytest.fixture
def parser_class(monkeypatch):
    registry = {}

    class ToolParser:
        def __init__(self, tokenizer, tools=None):
            self.prev_tool_call_arr, self.streamed_args_for_tool, self.current_tool_id = [], [], -1

    class ToolParserManager:
        @staticmethod
        def register_module(name):
            return lambda cls: registry.setdefault(name, cls)

    protocol = types.ModuleType("vllm.entrypoints.openai.protocol")
    for name in ("DeltaFunctionCall", "DeltaMessage", "DeltaToolCall", "ExtractedToolCallInformation",
                 "FunctionCall", "ToolCall"):  # fmt: skip
        setattr(protocol, name, _model(name))
    parsers = types.ModuleType("vllm.tool_parsers")
    parsers.ToolParser, parsers.ToolParserManager = ToolParser, ToolParserManager
    for name, module in (("vllm", types.ModuleType("vllm")), ("vllm.tool_parsers", parsers),
                         ("vllm.entrypoints", types.ModuleType("vllm.entrypoints")),
                         ("vllm.entrypoints.openai", types.ModuleType("vllm.entrypoints.openai")),
                         ("vllm.entrypoints.openai.protocol", protocol)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    module = importlib.reload(importlib.import_module("serving.vllm_tool_parser"))
    assert registry["chatglm3"] is module.ChatGLM3ToolParser
    yield module.ChatGLM3ToolParser
    monkeypatch.undo()
    importlib.reload(module)


def _stream(parser, text):
    out, previous = [], ""
    for i in range(1, len(text) + 1):  # one character a step, as small as vLLM's deltas get
        delta = parser.extract_tool_calls_streaming(previous, text[:i], text[i - 1 : i], [], [], [], None)
        previous = text[:i]
        if delta is not None:
            out.append(delta)
    return out


def test_the_vllm_parser_whole_and_streamed(parser_class):
    whole = parser_class(None).extract_tool_calls(CALL, None)
    assert whole.tools_called and whole.content is None
    (call,) = whole.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city_name": "北京"}
    assert not parser_class(None).extract_tool_calls(PLAIN, None).tools_called

    deltas = _stream(parser_class(None), CALL)
    assert len(deltas) == 1 and deltas[0].content is None  # nothing of the call leaks as text
    (tool,) = deltas[0].tool_calls
    assert tool.index == 0 and tool.function.name == "get_weather"
    assert json.loads(tool.function.arguments) == {"city_name": "北京"}

    deltas = _stream(parser_class(None), PLAIN)
    assert all(d.tool_calls is None for d in deltas)
    assert "".join(d.content for d in deltas) == PLAIN[1:]  # after the empty metadata line
