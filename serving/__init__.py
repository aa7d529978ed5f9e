"""The HTTP layer of the toolkit, outside the model package: what api.py, stream_api.py and openai_api.py run.

- requests.py: request bodies (bytes-limited JSON), checked fields, histories, generation arguments, RequestError.
- workers.py: worker threads and the model's engine (chatglm/engine.py) or lock between requests.
- events.py: a reply as deltas that never need taking back (SSE and non-streaming answers agree).
- openai_messages.py: OpenAI chat messages -> ChatGLM query, history and role.
- polling.py: the request queue of stream_api.py.
- api.py, stream_api.py, openai_api.py: the apps; the scripts of the same names parse arguments and run them.
"""
