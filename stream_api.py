"""Streaming HTTP API for ChatGLM by polling: queue a request, then read its growing reply by its id.

Follows the Flask stream_api.py proposed for THUDM/ChatGLM-6B (PR #266), except that the server issues the ids:
    POST /chat {"query", "history"}            -> {"code": 0, "msg": "start process", "request_id": "<id>"}
    POST /get_response {"request_id"}          -> {"code": 0, "msg": "success", "response": {"is_finished",
                                                   "is_handled", "response", "timestamp"}}
    POST /cancel {"request_id"}                -> {"code": 0, "msg": "cancelled"} (stops it, waiting or running)
code 100: busy (the waiting queue is full), 101: that request_id is still in process, 102: unknown request_id.
/chat also takes optional max_length, top_p and temperature (0 = greedy). GET /events/<request_id> pushes the
same states as server-sent events. The ids are unguessable, so no client reads another's reply; --client-ids
brings back the original protocol, where clients send their own "request_id" to /chat. Unlike the proposal, all
state is under one lock, the queue and pool sizes are options, a finished reply is kept --ttl seconds after the
client first read it (the proposal's "60*60*1000" meant ms but counted s) and --unread-ttl seconds if nobody
reads it. Malformed requests get HTTP 400/413 with a "msg"; a prompt longer than the model's context is a 400.
"""

import argparse
import logging

from serving.requests import add_server_args, allowed_hosts, exit_unless_listenable
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
    parser.add_argument("--unread-ttl", type=float, default=600.0,
                        help="seconds a finished reply nobody read is kept (default 600)")  # fmt: skip
    parser.add_argument("--client-ids", action="store_true",
                        help="clients choose request ids, as in the original protocol (anyone who knows or guesses "
                             "an id can read that reply); by default the server issues unguessable ids")  # fmt: skip
    parser.add_argument("--max-event-streams", type=int, default=32, help="open /events streams at most (default 32)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.queue_size < 0 or args.ttl < 0 or args.unread_ttl < 0 or args.max_event_streams < 1:
        parser.error("--workers and --max-event-streams must be >= 1; --queue-size, --ttl, --unread-ttl >= 0")
    exit_unless_listenable(args.host, args.port, every_address=False)  # werkzeug binds one socket
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # what was loaded, as api.py says it
    model, tokenizer = load_or_exit(args)
    app = create_app(model, tokenizer, args.workers, args.queue_size, args.ttl, args.unread_ttl,
                     args.max_body_bytes, args.client_ids, args.max_event_streams,
                     allowed_hosts(args.host, args.allow_host))  # fmt: skip
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
