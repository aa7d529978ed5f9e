"""The app of openai_api.py: /v1/models and /v1/chat/completions, plain and streamed (see openai_api.py)."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from chatglm.sampling import ForcePrefix, LogitBias, LogprobRecorder, PresenceFrequencyPenalty

from .events import chat_events, completion_events
from .fastapi_app import base_app
from .openai_messages import openai_to_chat
from .requests import (
    DEFAULT_MAX_BODY,
    RequestError,
    check_body_limit,
    check_prompt,
    check_prompt_length,
    check_tools,
    context_length,
    generation_kwargs,
    parse_json_body,
    read_body,
)

MODEL_NAMES = {"v1": "chatglm-6b", "v2": "chatglm2-6b", "v3": "chatglm3-6b"}
KEEPALIVE_SECONDS = 15.0  # an SSE comment after this long with nothing to send (proxies drop idle streams)


class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class FunctionCall(Strict):
    name: str
    arguments: str = "{}"


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class Function(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class StreamOptions(Strict):
    include_usage: bool = False


class ToolChoiceFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class ResponseFormat(Strict):
    type: Literal["text"]  # the only format honoured: json_object / json_schema are refused by name


class Sampling(Strict):
    """What chat and text completions share."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    n: int | None = Field(None, ge=1, le=1)
    user: str | None = None  # an end user's id: accepted, changes nothing
    do_sample: bool | None = None  # not OpenAI's: false for greedy decoding whatever the temperature


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # ChatGLM3 calls one tool per turn: either value is honoured
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None


def _check_fields(data: dict, request_model) -> None:
    """400 naming the first field the server does not know (and so would not honour), as vLLM does for extras."""
    unknown = [k for k in data if k not in request_model.model_fields]
    if unknown:
        raise RequestError(400, f"'{unknown[0]}' is not supported by this server (it would be ignored): leave it out",
                           unknown[0])  # fmt: skip


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    errors = e.errors()
    parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in errors[:5]]
    return "; ".join(parts), (str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None)


def create_app(model, tokenizer, model_name: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               concurrency: int = 1, max_waiting: int = 64, max_batch: int = 8, allowed_hosts=None,
               api_key: str | None = None, keepalive: float = KEEPALIVE_SECONDS) -> FastAPI:  # fmt: skip
    """The app around a loaded model. With max_batch > 1 the model's engine (chatglm/engine.py) batches up to
    max_batch requests together; else generation runs on `concurrency` threads one step at a time. `max_waiting`
    more requests may queue; beyond that, 503 with Retry-After. `allowed_hosts` (serving.requests.allowed_hosts;
    None: any) are the Host headers served; with `api_key` every route but /health wants it as a Bearer token. A
    stream with nothing to send for `keepalive` seconds gets an SSE comment, so proxies keep it open. A body over
    `max_body_bytes` (>= 1) gets a 413."""
    check_body_limit(max_body_bytes)
    version = model.config.chatglm_version
    model_name = model_name or MODEL_NAMES[version]
    created = int(time.time())
    eos = model.reply_stop_ids(tokenizer)

    def error_json(e: RequestError) -> dict:
        kind = {503: "server_busy", 401: "invalid_request_error"}.get(e.status, "invalid_request_error")
        return error_body(e.message, kind, e.param, "invalid_api_key" if e.status == 401 else None)

    app = base_app("ChatGLM OpenAI-compatible API", model, error_json, concurrency=concurrency,
                   max_waiting=max_waiting, max_batch=max_batch, allowed_hosts=allowed_hosts,
                   api_key=api_key)  # fmt: skip
    runner = app.state.runner

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        return JSONResponse(error_body(f"generation failed: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    def card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "chatglm-toolkit",
                "max_model_len": context_length(model)}  # fmt: skip

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != model_name:
            raise RequestError(404, f"model {name!r} does not exist: this server serves {model_name!r}", "model")
        return card()

    async def parse(request: Request, request_model):
        data = parse_json_body(await read_body(request, max_body_bytes), max_body_bytes)
        _check_fields(data, request_model)
        try:
            return request_model.model_validate(data)
        except ValidationError as e:
            raise RequestError(400, *_validation_message(e)) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        choice = req.tool_choice
        tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []] if choice != "none" else []
        if tools and version != "v3":
            raise RequestError(400, "tools need a ChatGLM3 model", "tools")
        if choice not in (None, "none", "auto") and not tools:
            raise RequestError(400, "tool_choice 'required' or a named tool needs 'tools'", "tool_choice")
        check_tools(tools)
        if req.top_logprobs and not req.logprobs:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        messages = [m.model_dump() for m in req.messages]
        query, history, role = openai_to_chat(version, messages, tools)
        max_new = req.max_completion_tokens or req.max_tokens
        gen, stops, recorder = _options(model, tokenizer, req, max_new, req.top_logprobs or 0 if req.logprobs else None)
        if choice == "required" or isinstance(choice, NamedToolChoice):
            names = [t["name"] for t in tools] if choice == "required" else [choice.function.name]
            if names[0] not in {t["name"] for t in tools}:
                raise RequestError(400, f"tool_choice names {names[0]!r}, which is not among 'tools'", "tool_choice")
            # ChatGLM3 starts a tool call with the tool's name on the first line of its reply
            gen["logits_processor"].append(ForcePrefix([tokenizer.sp.encode(f"{n}\n") for n in names]))
        await runner.check(lambda: check_prompt(model, tokenizer, query, history, role, gen, max_new))

        def events(cancel):
            return chat_events(model, tokenizer, query, history, role, gen, stops, bool(tools), cancel)

        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model or model_name}
        logprobs = None if recorder is None else ChatLogprobs(tokenizer, recorder, eos)
        if req.stream:
            items = runner.stream(events, keepalive)  # admitted now: a full server answers 503 before any stream
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse_response(sse(items, head, usage, logprobs, "chat.completion.chunk"))
        result = await runner.run(lambda cancel: list(events(cancel)), request)
        content = "".join(ev.get("content", "") for ev in result)
        calls = [tool_call(ev["tool_call"]) for ev in result if "tool_call" in ev]
        end = result[-1]
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "logprobs": logprobs and logprobs.final(end),
                  "finish_reason": end["finish_reason"]}  # fmt: skip
        return dict(head, object="chat.completion", choices=[choice], usage=end["usage"])

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            raise RequestError(400, "'prompt' takes one text here (a list of exactly one)", "prompt")
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        if req.echo and req.logprobs is not None:
            raise RequestError(400, "'echo' with 'logprobs' (the prompt's log-probabilities) is not supported", "echo")
        gen, stops, recorder = _options(model, tokenizer, req, req.max_tokens, req.logprobs)

        def length():
            return check_prompt_length(model, len(tokenizer([prompt])["input_ids"][0]), gen, req.max_tokens)

        await runner.check(length)

        def events(cancel):
            return completion_events(model, tokenizer, prompt, gen, stops, cancel)

        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model or model_name}
        logprobs = None if recorder is None else CompletionLogprobs(tokenizer, recorder, eos)
        echo = prompt if req.echo else ""
        if req.stream:
            items = runner.stream(events, keepalive)
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse_response(sse(items, head, usage, logprobs, "text_completion", echo))
        result = await runner.run(lambda cancel: list(events(cancel)), request)
        end = result[-1]
        text = echo + "".join(ev.get("content", "") for ev in result)
        choice = {"index": 0, "text": text, "logprobs": logprobs and logprobs.final(end),
                  "finish_reason": end["finish_reason"]}  # fmt: skip
        return dict(head, object="text_completion", choices=[choice], usage=end["usage"])

    return app


def _options(model, tokenizer, req: Sampling, max_new: int | None, top_logprobs: int | None):
    """(generation options, stop strings, LogprobRecorder or None) from a request's sampling fields."""
    gen = generation_kwargs(model, None, req.top_p, req.temperature, max_temperature=2.0)
    if max_new is not None:
        if max_new > context_length(model):
            raise RequestError(400, f"'max_tokens' must be at most {context_length(model)}", "max_tokens")
        gen["max_new_tokens"] = max_new
    if req.do_sample is False:
        gen["do_sample"] = False
    if req.repetition_penalty is not None:
        gen["repetition_penalty"] = req.repetition_penalty
    if req.seed is not None:
        import torch

        gen["generator"] = torch.Generator(device=model.device).manual_seed(req.seed)
    recorder = None if top_logprobs is None else LogprobRecorder(top_logprobs, tokenizer.vocab_size)
    processors = [recorder] if recorder else []  # first: it reads the model's own distribution
    if req.logit_bias:
        processors.append(LogitBias(_logit_bias(req.logit_bias, tokenizer.vocab_size)))
    if req.presence_penalty or req.frequency_penalty:
        processors.append(PresenceFrequencyPenalty(req.presence_penalty or 0.0, req.frequency_penalty or 0.0))
    gen["logits_processor"] = processors
    stops = [req.stop] if isinstance(req.stop, str) else [s for s in req.stop or [] if s]
    if len(stops) > 16:
        raise RequestError(400, "'stop' takes at most 16 sequences", "stop")
    return gen, stops, recorder


def _logit_bias(bias: dict[str, float], vocab: int) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab:
            raise RequestError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab - 1})",
                               "logit_bias")  # fmt: skip
        if not -100 <= value <= 100:
            raise RequestError(400, f"logit_bias: the bias of {key} must be from -100 to 100", "logit_bias")
        out[int(key)] = float(value)
    return out


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes a token stands for in the text (a byte-fallback piece: its byte; "▁": a space)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    blank = re.fullmatch(r"<\|blank_(\d+)\|>", piece)  # ChatGLM-6B's runs of spaces, tab and newline
    if blank:
        return b" " * int(blank.group(1))
    piece = {"<n>": "\n", "<|tab|>": "\t"}.get(piece, piece)
    return piece.replace("\u2581", " ").encode("utf-8")


class _Logprobs:
    """OpenAI logprobs from a LogprobRecorder: `delta(tokens)` for the tokens a stream chunk adds, `final(end)`
    for the rest once generation is over (a closing stop token left out)."""

    def __init__(self, tokenizer, recorder, stop_ids):
        self.tokenizer, self.recorder, self.stop_ids, self.sent = tokenizer, recorder, stop_ids, 0
        self.at = 0  # characters of text the entries sent so far stand for (completions' text_offset)

    def _text(self, token: int) -> tuple[str, list[int]]:
        raw = token_bytes(self.tokenizer, token)
        return raw.decode("utf-8", "backslashreplace"), list(raw)

    def delta(self, tokens: int):
        new = self.recorder.entries(tokens)[self.sent :]
        self.sent += len(new)
        return self.format(new) if new else None

    def final(self, end: dict):
        """The entries not sent yet, given the finish event (`ids`: every generated token)."""
        entries = self.recorder.finish(end["ids"])
        if entries and entries[-1][0] in self.stop_ids:
            entries = entries[:-1]
        new = entries[self.sent :]
        self.sent = len(entries)
        return self.format(new)


class ChatLogprobs(_Logprobs):
    def format(self, entries) -> dict:
        content = []
        for token, lp, tops in entries:
            text, raw = self._text(token)
            top = [dict(zip(("token", "bytes"), self._text(t)), logprob=v) for t, v in tops]
            content.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": top})
        return {"content": content}


class CompletionLogprobs(_Logprobs):
    def format(self, entries) -> dict:
        texts = [self._text(t)[0] for t, _, _ in entries]
        offsets = []
        for t in texts:  # from the start of the completion, across stream chunks
            offsets.append(self.at)
            self.at += len(t)
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries], "text_offset": offsets,
                "top_logprobs": [{self._text(t)[0]: v for t, v in tops} for _, _, tops in entries]}  # fmt: skip


def tool_call(call: dict, index: int | None = None) -> dict:
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
    return out if index is None else {"index": index, **out}


def _sse_response(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


async def sse(items, head: dict, include_usage: bool, logprobs=None, kind: str = "chat.completion.chunk",
              echo: str = ""):  # fmt: skip
    """Server-sent events: (chat) a role chunk, content / tool-call chunks, a finish chunk, [usage], then [DONE];
    an SSE comment line for each None among the items (AsyncRunner.stream's keep-alive when nothing came)."""
    chat = kind == "chat.completion.chunk"

    def chunk(delta=None, finish=None, lp=None, **extra):
        if delta is None:
            choices = []
        elif chat:
            choices = [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": delta.get("content", ""), "logprobs": lp, "finish_reason": finish}]
        body = dict(head, object=kind, choices=choices, **extra)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        elif echo:
            yield chunk({"content": echo})
        n_calls = 0
        try:
            async for ev in items:
                if ev is None:
                    yield ": keep-alive\n\n"
                elif "content" in ev:
                    yield chunk({"content": ev["content"]}, lp=logprobs and logprobs.delta(ev["tokens"]))
                elif "tool_call" in ev:
                    yield chunk({"tool_calls": [tool_call(ev["tool_call"], n_calls)]})
                    n_calls += 1
                else:
                    yield chunk({}, ev["finish_reason"], lp=logprobs and logprobs.final(ev))
                    if include_usage:
                        yield chunk(usage=ev["usage"])
        except Exception as e:  # noqa: BLE001  (the status line is sent: report in the stream)
            message = e.message if isinstance(e, RequestError) else f"generation failed: {e}"  # shutting down
            yield f"data: {json.dumps(error_body(message, 'server_error'), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # however the stream ends (its client gone before the first chunk too), its work stops
        await items.aclose()
