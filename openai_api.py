"""OpenAI-compatible API for ChatGLM: /v1/chat/completions and /v1/completions (plain and streamed), /v1/models,
tools on ChatGLM3.

Behaves like THUDM/ChatGLM2-6B openai_api.py and ChatGLM3 openai_api_demo/api_server.py, so any OpenAI client
works against it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "你好"}])

Unlike those it honours temperature (0 = greedy), top_p, max_tokens, stop, seed, repetition_penalty,
presence_penalty, frequency_penalty, logit_bias, logprobs with top_logprobs (the model's own distribution,
before temperature and penalties), tool_choice none / auto / required / a named function; a field it does not
honour is a 400 naming it, not silently dropped. It counts usage in tokens, answers errors in OpenAI's shape,
streams deltas that concatenate to the plain answer (with an SSE comment every 15 s of silence), and reads
tool-call arguments with `ast` (never eval). ChatGLM3 `tools` give `tool_calls` with finish_reason "tool_calls";
send the results back as role "tool" messages. System messages: ChatGLM3's system role; ChatGLM-6B / ChatGLM2-6B
put a leading system message before the last user message, as ChatGLM2's server did. /v1/completions continues a
raw prompt (no chat template). --api-key (or CHATGLM_API_KEY) makes every route but /health want
`Authorization: Bearer <key>`.
"""

import argparse
import logging
import os

from serving.fastapi_app import run_app
from serving.openai_api import create_app
from serving.requests import add_server_args, allowed_hosts, exit_unless_listenable
from serving.workers import add_batch_args, check_batch_args

__all__ = ["create_app", "main"]


def main(argv=None):
    from utils import add_model_args, load_or_exit  # here, so that the app imports without the loaders

    parser = argparse.ArgumentParser(description="OpenAI-compatible ChatGLM API (/v1/chat/completions)")
    add_model_args(parser)
    add_server_args(parser, port=8000)
    parser.add_argument("--model-name", default=None, help="model id in /v1/models (default: chatglmN-6b)")
    parser.add_argument("--api-key", default=os.environ.get("CHATGLM_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on every route but /health (default: the "
                             "CHATGLM_API_KEY environment variable; none: open to whoever reaches the port)")  # fmt: skip
    add_batch_args(parser)
    args = parser.parse_args(argv)
    check_batch_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # what was loaded, as api.py says it
    exit_unless_listenable(args.host, args.port)
    model, tokenizer = load_or_exit(args)
    app = create_app(model, tokenizer, args.model_name, args.max_body_bytes, max_waiting=args.max_waiting,
                     max_batch=args.max_batch, allowed_hosts=allowed_hosts(args.host, args.allow_host),
                     api_key=args.api_key)  # fmt: skip
    run_app(app, args.host, args.port)  # SIGINT/SIGTERM: replies in flight get 2 s, then end (fastapi_app.run_app)


if __name__ == "__main__":
    main()
