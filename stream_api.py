"""Streaming HTTP API for ChatGLM by polling: queue a request by id, then read its growing reply.

Behaves like the Flask stream_api.py proposed for THUDM/ChatGLM-6B (PR #266):
    POST /chat {"request_id", "query", "history"}    -> {"code": 0, "msg": "start process"}
    POST /get_response {"request_id"}                -> {"code": 0, "msg": "success", "response": {"is_finished",
                                                         "is_handled", "response", "timestamp"}}
code 100: busy (the waiting queue is full), 101: that request_id is still in process, 102: unknown request_id.
/chat also takes optional max_length, top_p and temperature (0 = greedy). GET /events/<request_id> pushes the
same states as server-sent events. Unlike the proposal, all state is under one lock, the queue and pool sizes
are options, and a finished reply is kept --ttl seconds after the client first read it (the proposal's
"60*60*1000" meant ms but counted s), never dropped before. Malformed requests get HTTP 400/413 with a "msg".
"""

import argparse

from serving.requests import add_server_args
from serving.stream_api import create_app

__all__ = ["create_app", "main"]


def main(argv=None):
    from utils import add_model_args, load_or_exit  # here, so that the app imports without the loaders

    parser = argparse.ArgumentParser(description="ChatGLM polling stream API (POST /chat, POST /get_response)")
    add_model_args(parser)
    add_server_args(parser, port=8000)
    parser.add_argument(
        "--workers", type=int, default=4, help="replies generated at once, batched together (default 4)"
    )
    parser.add_argument("--queue-size", type=int, default=16, help="requests waiting beyond those (code 100 when full)")
    parser.add_argument("--ttl", type=float, default=600.0, help="seconds a finished reply is kept after it was read")
    args = parser.parse_args(argv)
    model, tokenizer = load_or_exit(args)
    app = create_app(model, tokenizer, args.workers, args.queue_size, args.ttl, max_body_bytes=args.max_body_bytes)
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
