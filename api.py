"""HTTP API for ChatGLM: POST a prompt and a history, get the reply.

Behaves like THUDM/ChatGLM-6B and ChatGLM2-6B api.py: POST / with {"prompt", "history", "max_length", "top_p",
"temperature"} (all but prompt optional, the model's chat defaults otherwise) answers {"response", "history",
"status": 200, "time": "YYYY-MM-DD HH:MM:SS"}:

    curl -X POST http://127.0.0.1:8000 -H 'Content-Type: application/json' -d '{"prompt": "你好", "history": []}'

Unlike the original it generates on a worker thread (the server keeps answering while a reply is computed),
checks requests (4xx with a "detail" message), binds 127.0.0.1 unless --host says otherwise, and accepts
temperature 0 for greedy decoding. History is a list of [query, response] pairs, or role messages for ChatGLM3.
"""

import argparse
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from chatglm.engine import detach
from chatglm.serving import (
    DEFAULT_MAX_BODY,
    AsyncRunner,
    RequestError,
    add_batch_args,
    add_server_args,
    check_batch_args,
    check_history,
    field,
    generation_kwargs,
    last_step,
    now_string,
    parse_json_body,
    read_body,
    use_engine,
)

logger = logging.getLogger("api")


def create_app(model, tokenizer, max_body_bytes: int = DEFAULT_MAX_BODY, concurrency: int = 1,
               max_waiting: int = 64, max_batch: int = 8) -> FastAPI:  # fmt: skip
    """The app around a loaded model. With max_batch > 1 the model's engine (chatglm/engine.py) batches up to
    max_batch requests together; else generation runs on `concurrency` threads one step at a time. `max_waiting`
    more requests may queue; beyond that, 503 with Retry-After."""
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

    @app.post("/")
    async def create_item(request: Request):
        data = parse_json_body(await read_body(request, max_body_bytes), max_body_bytes)
        prompt = field(data, "prompt", "str", required=True)
        history = check_history(version, data.get("history"))
        gen = generation_kwargs(model, field(data, "max_length", "int"), field(data, "top_p", "number"),
                                field(data, "temperature", "number"))  # fmt: skip
        response, history = await runner.run(
            lambda: last_step(model, model.stream_chat(tokenizer, prompt, history, **gen))
        )
        time = now_string()
        logger.info('[%s] prompt:"%s", response:"%r"', time, prompt, response)
        return {"response": response, "history": history, "status": 200, "time": time}

    return app


def main(argv=None):
    from utils import add_model_args, load_or_exit  # here, so that the app imports without the loaders

    parser = argparse.ArgumentParser(description="ChatGLM HTTP API (POST / with a prompt and a history)")
    add_model_args(parser)
    add_server_args(parser, port=8000)
    add_batch_args(parser)
    args = parser.parse_args(argv)
    check_batch_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tokenizer = load_or_exit(args)
    import uvicorn

    app = create_app(model, tokenizer, args.max_body_bytes, max_waiting=args.max_waiting, max_batch=args.max_batch)
    uvicorn.run(app, host=args.host, port=args.port, workers=1)


if __name__ == "__main__":
    main()
