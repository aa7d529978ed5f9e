"""Chat mode: a plain conversation after the system prompt set in the sidebar."""

from __future__ import annotations

from . import agent, ui
from .agent import Mode


def main(client, settings: ui.Settings) -> None:
    messages = ui.transcript(Mode.CHAT)
    pending = ui.apply_buttons(settings, messages)
    ui.render_transcript(messages)
    pending = ui.read_user_message(messages, "Chat with ChatGLM3!", "chat_input_chat") or pending
    if pending:
        ui.show_run(agent.run(client, messages, Mode.CHAT, settings.gen, system_prompt=settings.system_prompt))
