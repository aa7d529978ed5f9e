"""Streamlit pieces shared by the three modes: the sidebar, the transcript, streaming a run onto the page."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import streamlit as st

from . import agent
from .agent import Mode
from .conversation import Message, Role, extract_code


@dataclass
class Settings:
    gen: dict  # top_p, temperature, repetition_penalty, max_new_tokens
    system_prompt: str
    retry: bool
    clear: bool


def sidebar(mode: Mode) -> Settings:
    """The generation settings (the original demo's ranges and defaults), the system prompt in Chat mode, buttons."""
    sb = st.sidebar
    top_p = sb.slider("top_p", 0.0, 1.0, 0.8, step=0.01, key="top_p")
    temperature = sb.slider("temperature", 0.0, 1.5, 0.95, step=0.01, key="temperature")
    repetition_penalty = sb.slider("repetition_penalty", 0.0, 2.0, 1.1, step=0.01, key="repetition_penalty")
    max_new_tokens = sb.slider("Output length (max new tokens)", 5, 32000, 256, step=1, key="max_new_tokens")
    left, right = sb.columns(2)
    retry = left.button("Retry", key="retry", width="stretch")
    clear = right.button("Clear History", key="clear", width="stretch")
    system_prompt = ""
    if mode is Mode.CHAT:
        system_prompt = sb.text_area("System prompt", agent.CHAT_SYSTEM_PROMPT, height=150, key="system_prompt")
    gen = dict(top_p=top_p, temperature=temperature, repetition_penalty=repetition_penalty,
               max_new_tokens=max_new_tokens)  # fmt: skip
    return Settings(gen, system_prompt, retry, clear)


def session_id() -> str:
    return st.session_state.setdefault("session_id", uuid.uuid4().hex)


def transcript(mode: Mode) -> list[Message]:
    """This session's conversation in `mode` (each mode keeps its own)."""
    return st.session_state.setdefault(f"messages_{mode.name}", [])


def read_user_message(messages: list[Message], placeholder: str, key: str) -> bool:
    """The chat box: a non-empty message is added to the transcript and shown; True when one came."""
    query = st.chat_input(placeholder, key=key)
    if not (query and query.strip()):
        return False
    messages.append(Message(Role.USER, query.strip()))
    render_message(messages[-1])
    return True


def apply_buttons(settings: Settings, messages: list[Message]) -> bool:
    """Clear / Retry on the transcript; True when Retry left a user message to answer again."""
    if settings.clear:
        messages.clear()
        st.session_state.pop("awaiting", None)
        return False
    if settings.retry:
        kept = agent.retry_point(messages)
        messages[:] = kept
        st.session_state.pop("awaiting", None)
        return bool(kept)
    return False


def render_message(m: Message) -> None:
    with st.chat_message(m.role.value, avatar=m.role.avatar):
        if m.role is Role.TOOL:
            st.markdown(f"Calling tool `{m.tool}`:")
            st.code(extract_code(m.content), language="python")
        elif m.role is Role.INTERPRETER:
            st.code(extract_code(m.content), language="python")
        elif m.role is Role.OBSERVATION:
            if m.content:
                st.code(m.content, language="text")
            for png in m.images:
                st.image(png)
        else:
            st.markdown(m.content)


def render_partial(response) -> None:
    """The reply while it streams: text, or the call it is becoming."""
    if isinstance(response, str):
        with st.chat_message("assistant"):
            st.markdown(response)
        return
    name = response.get("name", "")
    role = Role.INTERPRETER if name == "interpreter" else Role.TOOL
    with st.chat_message(role.value, avatar=role.avatar):
        if role is Role.TOOL:
            st.markdown(f"Calling tool `{name}`…")
        if "parameters" in response:
            st.code(json.dumps(response["parameters"], ensure_ascii=False, indent=2), language="json")
        else:
            st.code(extract_code(response.get("content", "")), language="python")


def render_transcript(messages: list[Message]) -> None:
    for m in messages:
        render_message(m)


def show_run(events) -> None:
    """Put a run's events on the page as they come: the growing reply, then each finished message."""
    placeholder = None
    try:
        for event in events:
            if event.kind == "partial":
                placeholder = placeholder or st.empty()
                with placeholder.container():
                    render_partial(event.response)
            elif event.kind == "message":
                target, placeholder = placeholder or st.empty(), None
                with target.container():
                    render_message(event.message)
            elif event.kind == "awaiting_observation":
                st.session_state["awaiting"] = event.text
                st.info(
                    f"Manual mode: type the result of `{event.text}` in the box below; it is sent as the observation."
                )
            elif event.kind == "notice":
                st.warning(event.text)
    except Exception as e:  # a failing generation is shown, not a crashed page
        if placeholder is not None:
            placeholder.empty()
        st.error(f"Generation failed: {type(e).__name__}: {e}")
