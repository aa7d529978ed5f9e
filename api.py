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

from serving.api import create_app
from serving.fastapi_app import run_app
from serving.requests import add_server_args, allowed_hosts, exit_unless_listenable
from serving.workers import add_batch_args, check_batch_args

__all__ = ["create_app", "main"]


def main(argv=None):
    from utils import add_model_args, load_or_exit  # here, so that the app imports without the loaders

    parser = argparse.ArgumentParser(description="ChatGLM HTTP API (POST / with a prompt and a history)")
    add_model_args(parser)
    add_server_args(parser, port=8000)
    add_batch_args(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                        help="info (default) logs each reply's size; debug also its prompt and text")  # fmt: skip
    args = parser.parse_args(argv)
    check_batch_args(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    exit_unless_listenable(args.host, args.port)
    model, tokenizer = load_or_exit(args)
    app = create_app(model, tokenizer, args.max_body_bytes, max_waiting=args.max_waiting, max_batch=args.max_batch,
                     allowed_hosts=allowed_hosts(args.host, args.allow_host))  # fmt: skip
    run_app(app, args.host, args.port)  # SIGINT/SIGTERM: replies in flight get 2 s, then end (fastapi_app.run_app)


if __name__ == "__main__":
    main()
