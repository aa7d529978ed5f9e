"""What api.py's and openai_api.py's FastAPI apps share: worker threads, the engine while the app runs, refusals
in the app's own error shape, the Host guard."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from chatglm.engine import detach

from .requests import BearerAuth, HostGuard, RequestError
from .workers import AsyncRunner, ClientGone, use_engine

GRACE_SECONDS = 2.0  # after SIGINT/SIGTERM, how long replies in flight may take to finish before their work stops


def run_app(app: FastAPI, host: str, port: int) -> None:
    """Serve `app` (made by base_app) with uvicorn until SIGINT/SIGTERM. Then replies in flight get GRACE_SECONDS
    to finish; after that their work is cancelled and each ends in the API's own way (a plain request a 503, a
    stream an error event and its end), so the server exits within seconds, without uvicorn cancelling tasks
    mid-write (an ERROR line and a traceback, streams cut without their end). Ctrl+C exits with status 130."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                timer = threading.Timer(GRACE_SECONDS, app.state.runner.close)
                timer.daemon = True  # an idle server exits at once
                timer.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, workers=1, timeout_graceful_shutdown=GRACE_SECONDS + 5)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it caught again once it has stopped
        raise SystemExit(130) from None


def base_app(title: str, model, error_json: Callable[[RequestError], dict], *, concurrency: int, max_waiting: int,
             max_batch: int, allowed_hosts, api_key: str | None = None) -> FastAPI:  # fmt: skip
    """A FastAPI app around `model`: with max_batch > 1 the model's engine (chatglm/engine.py) batches up to
    max_batch requests (taken off the model when the app stops), else `concurrency` threads generate one step at a
    time; `max_waiting` more may queue (app.state.runner). A RequestError is answered as error_json(e) with its
    status (503 with Retry-After); a client that left (while its body was read, or its reply made) gets 499, which
    nobody reads, and no traceback in the log; Host headers outside `allowed_hosts` are refused; with `api_key`,
    requests without it as a Bearer token too (but /health)."""
    batched, concurrency = use_engine(model, max_batch, max_waiting, concurrency)
    runner = AsyncRunner(concurrency, max_waiting)

    @asynccontextmanager
    async def lifespan(app):
        yield
        runner.close()
        if batched:
            detach(model)

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.runner = runner

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(error_json(e), status_code=e.status, headers=headers)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # read_body: the connection closed before the whole body came
    async def gone(request: Request, e: ClientGone | ClientDisconnect):  # nobody reads this: the client left
        return JSONResponse({"detail": "client closed the request"}, status_code=499)

    if api_key:
        app.add_middleware(BearerAuth, key=api_key, refuse=refused)
    app.add_middleware(HostGuard, allowed=allowed_hosts, refuse=refused)  # added last: runs first
    return app
