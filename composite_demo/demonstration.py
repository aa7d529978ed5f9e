"""Demonstration mode (`streamlit run composite_demo/main.py -- --demo`): tools and the code interpreter at work
without a real model.

The built-in tiny ChatGLM3 has random weights, so it never writes a tool call or a code cell by itself. Here it is
made to write scripted replies, token by token, through the real path: the page builds the real ChatGLM3 prompt
(system prompt, tool list, history), the model runs its real generation with a logits processor that forces the
script's tokens, and the reply is parsed, dispatched to the real tool or run in the real Jupyter kernel, and the
observation is sent back, as with a real checkpoint. The page says that this is a demonstration.

The script: in Tool mode the model calls the calculator, then reads its result back; in Code Interpreter mode it
writes a cell that prints a sum and draws a sine curve, then comments on the output; in Chat mode it says how to
see the other two.
"""

from __future__ import annotations

from chatglm.sampling import ForceTokens

from .client import Client

NOTICE = (
    "Demonstration mode: the built-in tiny random ChatGLM3 is made to write scripted replies (a calculator call in "
    "Tool mode, a Python cell in Code Interpreter mode) through the real prompt, generation, tool and kernel path. "
    "Start without `--demo` and with `--model-path DIR` to chat with a real ChatGLM3-6B."
)
TOOL_CALL = "calculator\n```python\ntool_call(expression='(3 + 4) * 2 ** 10')\n```"
CODE = (
    "import numpy as np\nimport matplotlib.pyplot as plt\n"
    "print('sum of 1..100 =', sum(range(1, 101)))\n"
    "x = np.linspace(0, 2 * np.pi, 200)\nplt.figure(figsize=(5, 3))\nplt.plot(x, np.sin(x))\nplt.title('sin(x)')\n"
    "plt.show()"
)
CODE_CALL = f"interpreter\n```python\n{CODE}\n```"
CHAT_REPLY = (
    "This is the demonstration mode of the composite demo. Switch to 🛠️ Tool to see me call the calculator, or to "
    "🧑‍💻 Code Interpreter to see me run Python in a Jupyter kernel."
)


def scripted_reply(query: str, role: str, history: list[dict]) -> tuple[str, bool]:
    """(what the model writes after `<|assistant|>`, whether it is a call that ends at `<|observation|>`).
    A text reply starts with an empty metadata line, as ChatGLM3's do; a call with the tool's name."""
    system = history[0] if history and history[0].get("role") == "system" else {}
    if role == "observation":
        result = query.strip()[:300]
        return f"\nThe result came back:\n\n{result}\n\nThat is the end of this demonstration turn.", False
    if system.get("tools"):
        return TOOL_CALL, True
    if "Jupyter" in system.get("content", ""):
        return CODE_CALL, True
    return "\n" + CHAT_REPLY, False


class DemonstrationClient(Client):
    """A Client whose tiny ChatGLM3 writes `scripted_reply`; the rest of the path is the real one."""

    demonstration = True

    def stream_chat(self, query: str, history: list[dict], role: str = "user", **gen):
        text, call = scripted_reply(query, role, history)
        tok = self.tokenizer
        ids = tok.encode(text, add_special_tokens=False)
        ids.append(tok.get_command("<|observation|>") if call else tok.eos_token_id)
        kwargs = {"max_new_tokens": len(ids) + 1, "do_sample": False, "logits_processor": [ForceTokens(ids)]}
        yield from self._stream(query, history, role, kwargs)
