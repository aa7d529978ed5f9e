"""ChatGLM3 composite demo: Chat, Tool and Code Interpreter modes (run composite_demo/main.py with streamlit)."""
