"""Chat mode: a plain conversation after the system prompt set in the sidebar."""

from __future__ import annotations

import streamlit as st

from . import agent, ui
from .agent import Mode
from .conversation import Message, Role


def main(client, settings: ui.Settings) -> None:
    messages = ui.transcript(Mode.CHAT)
    pending = ui.apply_buttons(settings, messages)
    ui.render_transcript(messages)
    query = st.chat_input("Chat with ChatGLM3!", key="chat_input_chat")
    if query and query.strip():
        messages.append(Message(Role.USER, query.strip()))
        ui.render_message(messages[-1])
        pending = True
    if pending:
        ui.show_run(agent.run(client, messages, Mode.CHAT, settings.gen, system_prompt=settings.system_prompt))
