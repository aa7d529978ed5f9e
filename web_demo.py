"""Chat with ChatGLM in the browser (Gradio).

Behaves like THUDM/ChatGLM-6B and ChatGLM2-6B web_demo.py: the chat, an input box with Submit, "Clear History",
and Maximum length / Top P / Temperature sliders starting at each generation's defaults; the reply streams in,
rendered as markdown with code blocks and LaTeX. Maximum length goes up to the model's context (seq_length in its
config), the most the CLI and the servers take; a conversation grown past it says so in the chat. Every browser
session has its own history. Up to --max-batch replies (default 4) are generated together by the model's engine
(chatglm/engine.py), which keeps each conversation's keys between turns, so a follow-up prefills only its new
tokens; more wait in Gradio's queue. --max-batch 1 generates one reply at a time, each session keeping its own KV
cache, as the original.

    python web_demo.py [--host 127.0.0.1] [--port 7860] [--share] [--max-batch 4] [--model-path DIR | MODEL_PATH=DIR]

Model options are those of utils.add_model_args; with no model it runs the built-in tiny random model.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
import gradio as gr  # noqa: E402

from serving.requests import context_length  # noqa: E402
from utils import max_length_error, turn_max_length  # noqa: E402

NAMES = {"v1": "ChatGLM-6B", "v2": "ChatGLM2-6B", "v3": "ChatGLM3-6B"}
DEFAULTS = {"v1": (2048, 0.7, 0.95), "v2": (8192, 0.8, 0.95), "v3": (8192, 0.8, 0.6)}  # max_length, top_p, temp
LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]


def show(response) -> str:
    """A v3 tool call comes back as a dict: show it as a JSON code block."""
    return response if isinstance(response, str) else f"```json\n{json.dumps(response, ensure_ascii=False)}\n```"


def build_demo(model, tokenizer, max_length: int | None = None, max_batch: int = 1) -> gr.Blocks:
    """The page for one loaded model; `max_length` overrides the slider's starting value (at most the model's
    context, the slider's end). With max_batch > 1 the model gets an engine (chatglm/engine.py) that generates up to
    that many replies together."""
    version = model.config.chatglm_version
    context = context_length(model)
    if max_batch > 1:
        from chatglm.engine import attach

        attach(model, max_batch=max_batch)
    batched = getattr(model, "engine", None) is not None
    d_len, d_top_p, d_temp = DEFAULTS[version]

    def take_input(text, chatbot):  # show the message at once and empty the box, before waiting in the queue
        query = (text or "").strip()
        return "", chatbot + [{"role": "user", "content": query}] if query else chatbot, query

    def predict(query, chatbot, max_length, top_p, temperature, history, past):
        if not query:
            yield chatbot, history, past
            return
        max_length = max(1, min(int(max_length), context))  # the slider ends at the context; a caller may send more
        ids = tokenizer.encode(query, add_special_tokens=False)
        limit = max(max_length - 64, max_length // 2, 1)  # leave the reply some room
        if len(ids) > limit:
            query = tokenizer.decode(ids[:limit])
            gr.Warning(f"The message was {len(ids)} tokens long: only its first {limit} were sent to the model.")
        whole = version == "v1" or batched  # the whole conversation is sent (the engine reuses the keys it kept)
        turn_max, notice = turn_max_length(model, tokenizer, query, history, None if whole else past, max_length,
                                           "Clear History")  # fmt: skip
        if notice:  # said in the chat, not an empty reply; the history stays as it was
            yield chatbot + [{"role": "assistant", "content": notice}], history, past
            return
        chatbot = chatbot + [{"role": "assistant", "content": ""}]
        gen = dict(history=history, max_length=turn_max, top_p=top_p, temperature=temperature)
        if whole:
            stream = ((r, h, None) for r, h in model.stream_chat(tokenizer, query, **gen))
        else:
            stream = model.stream_chat(tokenizer, query, past_key_values=past, return_past_key_values=True, **gen)
        for state in stream:  # (response, history, past)
            chatbot[-1] = {"role": "assistant", "content": show(state[0])}
            # No cache while streaming: a reply cut short (Clear History) rebuilds it from the history next turn.
            yield chatbot, state[1], None
        yield chatbot, state[1], state[2]

    with gr.Blocks(title=NAMES[version], analytics_enabled=False) as demo:
        gr.HTML(f'<h1 align="center">{NAMES[version]}</h1>')
        if getattr(model, "tiny_notice", None):  # the built-in tiny random model: say so on the page
            gr.Markdown(model.tiny_notice, elem_id="tiny-notice")
        chatbot = gr.Chatbot(
            label=NAMES[version], latex_delimiters=LATEX, height=440, buttons=["copy", "copy_all"], elem_id="chatbot"
        )
        with gr.Row():
            with gr.Column(scale=4):
                with gr.Column(scale=12):
                    # one line that grows: Enter sends, Shift+Enter starts a new line
                    user_input = gr.Textbox(show_label=False, placeholder="Input... (Enter sends, Shift+Enter: new line)",
                                            lines=1, max_lines=10, elem_id="user-input")  # fmt: skip
                with gr.Column(min_width=32, scale=1):
                    submit = gr.Button("Submit", variant="primary", elem_id="submit")
            with gr.Column(scale=1):
                clear = gr.Button("Clear History", elem_id="clear")
                length = gr.Slider(1, context, value=min(max_length or d_len, context), step=1, label="Maximum length")
                top_p = gr.Slider(0, 1, value=d_top_p, step=0.01, label="Top P")
                temperature = gr.Slider(0.01, 1, value=d_temp, step=0.01, label="Temperature")
        history, past, pending = gr.State([]), gr.State(None), gr.State("")

        reply = gr.on(
            [submit.click, user_input.submit],
            take_input,
            [user_input, chatbot],
            [user_input, chatbot, pending],
            queue=False,
        ).then(  # fmt: skip
            predict,
            [pending, chatbot, length, top_p, temperature, history, past],
            [chatbot, history, past],
            concurrency_limit=max(1, getattr(getattr(model, "engine", None), "max_batch", 1)),  # across all users
            concurrency_id="model",
        )
        clear.click(lambda: ([], [], None), None, [chatbot, history, past], queue=False, cancels=[reply])
        chatbot.clear(lambda: ([], None), None, [history, past], queue=False, cancels=[reply])  # its trash icon
    return demo


def main(argv=None) -> int:
    from utils import TINY_MAX_NEW_TOKENS, add_model_args, load_or_exit

    parser = argparse.ArgumentParser(description="Chat with ChatGLM in the browser (Gradio).")
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish through a public gradio.live link")
    parser.add_argument("--max-length", type=int, default=None, help="the Maximum length slider's starting value")
    parser.add_argument("--max-batch", type=int, default=4,
                        help="replies generated together when several tabs chat (default 4; 1: one at a time, "
                             "as the original)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error("--max-batch must be >= 1")
    from serving.requests import exit_unless_listenable

    exit_unless_listenable(args.host, args.port)
    model, tokenizer = load_or_exit(args)
    error = max_length_error(model, args.max_length)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.model_path and args.max_length is None:
        args.max_length = TINY_MAX_NEW_TOKENS
    demo = build_demo(model, tokenizer, max_length=args.max_length, max_batch=args.max_batch)
    # quiet: Gradio's own banner says to edit `share=True` into the code; --share is how here
    print(f"Running on http://{args.host}:{args.port}" + ("" if args.share else " (--share also publishes a public "
          "gradio.live link)"), flush=True)  # fmt: skip
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                   quiet=not args.share)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
