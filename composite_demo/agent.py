"""The conversation loops of the three modes, free of Streamlit so they can be driven (and tested) directly.

`run(...)` takes the transcript ending with the user's message (or an observation typed in manual mode), asks the
model, and while the reply is a call it can serve — a tool in Tool mode, `interpreter` code in Code Interpreter mode —
it runs the call, appends the result as an observation (v3 role "observation", cut at 1024 characters +
" [TRUNCATED]") and asks again, at most `max_rounds` calls per turn. It yields `Event`s for the page to show as they
happen and appends every finished message to the transcript in place.

Nothing the model writes is evaluated here: tool calls are read by `chatglm.generation.parse_tool_call` (`ast`,
literals only) and checked against the tool's schema; interpreter code runs only inside the Jupyter kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from chatglm.generation import parse_tool_call

from .conversation import Message, Role, extract_code, from_history, system_item, to_history

MAX_ROUNDS = 5
OBSERVATION_LIMIT = 1024
TRUNCATION_MARK = " [TRUNCATED]"
CHAT_SYSTEM_PROMPT = (
    "You are ChatGLM3, a large language model trained by Zhipu.AI. Follow the user's instructions carefully. "
    "Respond using markdown."
)
TOOL_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


def ci_system_prompt(workdir: str) -> str:
    return (
        "You are ChatGLM3, an AI assistant connected to a computer that runs Python in a Jupyter kernel; the computer "
        "has no internet access. To run Python, write the code in a ```python block; you will then see its output. "
        "If the code fails, read the error, fix the code and run it again. Files the user uploads, and files you "
        f"create, are in the folder {workdir} (the kernel's working directory)."
    )


class Mode(Enum):
    CHAT = "💬 Chat"
    TOOL = "🛠️ Tool"
    CI = "🧑‍💻 Code Interpreter"


@dataclass
class Event:
    """partial: `response` is the reply so far; message: `message` is finished (and already in the transcript);
    awaiting_observation: manual mode waits for the user to type the result of tool `text`; notice: `text`."""

    kind: str
    response: Any = None
    message: Message | None = None
    text: str = ""


def truncate(text: str, limit: int = OBSERVATION_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + TRUNCATION_MARK


def system_for(mode: Mode, system_prompt: str = "", tools: list[dict] | None = None, workdir: str = ""):
    """The system item of each mode: the user's prompt (Chat), the tool list (Tool), the interpreter's (CI)."""
    if mode is Mode.TOOL:
        return system_item(TOOL_SYSTEM_PROMPT, tools or [])
    if mode is Mode.CI:
        return system_item(ci_system_prompt(workdir))
    return system_item(system_prompt) if system_prompt.strip() else None


def model_turn(client, messages: list[Message], system: dict | None, gen: dict) -> Iterator[Event]:
    """One generation from the transcript; the reply's messages are appended to `messages` when it is complete."""
    last = messages[-1]
    if last.role not in (Role.USER, Role.OBSERVATION):
        raise ValueError(f"the model answers a user message or an observation, not {last.role.value}")
    history = to_history(messages[:-1], system)
    state = None
    for state in client.stream_chat(last.content, history=history, role=last.role.value, **gen):
        yield Event("partial", response=state[0])
    for message in from_history(state[1][len(history) + 1 :] if state else []):
        messages.append(message)
        yield Event("message", message=message)


def tool_observation(registry, call: Message) -> str:
    """The result of a Tool-mode call: parsed with ast, validated and dispatched by the registry."""
    try:
        params = parse_tool_call(extract_code(call.content))
    except ValueError as e:
        return f"Error: the call to {call.tool} could not be read: {e}. Write tool_call(name=value, ...) with literals."
    return registry.dispatch(call.tool, params)


def interpreter_observation(kernel, call: Message) -> Message:
    """Run the code of an `interpreter` call in the kernel: its output (and figures) as an observation."""
    if call.role is not Role.INTERPRETER:
        text = f"Error: there is no tool named {call.tool!r} here; write Python in a ```python block to run it."
        return Message(Role.OBSERVATION, text)
    code = extract_code(call.content)
    if kernel is None:
        return Message(Role.OBSERVATION, "Error: the code interpreter is not running.")
    try:
        result = kernel.execute(code)
    except Exception as e:  # the kernel could not start: say so to the model and the user
        return Message(Role.OBSERVATION, f"Error: the code interpreter is not available: {e}")
    return Message(Role.OBSERVATION, truncate(result.observation()), images=result.images)


def run(
    client,
    messages: list[Message],
    mode: Mode,
    gen: dict,
    *,
    system_prompt: str = "",
    tools: list[dict] | None = None,
    registry=None,
    kernel=None,
    manual: bool = False,
    max_rounds: int = MAX_ROUNDS,
) -> Iterator[Event]:
    """Answer the last message of `messages`, running tool / interpreter calls in between (see the module doc)."""
    if mode is Mode.TOOL and tools is None and registry is not None:
        tools = registry.schemas()
    system = system_for(mode, system_prompt, tools, getattr(kernel, "workdir", ""))
    rounds = 0
    while True:
        yield from model_turn(client, messages, system, gen)
        last = messages[-1]
        if mode is Mode.CHAT or last.role not in (Role.TOOL, Role.INTERPRETER):
            return
        if mode is Mode.TOOL and manual:
            yield Event("awaiting_observation", text=last.tool or "interpreter")
            return
        if rounds >= max_rounds:
            yield Event("notice", text=f"Stopped: the model asked for more than {max_rounds} calls in this turn.")
            return
        rounds += 1
        if mode is Mode.TOOL:
            if registry is None:
                observation = Message(Role.OBSERVATION, "Error: no tools are available.")
            else:
                observation = Message(Role.OBSERVATION, truncate(tool_observation(registry, last)))
        else:
            observation = interpreter_observation(kernel, last)
        messages.append(observation)
        yield Event("message", message=observation)


def retry_point(messages: list[Message]) -> list[Message]:
    """The transcript up to and including the last user message (what Retry answers again)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role is Role.USER:
            return messages[: i + 1]
    return []
