"""Replies as deltas for the streaming APIs: `chat_events` turns `model.stream_chat` into OpenAI-style deltas that
never need taking back, and the non-streaming answer is the same deltas joined, so the two always agree."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator

from chatglm.generation import CHAT_DEFAULTS

from .workers import locked_steps

TIME_MARKER = "[[训练时间]]"  # the originals' process_response rewrites it: never stream half of it
V1_PUNCT = ",!:;?"  # v1 turns these into full-width ones depending on the *next* character
TOOL_NAME = re.compile(r"[A-Za-z_][\w.\-]*|", re.ASCII)  # what a ChatGLM3 metadata line (a tool's name) may be


def holdback(text: str, version: str, stops=()) -> int:
    """How many trailing characters may still change or turn out to be a stop sequence."""
    n = 0
    for s in (TIME_MARKER, *stops):
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    if version == "v1" and text and text[-1] in V1_PUNCT:
        n = max(n, 1)
    return n


def find_stop(text: str, stops) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _safe_delta(text: str, sent: str, version: str, stops) -> tuple[str, str, bool]:
    """(text cut at its first stop string, what of it may be sent now beyond `sent`, whether a stop string was
    found): while no stop string is found, the end that may still change or become one is held back."""
    cut = find_stop(text, stops)
    if cut is not None:
        text = text[:cut]
    safe = text if cut is not None else text[: len(text) - holdback(text, version, stops)]
    return text, (safe[len(sent) :] if len(safe) > len(sent) and safe.startswith(sent) else ""), cut is not None


def _arguments_json(params) -> str | None:
    """A model-written tool call's arguments as JSON; None when JSON cannot carry them (sets, bytes, complex,
    infinities, too deep or too big)."""
    try:
        return json.dumps(params, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError, MemoryError):
        return None


def _raw_reply(tokenizer, ids) -> str:
    """The model's reply as it wrote it (a ChatGLM3 tool call: its name line and code), role markers cut."""
    text = tokenizer.decode(ids)
    for marker in ("<|observation|>", "<|user|>"):
        text = text.split(marker)[0]
    return text.strip()


def chat_events(model, tokenizer, query: str, history: list, role: str = "user", gen: dict | None = None,
                stops=(), tools: bool = False, cancel: threading.Event | None = None) -> Iterator[dict]:  # fmt: skip
    """Run one chat and yield {"content": delta, "tokens": ids generated so far}, then maybe {"tool_call": {"name",
    "arguments"}}, then {"finish_reason", "usage", "ids" (the generated token ids)}. Deltas are only sent once no
    later token can change them, so joining them gives the final text. With `tools` a ChatGLM3 reply is held until its first line says whether it is text or a tool
    call; without, only while that line could still be a tool's name."""
    version = model.config.chatglm_version
    gen = dict(gen or {})
    kwargs = {"role": role} if version == "v3" else {}
    # several tokens a step when the engine hands them over together: one decode and one delta for them all
    steps = model.chat_steps(tokenizer, query, history, **kwargs, every_token=False, **gen)
    history = list(history or []) + ([{"role": role, "content": query}] if version == "v3" else [])
    sent, response, stopped, first_line = "", None, False, version != "v3"
    ids, prompt = [], 0
    for step in locked_steps(model, steps, cancel):
        ids, prompt = step.ids, step.prompt_tokens
        if not step.grew:
            continue
        response = model._chat_result(version, step.text, query, history, None, False)[0]
        if not first_line and isinstance(response, str):
            # ChatGLM3's first line: plain text, or the name of a tool? With tools offered, held until it ends;
            # without, only while it could still be a name (a plain reply streams token by token)
            first_line = "\n" in step.text or not (tools or TOOL_NAME.fullmatch(step.text.strip()))
            if not first_line:
                continue
        if isinstance(response, dict):
            if tools:
                continue  # a tool call: sent whole at the end
            response = response.get("content", "")
        response, delta, stopped = _safe_delta(response, sent, version, stops)
        if delta:
            yield {"content": delta, "tokens": len(ids)}
            sent += delta
        if stopped:
            break
    if cancel is not None and cancel.is_set():
        return
    finish = "stop"
    args = _arguments_json(response["parameters"]) if isinstance(response, dict) and "parameters" in response else None
    if tools and args is not None:
        finish = "tool_calls"
        yield {"tool_call": {"name": response["name"], "arguments": args}}
    elif not stopped:
        if isinstance(response, dict):  # a tool call whose arguments JSON cannot carry is sent as the model wrote it
            response = _raw_reply(tokenizer, ids) if "parameters" in response else response.get("content", "")
        response = response or ""
        if len(response) > len(sent) and response.startswith(sent):
            yield {"content": response[len(sent) :], "tokens": len(ids)}
        finish = _finish(model, gen, ids, prompt)
    yield {"finish_reason": finish, "usage": _usage(prompt, ids), "ids": ids}


def completion_events(model, tokenizer, prompt: str, gen: dict | None = None, stops=(),
                      cancel: threading.Event | None = None) -> Iterator[dict]:  # fmt: skip
    """chat_events for a raw text prompt (/v1/completions): {"content", "tokens"} deltas that never need taking
    back, then {"finish_reason", "usage", "ids"}."""
    gen = dict(gen or {})
    sent, text, stopped, ids, prompt_tokens = "", "", False, [], 0
    for step in locked_steps(model, model.completion_steps(tokenizer, prompt, every_token=False, **gen), cancel):
        ids, prompt_tokens, text = step.ids, step.prompt_tokens, step.text
        if not step.grew:
            continue
        text, delta, stopped = _safe_delta(text, sent, "", stops)
        if delta:
            yield {"content": delta, "tokens": len(ids)}
            sent += delta
        if stopped:
            break
    if cancel is not None and cancel.is_set():
        return
    if not stopped:  # the whole reply, a trailing broken UTF-8 character included (as decode gives it)
        text = tokenizer.decode(ids[:-1] if ids and ids[-1] in model.reply_stop_ids(tokenizer) else ids)
    if len(text) > len(sent) and text.startswith(sent):
        yield {"content": text[len(sent) :], "tokens": len(ids)}
    finish = "stop" if stopped else _finish(model, gen, ids, prompt_tokens)
    yield {"finish_reason": finish, "usage": _usage(prompt_tokens, ids), "ids": ids}


def _finish(model, gen, ids, prompt) -> str:
    """ "length" when the reply ran into max_new_tokens / max_length, else "stop"."""
    version = model.config.chatglm_version
    max_new, max_length = gen.get("max_new_tokens"), gen.get("max_length") or CHAT_DEFAULTS[version][0]
    return (
        "length" if (max_new and len(ids) >= max_new) or (not max_new and prompt + len(ids) >= max_length) else "stop"
    )


def _usage(prompt: int, ids) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": len(ids), "total_tokens": prompt + len(ids)}
