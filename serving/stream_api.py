"""The app of stream_api.py: queue a request by id, read its growing reply by polling or server-sent events."""

from __future__ import annotations

import json
import threading

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from .polling import PollingQueue
from .requests import (
    DEFAULT_MAX_BODY,
    RequestError,
    check_body_limit,
    check_history,
    check_host,
    check_prompt,
    field,
    generation_kwargs,
    parse_json_body,
)
from .workers import use_engine

KEEPALIVE_S = 15.0
CLIENT_IDS_HELP = (
    "request ids are issued by the server: leave out 'request_id' and poll with the one in the reply "
    "(start the server with --client-ids for the original protocol, where clients choose them)"
)


def create_app(model, tokenizer, workers: int = 4, max_waiting: int = 16, ttl: float = 600.0,
               abandon_ttl: float | None = 600.0, max_body_bytes: int = DEFAULT_MAX_BODY, client_ids: bool = False,
               max_event_streams: int = 32, allowed_hosts=None) -> Flask:  # fmt: skip
    """The app around a loaded model: `workers` replies generated at once (batched together by the model's engine,
    chatglm/engine.py, when workers > 1), `max_waiting` more queued. A reply is kept `ttl` seconds after it was
    first read, `abandon_ttl` seconds after it finished if never read. Request ids are issued by the server unless
    `client_ids` (the original protocol, where any client that knows or guesses an id reads that reply). At most
    `max_event_streams` /events streams are open at once. `allowed_hosts` (serving.requests.allowed_hosts; None:
    any) are the Host headers served; a body over `max_body_bytes` (>= 1) gets a 413."""
    check_body_limit(max_body_bytes)  # before the engine and the queue's threads start
    use_engine(model, workers, max_waiting, workers)
    queue = PollingQueue(model, tokenizer, workers, max_waiting, ttl, abandon_ttl)
    version = model.config.chatglm_version
    app = Flask(__name__)
    app.json.ensure_ascii = False  # Chinese replies readable as they are
    app.extensions["chatglm_queue"] = queue
    streams = threading.BoundedSemaphore(max_event_streams)

    @app.errorhandler(RequestError)
    def refused(e: RequestError):
        headers = {"Retry-After": "1"} if e.status == 503 else {}
        return {"code": e.status, "msg": e.message}, e.status, headers

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):  # 404, 405 (a GET on a POST route), ...: JSON like every other error
        allow = getattr(e, "valid_methods", None)
        return {"code": e.code, "msg": e.description}, e.code, {"Allow": ", ".join(allow)} if allow else {}

    @app.before_request
    def host_guard():
        check_host(request.headers.get("Host"), allowed_hosts)

    def body() -> dict:
        # Read here, not through MAX_CONTENT_LENGTH, which cuts a chunked body at the limit without a word.
        declared = request.content_length
        if declared is not None and declared > max_body_bytes:
            raise RequestError(413, f"request body is larger than {max_body_bytes} bytes")
        return parse_json_body(request.stream.read(max_body_bytes + 1), max_body_bytes)

    def request_id(data) -> str:
        rid = data.get("request_id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not 0 < len(rid) <= 256:
            raise RequestError(400, "'request_id' must be a non-empty string (at most 256 characters)")
        return rid

    @app.post("/chat")
    def chat():
        data = body()
        if client_ids:
            rid = request_id(data)
        elif data.get("request_id") is not None:
            raise RequestError(400, CLIENT_IDS_HELP)
        else:
            rid = None
        query = field(data, "query", "str", required=True)
        history = check_history(version, data.get("history"))
        gen = generation_kwargs(model, field(data, "max_length", "int"), field(data, "top_p", "number"),
                                field(data, "temperature", "number"))  # fmt: skip
        check_prompt(model, tokenizer, query, history, gen=gen)
        code, msg, rid = queue.submit(rid, query, history, gen)
        if code or client_ids:  # the original reply
            return {"code": code, "msg": msg}
        return {"code": code, "msg": msg, "request_id": rid}

    @app.post("/cancel")
    def cancel():
        rid = request_id(body())
        if not queue.cancel(rid):
            return {"code": PollingQueue.UNKNOWN, "msg": f"request_id {rid!r} not found"}
        return {"code": 0, "msg": "cancelled"}

    @app.post("/get_response")
    def get_response():
        rid = request_id(body())
        state = queue.poll(rid)
        if state is None:
            return {"code": PollingQueue.UNKNOWN, "msg": f"request_id {rid!r} not found"}
        state.pop("version")
        return {"code": 0, "msg": "success", "response": state}

    @app.get("/events/<rid>")
    def events(rid):
        if queue.poll(rid) is None:
            return {"code": PollingQueue.UNKNOWN, "msg": f"request_id {rid!r} not found"}, 404
        if not streams.acquire(blocking=False):
            raise RequestError(503, f"{max_event_streams} event streams are open already, try again later")

        def stream():
            seen, text = -1, ""
            while True:
                state = queue.wait_change(rid, seen, KEEPALIVE_S)
                if state is None:
                    return
                if state["version"] == seen:
                    yield ": keep-alive\n\n"
                    continue
                seen = state.pop("version")
                reply = state["response"]
                # the growing text (it only grows: serving/events.py) and what was added; null for a ChatGLM3 tool
                # call, which replaces the text
                new = isinstance(reply, str) and reply.startswith(text)
                state["delta"] = reply[len(text) :] if new else None
                text = reply if isinstance(reply, str) else ""
                yield f"data: {json.dumps(state, ensure_ascii=False)}\n\n"
                if state["is_finished"]:
                    return

        response = Response(stream(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
        response.call_on_close(streams.release)  # the reply finished, or the client left (seen at the next write)
        return response

    return app
