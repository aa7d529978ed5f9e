"""A ChatGLM3 tool-call parser for vLLM, which serves ChatGLM3-6B but ships no parser for its tool calls:

    vllm serve /path/to/chatglm3-6b --trust-remote-code --enable-auto-tool-choice \\
        --tool-parser-plugin serving/vllm_tool_parser.py --tool-call-parser chatglm3

ChatGLM3 answers a tool call with the tool's name on the first line of its reply and a code block holding
`tool_call(name=value, ...)`; a plain answer has an empty first line. `parse_chatglm3` reads that with our own
parser (chatglm.generation.process_response: arguments read with `ast`, never evaluated) and needs no vLLM; the
`ChatGLM3ToolParser` class, defined when vLLM is importable, hands its result to vLLM (whole for a plain request;
streamed as content deltas, or as one tool-call delta once the call's code block is closed).
"""

from __future__ import annotations

import os
import re
import sys
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # vLLM loads this file by path: the repository's packages must import
    sys.path.insert(0, REPO)

from chatglm.generation import process_response  # noqa: E402
from serving.events import _arguments_json  # noqa: E402

TOOL_NAME = re.compile(r"[A-Za-z_][\w.\-]*", re.ASCII)
ROLE_MARKERS = ("<|observation|>", "<|user|>", "<|assistant|>")


def parse_chatglm3(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls [{"name", "arguments": JSON text}]) of a ChatGLM3 reply as decoded (role markers at
    its end, if special tokens were kept, are cut). A call whose arguments are not literals, or that JSON cannot
    carry, is returned as content: never run."""
    for marker in ROLE_MARKERS[:2]:
        text = text.split(marker)[0]
    tools = [{"role": "system", "content": "", "tools": []}]  # lets process_response read tool calls
    response, _ = process_response("v3", text, tools)
    if isinstance(response, dict):
        args = _arguments_json(response["parameters"]) if "parameters" in response else None
        if args is not None:
            return None, [{"name": response["name"], "arguments": args}]
        return text.strip(), []
    return response, []


def _stream_state(text: str) -> str:
    """'wait' (the first line could still be a tool's name), 'call' (it is one) or 'content'."""
    if "\n" not in text:
        return "wait" if not text.strip() or TOOL_NAME.fullmatch(text.strip()) else "content"
    first = text.split("\n", 1)[0].strip()
    return "call" if first and TOOL_NAME.fullmatch(first) else "content"


def _content_part(text: str) -> str:
    """A plain reply's text: after its empty first (metadata) line, or all of it when that line is not empty."""
    first, newline, rest = text.partition("\n")
    return rest if newline and not first.strip() else text


def _call_closed(text: str) -> bool:
    body = text.split("\n", 1)[1] if "\n" in text else ""
    return body.count("```") >= 2 or any(m in text for m in ROLE_MARKERS[:2])


def _import_vllm():
    try:  # newer vLLM
        from vllm.tool_parsers import ToolParser, ToolParserManager
    except ImportError:
        from vllm.entrypoints.openai.tool_parsers import ToolParser, ToolParserManager
    from vllm.entrypoints.openai.protocol import (
        DeltaFunctionCall,
        DeltaMessage,
        DeltaToolCall,
        ExtractedToolCallInformation,
        FunctionCall,
        ToolCall,
    )

    return (ToolParser, ToolParserManager, DeltaFunctionCall, DeltaMessage, DeltaToolCall,
            ExtractedToolCallInformation, FunctionCall, ToolCall)  # fmt: skip


def define_parser():
    """Register and return ChatGLM3ToolParser with vLLM (ImportError where vLLM is not installed)."""
    (ToolParser, ToolParserManager, DeltaFunctionCall, DeltaMessage, DeltaToolCall, ExtractedToolCallInformation,
     FunctionCall, ToolCall) = _import_vllm()  # fmt: skip

    @ToolParserManager.register_module("chatglm3")
    class ChatGLM3ToolParser(ToolParser):
        def __init__(self, *args, **kwargs):  # one per request
            super().__init__(*args, **kwargs)
            self._sent, self._call_sent = 0, False

        def extract_tool_calls(self, model_output: str, request):
            content, calls = parse_chatglm3(model_output)
            tool_calls = [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", type="function",
                                   function=FunctionCall(name=c["name"], arguments=c["arguments"])) for c in calls]  # fmt: skip
            return ExtractedToolCallInformation(tools_called=bool(tool_calls), tool_calls=tool_calls, content=content)

        def extract_tool_calls_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                         current_token_ids, delta_token_ids, request):  # fmt: skip
            state = _stream_state(current_text)
            if state == "wait":
                return None
            if state == "content":  # what was held while the first line could be a name, then each delta
                body = _content_part(current_text)
                new, self._sent = body[self._sent :], len(body)
                return DeltaMessage(content=new) if new else None
            if not _call_closed(current_text) or getattr(self, "_call_sent", False):
                return None
            content, calls = parse_chatglm3(current_text)
            self._call_sent = True
            if not calls:  # not a call we can read: the text as it is
                return DeltaMessage(content=content)
            call = calls[0]
            self.prev_tool_call_arr = [{"name": call["name"], "arguments": call["arguments"]}]
            self.streamed_args_for_tool = [call["arguments"]]
            self.current_tool_id = 0
            function = DeltaFunctionCall(name=call["name"], arguments=call["arguments"])
            delta = DeltaToolCall(index=0, id=f"call_{uuid.uuid4().hex[:24]}", type="function", function=function)
            return DeltaMessage(tool_calls=[delta])

    return ChatGLM3ToolParser


try:  # loaded by vLLM as --tool-parser-plugin: register the parser
    ChatGLM3ToolParser = define_parser()
except ImportError:  # no vLLM here: parse_chatglm3 still works
    ChatGLM3ToolParser = None
