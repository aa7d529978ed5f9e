"""Code Interpreter mode: the model's `interpreter` code runs in this session's Jupyter kernel."""

from __future__ import annotations

import os

import streamlit as st

from . import agent, code_kernel, ui
from .agent import Mode


def main(client, settings: ui.Settings) -> None:
    messages = ui.transcript(Mode.CI)
    kernel = code_kernel.shared_pool().get(ui.session_id())  # started on its first use
    st.caption(f"Code runs in a Jupyter kernel (`{kernel.kernel_name}`, timeout {kernel.timeout:g} s) in the "
               f"session folder `{kernel.workdir}`.")  # fmt: skip
    left, right = st.columns([4, 1])
    upload = left.file_uploader("Add a file to the session folder", key="upload")
    if upload is not None:
        name = os.path.basename(upload.name.replace("\\", "/")).lstrip(".") or "upload"
        with open(os.path.join(kernel.workdir, name), "wb") as f:
            f.write(upload.getvalue())
        left.caption(f"Saved as `{name}` in the session folder.")
    if right.button("Restart kernel", key="restart_kernel"):
        kernel.restart()
        st.toast("The kernel was restarted.")
    pending = ui.apply_buttons(settings, messages)
    ui.render_transcript(messages)
    pending = ui.read_user_message(messages, "Ask ChatGLM3 to compute, plot or analyse", "chat_input_ci") or pending
    if pending:
        ui.show_run(agent.run(client, messages, Mode.CI, settings.gen, kernel=kernel))
