"""The app of api.py: POST / with a prompt and a history answers the whole reply (see api.py for the contract)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from chatglm.engine import detach

from .requests import (
    DEFAULT_MAX_BODY,
    HostGuard,
    RequestError,
    check_history,
    check_prompt,
    field,
    generation_kwargs,
    now_string,
    parse_json_body,
    read_body,
)
from .workers import AsyncRunner, ClientGone, last_step, use_engine

logger = logging.getLogger("api")


def create_app(model, tokenizer, max_body_bytes: int = DEFAULT_MAX_BODY, concurrency: int = 1,
               max_waiting: int = 64, max_batch: int = 8, allowed_hosts=None) -> FastAPI:  # fmt: skip
    """The app around a loaded model. With max_batch > 1 the model's engine (chatglm/engine.py) batches up to
    max_batch requests together; else generation runs on `concurrency` threads one step at a time. `max_waiting`
    more requests may queue; beyond that, 503 with Retry-After. `allowed_hosts` (serving.requests.allowed_hosts;
    None: any) are the Host headers served."""
    batched, concurrency = use_engine(model, max_batch, max_waiting, concurrency)
    runner = AsyncRunner(concurrency, max_waiting)
    version = model.config.chatglm_version

    @asynccontextmanager
    async def lifespan(app):
        yield
        runner.close()
        if batched:
            detach(model)

    app = FastAPI(title="ChatGLM API", lifespan=lifespan)
    app.state.runner = runner

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse({"detail": e.message, "status": e.status}, status_code=e.status, headers=headers)

    app.add_middleware(HostGuard, allowed=allowed_hosts, refuse=refused)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, e: ClientGone):  # nobody reads this: the client closed the connection
        return JSONResponse({"detail": "client closed the request"}, status_code=499)

    @app.post("/")
    async def create_item(request: Request):
        data = parse_json_body(await read_body(request, max_body_bytes), max_body_bytes)
        prompt = field(data, "prompt", "str", required=True)
        history = check_history(version, data.get("history"))
        gen = generation_kwargs(model, field(data, "max_length", "int"), field(data, "top_p", "number"),
                                field(data, "temperature", "number"))  # fmt: skip
        await runner.check(lambda: check_prompt(model, tokenizer, prompt, history, gen=gen))
        response, history = await runner.run(
            lambda cancel: last_step(model, model.stream_chat(tokenizer, prompt, history, **gen), cancel), request
        )
        time = now_string()
        # what people said stays out of the log unless asked for (--log-level debug)
        logger.info("[%s] reply of %d characters to a prompt of %d", time, len(response), len(prompt))
        logger.debug('[%s] prompt:"%s", response:"%r"', time, prompt, response)
        return {"response": response, "history": history, "status": 200, "time": time}

    return app
