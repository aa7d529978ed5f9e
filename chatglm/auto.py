"""Registration with transformers' Auto* classes, and the trust_remote_code guard."""

from __future__ import annotations

import functools
import json
import logging
import os

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
)

from .config import ChatGLMConfig
from .loading import model_class
from .tokenizer import ChatGLMTokenizer

logger = logging.getLogger(__name__)
AUTO_MODELS = (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM)


class ChatGLMAutoModel(PreTrainedModel):
    """What the Auto* factories see for model_type "chatglm": it builds or loads the generation's model."""

    config_class = ChatGLMConfig

    def __new__(cls, config: ChatGLMConfig, *args, **kwargs):
        return model_class(config)(config, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        return model_class(ChatGLMConfig.from_checkpoint(str(pretrained_model_name_or_path))).from_pretrained(
            pretrained_model_name_or_path, *args, **kwargs
        )

    @classmethod
    def from_config(cls, config: ChatGLMConfig, **kwargs):
        return model_class(config)(config)


def _is_chatglm_dir(path) -> bool:
    for name in ("config.json", "tokenizer_config.json"):
        file = os.path.join(str(path), name)
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            if data.get("model_type") == "chatglm" or data.get("tokenizer_class") == "ChatGLMTokenizer":
                return True
    return False


def _drop_trust_remote_code(auto_cls):
    """trust_remote_code=True on a ChatGLM directory would run (or look for) THUDM's .py files: use ours."""
    original = auto_cls.from_pretrained.__func__
    if getattr(original, "_chatglm_guard", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if kwargs.get("trust_remote_code") and _is_chatglm_dir(pretrained_model_name_or_path):
            kwargs.pop("trust_remote_code")
            logger.info("trust_remote_code ignored: %s runs on chatglm's own implementation", auto_cls.__name__)
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained._chatglm_guard = True
    auto_cls.from_pretrained = classmethod(from_pretrained)


def register() -> None:
    AutoConfig.register("chatglm", ChatGLMConfig, exist_ok=True)
    for auto in AUTO_MODELS:
        auto.register(ChatGLMConfig, ChatGLMAutoModel, exist_ok=True)
    AutoTokenizer.register(ChatGLMConfig, tokenizer_class=ChatGLMTokenizer, exist_ok=True)
    for auto in (AutoConfig, AutoTokenizer) + AUTO_MODELS:
        _drop_trust_remote_code(auto)
