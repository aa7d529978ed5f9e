"""OpenAI chat messages -> ChatGLM query, history and role."""

from __future__ import annotations

import json

from .requests import RequestError, check_depth

TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


def _text(content, i: int, allow_none: bool = False) -> str:
    if content is None:
        if allow_none:
            return ""
        raise RequestError(400, f"messages[{i}].content is required", "messages")
    if isinstance(content, str):
        return content
    parts = []
    for part in content:  # [{"type": "text", "text": ...}]
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(400, f"messages[{i}].content: only text parts are supported", "messages")
        parts.append(part["text"])
    return "".join(parts)


def _tool_call_code(name: str, arguments: str, i: int) -> str:
    try:
        args = json.loads(arguments or "{}")
    except (ValueError, RecursionError):
        raise RequestError(400, f"messages[{i}]: tool call arguments of {name!r} are not JSON", "messages") from None
    check_depth(args, "messages")
    if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise RequestError(400, f"messages[{i}]: tool call arguments must be an object of named values", "messages")
    return "```python\ntool_call(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")\n```"


def openai_to_chat(version: str, messages: list[dict], tools: list[dict] | None = None):
    """(query, history, role) for model.stream_chat from OpenAI chat messages (dicts with role, content, ...).

    ChatGLM3: system/user/assistant become its roles, `tools` a leading system message (as ChatGLM3's own
    api_server), assistant tool_calls its `tool_call(...)` turns and tool results `observation` turns.
    ChatGLM-6B / ChatGLM2-6B (as ChatGLM2's openai_api.py): a leading system message is put before the last user
    message, and the earlier ones must be user/assistant pairs.
    """
    if not messages:
        raise RequestError(400, "'messages' must not be empty", "messages")
    last_i = len(messages) - 1
    last = messages[-1]
    if version != "v3":
        if tools:
            raise RequestError(400, "tools need a ChatGLM3 model", "tools")
        if last["role"] != "user":
            raise RequestError(400, "the last message must have role 'user'", "messages")
        query = _text(last.get("content"), last_i)
        prev = list(enumerate(messages[:-1]))
        if prev and prev[0][1]["role"] == "system":
            query = _text(prev.pop(0)[1].get("content"), 0) + query
        if len(prev) % 2 or any(m["role"] != ("user", "assistant")[j % 2] for j, (_, m) in enumerate(prev)):
            raise RequestError(400, "before the last message, ChatGLM-6B/ChatGLM2-6B take an optional system message, "
                                    "then alternating user/assistant messages", "messages")  # fmt: skip
        history = [(_text(prev[j][1].get("content"), prev[j][0]), _text(prev[j + 1][1].get("content"), prev[j + 1][0]))
                   for j in range(0, len(prev), 2)]  # fmt: skip
        return query, history, "user"
    history = []
    if tools:
        history.append({"role": "system", "content": TOOL_PROMPT, "tools": tools})
    for i, m in enumerate(messages[:-1]):
        role = m["role"]
        if role in ("tool", "function"):
            history.append({"role": "observation", "content": _text(m.get("content"), i)})
        elif role == "assistant" and m.get("tool_calls"):
            text = _text(m.get("content"), i, allow_none=True)
            if text:
                history.append({"role": "assistant", "content": text})
            for call in m["tool_calls"]:
                fn = call["function"]
                history.append({"role": "assistant", "metadata": fn["name"],
                                "content": _tool_call_code(fn["name"], fn.get("arguments"), i)})  # fmt: skip
        else:
            history.append({"role": role, "content": _text(m.get("content"), i)})
    if last["role"] == "user":
        return _text(last.get("content"), last_i), history, "user"
    if last["role"] in ("tool", "function"):
        return _text(last.get("content"), last_i), history, "observation"
    raise RequestError(400, "the last message must have role 'user' or 'tool'", "messages")
