"""ChatGLM3's composite demo: Chat, Tool and Code Interpreter modes on one Streamlit page.

    streamlit run composite_demo/main.py [-- --model-path DIR --device cpu ...]   (or MODEL_PATH=DIR, DEVICE=cpu)
    streamlit run composite_demo/main.py -- --demo     # tool calls and code cells at work, scripted (no real model)

Model options are those of utils.add_model_args; with no model the built-in tiny random ChatGLM3 runs (its answers
are noise). Environment: IPYKERNEL (Jupyter kernel name, default python3), COMPOSITE_DEMO_CODE_TIMEOUT (seconds per
code run, default 30), COMPOSITE_DEMO_ENABLE_SHELL=1 (the shell tool's toggle starts on; it is off otherwise).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run composite_demo/main.py` puts only composite_demo/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from composite_demo import demo_chat, demo_ci, demo_tool, ui  # noqa: E402
from composite_demo.agent import Mode  # noqa: E402
from composite_demo.client import create_client  # noqa: E402

st.set_page_config(page_title="ChatGLM3 Demo", page_icon=":robot:", layout="wide")


@st.cache_resource
def get_client():
    """The model, loaded once per server process and shared by every session."""
    return create_client()


try:
    client = get_client()
except (OSError, ValueError, RuntimeError, NotImplementedError) as e:
    st.error(f"Could not load the model: {e}")
    st.stop()

st.title("ChatGLM3 Demo")
if getattr(client, "demonstration", False):
    from composite_demo.demonstration import NOTICE

    st.info(NOTICE)
elif client.tiny:
    st.info("No MODEL_PATH was given: this is the built-in tiny random ChatGLM3, so its answers are random text. "
            "Start with `-- --model-path DIR` (or MODEL_PATH=DIR) to use a real ChatGLM3-6B checkpoint.")  # fmt: skip
mode = Mode(st.radio("Mode", [m.value for m in Mode], horizontal=True, label_visibility="collapsed", key="mode"))
settings = ui.sidebar(mode)
{Mode.CHAT: demo_chat, Mode.TOOL: demo_tool, Mode.CI: demo_ci}[mode].main(client, settings)
