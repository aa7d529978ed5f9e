"""The app of openai_api.py: /v1/models and /v1/chat/completions, plain and streamed (see openai_api.py)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from .events import chat_events
from .fastapi_app import base_app
from .openai_messages import openai_to_chat
from .requests import (
    DEFAULT_MAX_BODY,
    RequestError,
    check_prompt,
    check_tools,
    context_length,
    generation_kwargs,
    parse_json_body,
    read_body,
)

MODEL_NAMES = {"v1": "chatglm-6b", "v2": "chatglm2-6b", "v3": "chatglm3-6b"}


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


class ChatCompletionRequest(Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    n: int | None = Field(None, ge=1, le=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    do_sample: bool | None = None  # not OpenAI's: false for greedy decoding whatever the temperature


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    errors = e.errors()
    parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in errors[:5]]
    return "; ".join(parts), (str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None)


def create_app(model, tokenizer, model_name: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               concurrency: int = 1, max_waiting: int = 64, max_batch: int = 8, allowed_hosts=None) -> FastAPI:  # fmt: skip
    """The app around a loaded model. With max_batch > 1 the model's engine (chatglm/engine.py) batches up to
    max_batch requests together; else generation runs on `concurrency` threads one step at a time. `max_waiting`
    more requests may queue; beyond that, 503 with Retry-After. `allowed_hosts` (serving.requests.allowed_hosts;
    None: any) are the Host headers served."""
    version = model.config.chatglm_version
    model_name = model_name or MODEL_NAMES[version]
    created = int(time.time())

    def error_json(e: RequestError) -> dict:
        return error_body(e.message, "server_busy" if e.status == 503 else "invalid_request_error", e.param)

    app = base_app("ChatGLM OpenAI-compatible API", model, error_json, concurrency=concurrency,
                   max_waiting=max_waiting, max_batch=max_batch, allowed_hosts=allowed_hosts)  # fmt: skip
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

    @app.get("/v1/models")
    async def list_models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "chatglm-toolkit"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        data = parse_json_body(await read_body(request, max_body_bytes), max_body_bytes)
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            raise RequestError(400, *_validation_message(e)) from None
        tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
        if tools and version != "v3":
            raise RequestError(400, "tools need a ChatGLM3 model", "tools")
        check_tools(tools)
        messages = [m.model_dump() for m in req.messages]
        query, history, role = openai_to_chat(version, messages, tools)
        gen = generation_kwargs(model, None, req.top_p, req.temperature, max_temperature=2.0)
        max_new = req.max_completion_tokens or req.max_tokens
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
        stops = [req.stop] if isinstance(req.stop, str) else [s for s in req.stop or [] if s]
        if len(stops) > 16:
            raise RequestError(400, "'stop' takes at most 16 sequences", "stop")
        await runner.check(lambda: check_prompt(model, tokenizer, query, history, role, gen, max_new))

        def events(cancel):
            return chat_events(model, tokenizer, query, history, role, gen, stops, bool(tools), cancel)

        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": now, "model": req.model or model_name}
        if req.stream:
            items = runner.stream(events)  # admitted now: a full server answers 503 before any stream
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(items, head, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        result = await runner.run(lambda cancel: list(events(cancel)), request)
        content = "".join(ev.get("content", "") for ev in result)
        calls = [tool_call(ev["tool_call"]) for ev in result if "tool_call" in ev]
        end = result[-1]
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": end["finish_reason"]}
        return dict(head, object="chat.completion", choices=[choice], usage=end["usage"])

    return app


def tool_call(call: dict, index: int | None = None) -> dict:
    out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
    return out if index is None else {"index": index, **out}


async def sse(items, head: dict, include_usage: bool):
    """Server-sent events: a role chunk, content / tool-call chunks, a finish chunk, [usage], then [DONE]."""

    def chunk(delta=None, finish=None, **extra):
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = dict(head, object="chat.completion.chunk", choices=choices, **extra)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    n_calls = 0
    try:
        async for ev in items:
            if "content" in ev:
                yield chunk({"content": ev["content"]})
            elif "tool_call" in ev:
                yield chunk({"tool_calls": [tool_call(ev["tool_call"], n_calls)]})
                n_calls += 1
            else:
                yield chunk({}, ev["finish_reason"])
                if include_usage:
                    yield chunk(usage=ev["usage"])
    except Exception as e:  # noqa: BLE001  (the status line is sent: report in the stream)
        yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'server_error'), ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
