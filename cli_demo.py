"""Chat with ChatGLM in the terminal.

Behaves like THUDM/ChatGLM-6B and ChatGLM2-6B cli_demo.py: type a message after "用户：", the reply streams
after "ChatGLM："; `clear` empties the history, `stop` exits; Ctrl-C during a reply stops that reply and
keeps the session, Ctrl-C or Ctrl-D at the prompt exits. ChatGLM2/3 continue from the KV cache between turns.
Model options (MODEL_PATH, --model-path, --device, --quantize, ...) are those of utils.add_model_args; with
no model it runs the built-in tiny random model.
"""

import argparse
import json
import sys

from utils import add_model_args, load_from_args

NAMES = {"v1": "ChatGLM-6B", "v2": "ChatGLM2-6B", "v3": "ChatGLM3-6B"}


def show(response) -> str:
    return response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Chat with ChatGLM in the terminal.")
    add_model_args(parser)
    parser.add_argument("--max-length", type=int, default=None, help="prompt + reply tokens (default: the model's)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_from_args(args)
    except (OSError, ValueError, RuntimeError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    version = model.config.chatglm_version
    welcome = f"欢迎使用 {NAMES[version]} 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"
    gen = dict(max_length=args.max_length, top_p=args.top_p, temperature=args.temperature)
    if not args.model_path and args.max_length is None:
        gen["max_length"] = 256  # the tiny model's replies are noise: keep them short
    history, past = [], None
    print(welcome)
    while True:
        try:
            query = input("\n用户：").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query == "stop":
            return 0
        if query == "clear":
            history, past = [], None
            print("\033[2J\033[H" + welcome if sys.stdout.isatty() else welcome)
            continue
        if not query:
            continue
        print("\nChatGLM：", end="", flush=True)
        shown, state = "", None
        try:
            if version == "v1":  # ChatGLM-6B re-reads the whole conversation every turn
                stream = ((r, h, None) for r, h in model.stream_chat(tokenizer, query, history=history, **gen))
            else:
                stream = model.stream_chat(tokenizer, query, history=history, past_key_values=past,
                                           return_past_key_values=True, **gen)  # fmt: skip
            for state in stream:
                text = show(state[0])
                print(text[len(shown) :] if text.startswith(shown) else "\n" + text, end="", flush=True)
                shown = text
            history, past = state[1], state[2]
        except KeyboardInterrupt:  # stop this reply, keep what was said, and the session
            if state is not None:
                history = state[1]
            past = None  # the cache may hold tokens the history does not: rebuild it next turn
        print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
