# Behaves like THUDM/ChatGLM-6B cli_demo.py (and ChatGLM2-6B's, which keeps the KV cache between turns).
"""Chat with ChatGLM in the terminal.

Type after "用户：", the reply streams after "ChatGLM："; `clear` empties the history, `stop` exits. Ctrl-C
during a reply stops that reply (what was said stays in the history); Ctrl-C or Ctrl-D at the prompt exits.
Model: --model-path or MODEL_PATH; with none, the built-in tiny random model (its answers are random text).
"""

import argparse
import json
import math
import sys

from serving.requests import MAX_TEMPERATURE, generation_kwargs
from utils import add_model_args, load_or_exit, max_length_error

NAMES = {"v1": "ChatGLM-6B", "v2": "ChatGLM2-6B", "v3": "ChatGLM3-6B"}


def show(response) -> str:
    return response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)  # v3 tool calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Chat with ChatGLM in the terminal.")
    add_model_args(parser)
    parser.add_argument("--max-length", type=int, default=None, help="prompt + reply tokens (default: the model's)")
    parser.add_argument("--top-p", type=float, default=None, help="0 to 1 (default: the model's)")
    parser.add_argument("--temperature", type=float, default=None, help="0 (greedy) or more (default: the model's)")
    args = parser.parse_args(argv)
    for flag, value, ok, rule in (  # before the model loads: one line, not a traceback at the first message
        ("--top-p", args.top_p, lambda v: 0 <= v <= 1, "from 0 to 1"),
        ("--temperature", args.temperature, lambda v: 0 <= v <= MAX_TEMPERATURE, f"0 (greedy) to {MAX_TEMPERATURE:g}"),
        ("--max-length", args.max_length, lambda v: v >= 1, "at least 1"),
    ):
        if value is not None and not (math.isfinite(value) and ok(value)):
            parser.error(f"{flag} must be {rule}, got {value:g}")
    model, tokenizer = load_or_exit(args)
    error = max_length_error(model, args.max_length)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    version = model.config.chatglm_version
    welcome = f"欢迎使用 {NAMES[version]} 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"
    # the servers' rules (0: greedy); without --max-length the tiny model's replies are kept to its loader's
    # default_max_new_tokens (as its note says), whatever the length of the conversation before them
    gen = generation_kwargs(model, args.max_length, args.top_p, args.temperature)
    history, past = [], None
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused alone, not the buffer it came in
        sys.stdin.reconfigure(errors="surrogateescape")
    print(welcome)
    while True:
        try:
            query = input("\n用户：").strip()
            query.encode("utf-8")  # bytes that are not UTF-8 arrive as lone surrogates, which no tokenizer takes
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        except UnicodeEncodeError:
            print("error: that input is not UTF-8 text: set the terminal's encoding to UTF-8", file=sys.stderr)
            continue
        if query == "stop":
            return 0
        if query == "clear":
            history, past = [], None
            print(welcome)
            continue
        if not query:
            continue
        print("\nChatGLM：", end="", flush=True)
        # v2/v3 continue from the cache of the last complete turn; with none but a history (after Ctrl-C) the
        # whole conversation is sent that turn. v1 always sends the whole conversation.
        use_past = version != "v1" and (past is not None or not history)
        shown, state = "", None
        try:
            if use_past:
                stream = model.stream_chat(tokenizer, query, history=history, past_key_values=past,
                                           return_past_key_values=True, **gen)  # fmt: skip
            else:
                stream = model.stream_chat(tokenizer, query, history=history, **gen)
            for state in stream:
                text = show(state[0])
                print(text[len(shown) :] if text.startswith(shown) else "\n" + text, end="", flush=True)
                shown = text
            history = state[1]
            past = state[2] if use_past else None
        except KeyboardInterrupt:  # stop this reply, keep what was said, and the session
            if state is not None:
                history = state[1]
            past = None  # the cache holds tokens the history may not: send the whole conversation next turn
        print(flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # while loading
        sys.exit(130)
