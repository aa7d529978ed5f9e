"""Model access for the composite demo: ChatGLM3 loaded through utils.py, chatted with through `stream_chat`.

    client = create_client(["--model-path", "/models/chatglm3-6b"])   # or MODEL_PATH=...; none: the tiny model
    for response, history in client.stream_chat("你好", history=[...], role="user", max_new_tokens=256):
        ...

`response` is the text so far, or a dict `{"name", "parameters"}` / `{"name", "content"}` once the reply is a tool
or interpreter call (chatglm.generation.process_response). The model is shared by every browser session: its
engine (chatglm/engine.py, `--max-batch`, default 4) generates the replies of sessions chatting at once together;
with --max-batch 1 one generation runs at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator

from chatglm.engine import attach
from utils import NAMES, add_model_args, load_from_args

GENERATION_KEYS = ("top_p", "temperature", "repetition_penalty", "max_new_tokens")


class Client:
    """A ChatGLM3 model and tokenizer with a lock around generation."""

    def __init__(self, model, tokenizer, tiny: bool = False, name: str | None = None):
        version = getattr(tokenizer, "chatglm_version", None) or model.config.chatglm_version
        if version != "v3":
            raise ValueError(
                f"the composite demo needs ChatGLM3-6B (v3: roles, tools, code interpreter); this is "
                f"{NAMES.get(version, version)}"
            )
        self.model, self.tokenizer, self.tiny = model, tokenizer, tiny
        self.name = name or NAMES["v3"]
        self.lock = threading.Lock()

    def stream_chat(self, query: str, history: list[dict], role: str = "user", **gen) -> Iterator[tuple]:
        """(response, history) as the reply grows; gen: top_p, temperature, repetition_penalty, max_new_tokens."""
        unknown = set(gen) - set(GENERATION_KEYS)
        if unknown:
            raise TypeError(f"unexpected generation settings: {', '.join(sorted(unknown))}")
        kwargs = {k: v for k, v in gen.items() if v is not None}
        if kwargs.get("repetition_penalty", 1) <= 0:
            kwargs.pop("repetition_penalty")  # 0 would divide by zero: no penalty
        if kwargs.get("temperature", 1) <= 0 or kwargs.get("top_p", 1) <= 0:
            kwargs.pop("temperature", None)  # temperature 0 (or top_p 0) means: always the most likely token
            kwargs.pop("top_p", None)
            kwargs["do_sample"] = False
        yield from self._stream(query, history, role, kwargs)

    def _stream(self, query: str, history: list[dict], role: str, kwargs: dict) -> Iterator[tuple]:
        batched = getattr(self.model, "engine", None) is not None  # it batches the sessions' replies: no lock
        with contextlib.nullcontext() if batched else self.lock:
            yield from self.model.stream_chat(self.tokenizer, query, history=history, role=role, **kwargs)


_factory: Callable[[], Client] | None = None


def set_client_factory(factory: Callable[[], Client] | None) -> None:
    """Make `create_client` return `factory()` (tests use it to put a scripted model behind the page)."""
    global _factory
    _factory = factory


def create_client(argv: list[str] | None = None) -> Client:
    """The model of the command line after `--` (utils.add_model_args, with their environment variables)."""
    if _factory is not None:
        return _factory()
    parser = add_model_args(argparse.ArgumentParser(prog="composite_demo", allow_abbrev=False))
    parser.add_argument("--max-batch", type=int, default=4, help="replies generated together (default 4)")
    parser.add_argument("--demo", action="store_true",
                        help="demonstration mode: the model writes scripted tool calls and code cells "
                             "(composite_demo/demonstration.py)")  # fmt: skip
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    args.tiny_version = "v3"  # this demo is ChatGLM3's
    model, tokenizer = load_from_args(args)
    if args.max_batch > 1:
        attach(model, max_batch=args.max_batch)
    if args.demo:
        from .demonstration import DemonstrationClient

        return DemonstrationClient(model, tokenizer, tiny=not args.model_path)
    return Client(model, tokenizer, tiny=not args.model_path)
