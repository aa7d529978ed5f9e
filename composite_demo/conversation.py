"""The conversation the page shows, and how each of its messages reads to ChatGLM3.

A `Message` is one item of the transcript with a display role; `to_history` turns the transcript into the v3 role
dicts `stream_chat` takes, and `from_history` reads the model's reply items back:

    Role.USER         {"role": "user", "content": ...}
    Role.ASSISTANT    {"role": "assistant", "metadata": "", "content": ...}
    Role.TOOL         {"role": "assistant", "metadata": "<tool name>", "content": "```python\\ntool_call(...)\\n```"}
    Role.INTERPRETER  {"role": "assistant", "metadata": "interpreter", "content": "```python\\n<code>\\n```"}
    Role.OBSERVATION  {"role": "observation", "content": <tool result or code output>}

The system item (system prompt, and the tool list in Tool mode) is added by `to_history`, not stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

SPECIAL_TOKEN = re.compile(r"<\|(?:system|user|assistant|observation)\|>")
CODE_BLOCK = re.compile(r"```[^\n`]*\n(.*?)(?:\n?```|$)", re.DOTALL)


class Role(Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"
    INTERPRETER = "interpreter"
    OBSERVATION = "observation"

    @property
    def model_role(self) -> str:
        return "assistant" if self in (Role.TOOL, Role.INTERPRETER) else self.value

    @property
    def avatar(self) -> str | None:
        icons = {Role.TOOL: "build", Role.INTERPRETER: "terminal", Role.OBSERVATION: "output", Role.SYSTEM: "settings"}
        return f":material/{icons[self]}:" if self in icons else None  # Streamlit's icon font: no emoji font needed


@dataclass
class Message:
    role: Role
    content: str
    tool: str = ""  # Role.TOOL: the tool's name ("interpreter" for Role.INTERPRETER)
    images: list[bytes] = field(default_factory=list)  # Role.OBSERVATION from the code interpreter: PNG bytes

    def to_model(self) -> dict:
        if self.role in (Role.TOOL, Role.INTERPRETER):
            metadata = self.tool if self.role is Role.TOOL else "interpreter"
            return {"role": "assistant", "metadata": metadata, "content": self.content}
        if self.role is Role.ASSISTANT:
            return {"role": "assistant", "metadata": "", "content": self.content}
        return {"role": self.role.value, "content": self.content}


def system_item(prompt: str, tools: list[dict] | None = None) -> dict:
    item = {"role": "system", "content": prompt}
    if tools is not None:
        item["tools"] = tools
    return item


def to_history(messages: list[Message], system: dict | None = None) -> list[dict]:
    """The v3 role dicts of a transcript, after the system item when there is one."""
    return ([system] if system else []) + [m.to_model() for m in messages]


def from_history(items: list[dict]) -> list[Message]:
    """Messages for the assistant items `stream_chat` appended to the history (a reply may hold several)."""
    out = []
    for item in items:
        metadata = (item.get("metadata") or "").strip()
        content = strip_special(item.get("content", ""))
        if item.get("role") != "assistant":
            out.append(Message(Role(item["role"]), content))
        elif not metadata:
            out.append(Message(Role.ASSISTANT, content))
        elif metadata == "interpreter":
            out.append(Message(Role.INTERPRETER, content, tool="interpreter"))
        else:
            out.append(Message(Role.TOOL, content, tool=metadata))
    return out


def strip_special(text: str) -> str:
    """Drop role markers that leaked into a decoded reply."""
    return SPECIAL_TOKEN.sub("", text)


def extract_code(text: str) -> str:
    """The code of the first fenced block in `text` (the whole text when there is no fence)."""
    m = CODE_BLOCK.search(text)
    return (m.group(1) if m else text).strip("\n")
