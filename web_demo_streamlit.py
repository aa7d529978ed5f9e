"""Chat with ChatGLM in the browser (Streamlit).

Behaves like THUDM/ChatGLM3 basic_demo/web_demo_streamlit.py, for all three generations: the conversation as
chat messages, a chat input box, sidebar sliders max_length / top_p / temperature starting at each generation's
defaults and a button that clears the history; the reply streams in. max_length goes up to the model's context
(seq_length in its config), the most the CLI and the servers take; a conversation grown past it says so in the
chat. The model is loaded once per server process; up to --max-batch replies (default 4) of the sessions chatting
at once are generated together by its engine (chatglm/engine.py), which keeps each conversation's keys between
turns. With --max-batch 1 one reply is generated at a time and ChatGLM2/3 continue from each session's KV cache, as
the original.

    streamlit run web_demo_streamlit.py [-- --model-path DIR --device cpu ...]   (or MODEL_PATH=DIR, DEVICE=cpu)

Model options are those of utils.add_model_args; with no model it runs the built-in tiny random model.
"""

import argparse
import contextlib
import json
import sys
import threading

import streamlit as st

from chatglm.engine import attach
from serving.requests import context_length
from utils import TINY_MAX_NEW_TOKENS, add_model_args, load_from_args, max_length_error, turn_max_length

NAMES = {"v1": "ChatGLM-6B", "v2": "ChatGLM2-6B", "v3": "ChatGLM3-6B"}
DEFAULTS = {"v1": (2048, 0.7, 0.95), "v2": (8192, 0.8, 0.95), "v3": (8192, 0.8, 0.6)}  # max_length, top_p, temp

st.set_page_config(page_title="ChatGLM", page_icon=":robot:", layout="wide")


@st.cache_resource
def get_model():
    """(model, tokenizer, arguments), loaded once and shared by every session."""
    parser = add_model_args(argparse.ArgumentParser(allow_abbrev=False))
    parser.add_argument("--max-length", type=int, default=None, help="the max_length slider's starting value")
    parser.add_argument("--max-batch", type=int, default=4, help="replies generated together (default 4)")
    args, _ = parser.parse_known_args(sys.argv[1:])  # what follows `--` on the streamlit command line
    model, tokenizer = load_from_args(args)
    if args.max_batch > 1:
        attach(model, max_batch=args.max_batch)
    if not args.model_path and args.max_length is None:
        args.max_length = TINY_MAX_NEW_TOKENS
    return model, tokenizer, args


@st.cache_resource
def generation_lock():
    return threading.Lock()  # without an engine, one generation at a time: the model is shared by all sessions


def show(response) -> str:
    """A v3 tool call comes back as a dict: show it as a JSON code block."""
    return response if isinstance(response, str) else f"```json\n{json.dumps(response, ensure_ascii=False)}\n```"


def messages(history):
    """(role, text) to display: v1/v2 history is (query, response) pairs, v3 a list of role dicts."""
    for item in history:
        if isinstance(item, dict):
            yield ("user" if item["role"] == "user" else "assistant"), show(item.get("content", ""))
        else:
            yield "user", item[0]
            yield "assistant", show(item[1])


try:
    model, tokenizer, args = get_model()
except (OSError, ValueError, RuntimeError, NotImplementedError) as e:
    st.error(f"Could not load the model: {e}")
    st.stop()
version = model.config.chatglm_version
d_len, d_top_p, d_temp = DEFAULTS[version]
context = context_length(model)
if error := max_length_error(model, args.max_length):
    st.error(error)
    st.stop()
st.session_state.setdefault("history", [])
st.session_state.setdefault("past_key_values", None)

max_length = st.sidebar.slider("max_length", 1, context, min(args.max_length or d_len, context), step=1)
top_p = st.sidebar.slider("top_p", 0.0, 1.0, d_top_p, step=0.01)
temperature = st.sidebar.slider("temperature", 0.01, 1.0, d_temp, step=0.01)
if st.sidebar.button("清理会话历史 (clear history)", key="clean"):
    st.session_state.history, st.session_state.past_key_values = [], None
    st.rerun()

st.title(NAMES[version])
if getattr(model, "tiny_notice", None):  # the built-in tiny random model: say so on the page
    st.info(model.tiny_notice)
for role, text in messages(st.session_state.history):
    with st.chat_message(role):
        st.markdown(text)

query = st.chat_input("请输入您的问题 (your question)")
if query and query.strip():
    query = query.strip()
    with st.chat_message("user"):
        st.markdown(query)
    with st.chat_message("assistant"):
        placeholder = st.empty()
    ids = tokenizer.encode(query, add_special_tokens=False)
    limit = max(max_length - 64, max_length // 2, 1)  # leave the reply some room
    if len(ids) > limit:
        query = tokenizer.decode(ids[:limit])
        st.warning(f"The message was {len(ids)} tokens long: only its first {limit} were sent to the model.")
    history, past = st.session_state.history, st.session_state.past_key_values
    batched = getattr(model, "engine", None) is not None  # it batches the sessions' replies: no lock
    whole = version == "v1" or batched  # the whole conversation is sent (the engine reuses the keys it kept)
    turn_max, notice = turn_max_length(model, tokenizer, query, history, None if whole else past, max_length,
                                       "清理会话历史 (clear history)")  # fmt: skip
    if notice:  # said in the chat, not an empty reply; the history stays as it was
        placeholder.warning(notice)
        st.stop()
    gen = dict(history=history, max_length=turn_max, top_p=top_p, temperature=temperature)
    with contextlib.nullcontext() if batched else generation_lock():
        if whole:
            stream = ((r, h, None) for r, h in model.stream_chat(tokenizer, query, **gen))
        else:
            stream = model.stream_chat(tokenizer, query, past_key_values=past, return_past_key_values=True, **gen)
        for state in stream:  # (response, history, past)
            placeholder.markdown(show(state[0]))
    st.session_state.history, st.session_state.past_key_values = state[1], state[2]
