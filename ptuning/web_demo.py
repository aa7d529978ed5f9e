"""Chat in the browser with a P-Tuned (or LoRA) model.

Behaves like THUDM/ChatGLM-6B ptuning/web_demo.py: main.py's model arguments (--model_name_or_path,
--ptuning_checkpoint, --pre_seq_len, --quantization_bit, --lora_checkpoint), a Gradio page with the chat,
an input box, Submit and Clear History, and Maximum length / Top P / Temperature sliders (the generation's
chat defaults); the reply streams. Needs gradio (see README.md).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from chatglm.generation import CHAT_DEFAULTS  # noqa: E402
from ptuning.arguments import ModelArguments  # noqa: E402
from ptuning.checkpoint import load_model_and_tokenizer  # noqa: E402


def predict(model, tokenizer, query, chatbot, max_length, top_p, temperature, history):
    """Stream (chatbot messages, history) while the reply grows."""
    chatbot = list(chatbot) + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
    for response, new_history in model.stream_chat(
        tokenizer, query, history, max_length=int(max_length), top_p=top_p, temperature=temperature
    ):
        chatbot[-1]["content"] = response if isinstance(response, str) else str(response)
        yield chatbot, new_history


def create_demo(model, tokenizer):
    import gradio as gr

    max_length, top_p, temperature = CHAT_DEFAULTS[model.config.chatglm_version]
    with gr.Blocks(title="ChatGLM") as demo:
        gr.HTML("""<h1 align="center">ChatGLM</h1>""")
        chatbot = gr.Chatbot()
        with gr.Row():
            with gr.Column(scale=4):
                user_input = gr.Textbox(show_label=False, placeholder="Input...", lines=10)
                submit = gr.Button("Submit", variant="primary")
            with gr.Column(scale=1):
                clear = gr.Button("Clear History")
                length = gr.Slider(0, max(4096, max_length), value=max_length, step=1.0, label="Maximum length")
                p = gr.Slider(0, 1, value=top_p, step=0.01, label="Top P")
                temp = gr.Slider(0, 1, value=temperature, step=0.01, label="Temperature")
        history = gr.State([])
        inputs = [user_input, chatbot, length, p, temp, history]
        submit.click(partial(predict, model, tokenizer), inputs, [chatbot, history], show_progress="full")
        submit.click(lambda: "", [], [user_input])
        clear.click(lambda: ([], []), [], [chatbot, history], show_progress="full")
    return demo


@dataclass
class DemoArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = field(default=7860, metadata={"help": "port (default 7860)"})


def main(argv=None) -> None:
    import torch
    from transformers import HfArgumentParser

    from serving.requests import exit_unless_listenable

    args, demo_args = HfArgumentParser((ModelArguments, DemoArguments)).parse_args_into_dataclasses(args=argv)
    exit_unless_listenable(demo_args.host, demo_args.port)
    try:
        model, tokenizer = load_model_and_tokenizer(
            args.model_name_or_path, args.ptuning_checkpoint, args.pre_seq_len, args.prefix_projection,
            args.quantization_bit, lora_checkpoint=args.lora_checkpoint, dtype=args.model_dtype, training=False,
            device="cuda" if torch.cuda.is_available() else None,
        )  # fmt: skip
    except (OSError, ValueError) as e:  # a wrong path, a missing file, a checkpoint that does not fit: one line
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    model.eval()
    create_demo(model, tokenizer).queue().launch(server_name=demo_args.host, server_port=demo_args.port, share=False,
                                                 inbrowser=True)  # fmt: skip


if __name__ == "__main__":
    main()
