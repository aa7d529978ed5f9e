"""Tool mode: the model calls the registered tools (or, in manual mode, the user plays the tools)."""

from __future__ import annotations

import streamlit as st

from . import agent, tools, ui
from .agent import Mode
from .conversation import Message, Role
from .tool_registry import REGISTRY, dump_tool_list, load_tool_list


def main(client, settings: ui.Settings) -> None:
    messages = ui.transcript(Mode.TOOL)
    manual = st.toggle("Manual mode", key="manual_mode",
                       help="Write the tool list yourself (YAML or JSON) and type each tool's result.")  # fmt: skip
    registry = None
    if manual:
        with st.expander("Tools (YAML or JSON)", expanded=False):
            default = dump_tool_list(REGISTRY.active().schemas())
            text = st.text_area("The tools offered to the model", default, height=300, key="tools_text")
        try:
            tool_list = load_tool_list(text)
        except ValueError as e:
            st.error(f"{e}. Fix the tool list to continue.")
            tool_list = None
    else:
        shell = st.toggle("Enable the shell tool (the model can run commands on this computer)", key="enable_shell",
                          value=tools.shell_enabled_by_env())  # fmt: skip
        registry = REGISTRY.active({"shell"} if shell else ())
        tool_list = registry.schemas()
        with st.expander(f"Tools offered to the model: {', '.join(t['name'] for t in tool_list)}"):
            st.code(dump_tool_list(tool_list), language="yaml")
    if not manual:
        st.session_state.pop("awaiting", None)
    pending = ui.apply_buttons(settings, messages)
    ui.render_transcript(messages)
    awaiting = st.session_state.get("awaiting")
    hint = f"Type the result of {awaiting} (observation)" if awaiting else "Chat with ChatGLM3!"
    text = st.chat_input(hint, key="chat_input_tool", disabled=tool_list is None)
    if text and text.strip():
        role = Role.OBSERVATION if awaiting else Role.USER
        messages.append(Message(role, text.strip()))
        st.session_state.pop("awaiting", None)
        ui.render_message(messages[-1])
        pending = True
    if pending and tool_list is not None:
        events = agent.run(client, messages, Mode.TOOL, settings.gen, tools=tool_list, registry=registry,
                           manual=manual)  # fmt: skip
        ui.show_run(events)
