"""A scripted stand-in for ChatGLM3 in the composite demo's tests.

It has the model's `stream_chat(tokenizer, query, history=, role=, **gen)` signature, builds the real v3 prompt with
the tokenizer (recorded in `prompts`, ids and text), and streams a scripted reply through the real
`chatglm.generation.process_response`, as the model's own stream_chat does. `reply(query, role, history)` returns the
text the model would write after `<|assistant|>`: metadata, "\n", content; a tool call ends at `<|observation|>`.
"""

from __future__ import annotations

import copy

from chatglm.generation import process_response


class Config:
    chatglm_version = "v3"


class ScriptedModel:
    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply = tokenizer, reply
        self.config = Config()
        self.prompts: list[list[int]] = []  # the ids the real model would have been given
        self.calls: list[dict] = []

    def stream_chat(self, tokenizer, query, history=None, role="user", **gen):
        history = copy.deepcopy(list(history or []))
        ids = tokenizer.build_chat_input(query, history=history, role=role)["input_ids"][0].tolist()
        self.prompts.append(ids)
        self.calls.append({"query": query, "role": role, "history": copy.deepcopy(history), "gen": gen})
        history.append({"role": role, "content": query})
        text = self.reply(query, role, history)
        for end in sorted({max(1, len(text) // 2), len(text)}):  # two steps of streaming, as the reply grows
            yield process_response("v3", text[:end], history)

    def prompt_text(self, i: int = -1) -> str:
        return self.tokenizer.decode(self.prompts[i])


def tool_then_answer(tool: str, call: str, answer: str = "The result is {observation}."):
    """A reply function: a call of `tool` for a user message, then `answer` once the observation came back."""

    def reply(query, role, history):
        if role == "observation":
            return answer.format(observation=query)
        return f"{tool}\n```python\n{call}\n```"

    return reply
