"""ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B, implemented here and loaded from the original checkpoints offline.

`import chatglm` registers our classes with transformers' Auto* factories, so the original model-card code
(`AutoTokenizer.from_pretrained(path)`, `AutoModel.from_pretrained(path)`) runs our implementation.
"""

from .auto import ChatGLMAutoModel, register
from .config import ChatGLMConfig, detect_version
from .loading import load_model
from .tokenizer import ChatGLMTokenizer, GLM2Tokenizer, GLM3Tokenizer, GLMTokenizer


def load_tokenizer(path: str, **kwargs):
    """The tokenizer of the checkpoint at `path` (v1, v2 or v3, decided from the directory)."""
    return ChatGLMTokenizer.from_pretrained(path, **kwargs)


register()

__all__ = [
    "ChatGLMAutoModel",
    "ChatGLMConfig",
    "ChatGLMTokenizer",
    "GLMTokenizer",
    "GLM2Tokenizer",
    "GLM3Tokenizer",
    "detect_version",
    "load_model",
    "load_tokenizer",
]
