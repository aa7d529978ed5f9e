"""The app of api.py: POST / with a prompt and a history answers the whole reply (see api.py for the contract)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request

from .fastapi_app import base_app
from .requests import (
    DEFAULT_MAX_BODY,
    check_body_limit,
    check_history,
    check_prompt,
    field,
    generation_kwargs,
    now_string,
    parse_json_body,
    read_body,
)
from .workers import last_step

logger = logging.getLogger("api")


def create_app(model, tokenizer, max_body_bytes: int = DEFAULT_MAX_BODY, concurrency: int = 1,
               max_waiting: int = 64, max_batch: int = 8, allowed_hosts=None) -> FastAPI:  # fmt: skip
    """The app around a loaded model. With max_batch > 1 the model's engine (chatglm/engine.py) batches up to
    max_batch requests together; else generation runs on `concurrency` threads one step at a time. `max_waiting`
    more requests may queue; beyond that, 503 with Retry-After. `allowed_hosts` (serving.requests.allowed_hosts;
    None: any) are the Host headers served; a body over `max_body_bytes` (>= 1) gets a 413."""
    check_body_limit(max_body_bytes)
    app = base_app("ChatGLM API", model, lambda e: {"detail": e.message, "status": e.status},
                   concurrency=concurrency, max_waiting=max_waiting, max_batch=max_batch,
                   allowed_hosts=allowed_hosts)  # fmt: skip
    runner, version = app.state.runner, model.config.chatglm_version

    @app.post("/")
    async def create_item(request: Request):
        data = parse_json_body(await read_body(request, max_body_bytes), max_body_bytes)
        prompt = field(data, "prompt", "str", required=True)
        history = check_history(version, data.get("history"))
        gen = generation_kwargs(model, field(data, "max_length", "int"), field(data, "top_p", "number"),
                                field(data, "temperature", "number"))  # fmt: skip
        await runner.check(lambda: check_prompt(model, tokenizer, prompt, history, gen=gen))
        response, history = await runner.run(
            # only the last step is answered: the engine's tokens handed over together are one step
            lambda cancel: last_step(
                model, model.stream_chat(tokenizer, prompt, history, every_token=False, **gen), cancel
            ),
            request,
        )
        time = now_string()
        # what people said stays out of the log unless asked for (--log-level debug)
        logger.info("[%s] reply of %d characters to a prompt of %d", time, len(response), len(prompt))
        logger.debug('[%s] prompt:"%s", response:"%r"', time, prompt, response)
        return {"response": response, "history": history, "status": 200, "time": time}

    return app
