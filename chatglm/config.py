"""One config class for all three ChatGLM generations, keeping the original config.json field names."""

from __future__ import annotations

import json
import os

from transformers import PretrainedConfig

from kernels.settings import settings

# Defaults of the original configuration_chatglm.py files (6B values), per architecture.
GLM_DEFAULTS = dict(  # ChatGLM-6B (v1)
    vocab_size=150528,
    hidden_size=4096,
    num_layers=28,
    num_attention_heads=32,
    layernorm_epsilon=1e-5,
    inner_hidden_size=16384,
    max_sequence_length=2048,
    position_encoding_2d=True,
    bos_token_id=130004,
    eos_token_id=130005,
    mask_token_id=130000,
    gmask_token_id=130001,
    pad_token_id=3,
    quantization_bit=0,
    pre_seq_len=None,
    prefix_projection=False,
    use_cache=True,
)
GLM2_DEFAULTS = dict(  # ChatGLM2-6B / ChatGLM3-6B (v2, v3)
    num_layers=28,
    padded_vocab_size=65024,
    hidden_size=4096,
    ffn_hidden_size=13696,
    kv_channels=128,
    num_attention_heads=32,
    seq_length=2048,
    hidden_dropout=0.0,
    classifier_dropout=None,
    attention_dropout=0.0,
    layernorm_epsilon=1e-5,
    rmsnorm=True,
    apply_residual_connection_post_layernorm=False,
    post_layer_norm=True,
    add_bias_linear=False,
    add_qkv_bias=True,
    bias_dropout_fusion=True,
    multi_query_attention=True,
    multi_query_group_num=2,
    apply_query_key_layer_scaling=True,
    attention_softmax_in_fp32=True,
    fp32_residual_connection=False,
    original_rope=True,
    eos_token_id=2,
    pad_token_id=0,
    quantization_bit=0,
    pre_seq_len=None,
    prefix_projection=False,
    use_cache=True,
)
GLM1_ONLY_KEYS = ("position_encoding_2d", "inner_hidden_size", "max_sequence_length", "gmask_token_id")
GLM2_ONLY_KEYS = ("padded_vocab_size", "multi_query_attention", "ffn_hidden_size", "kv_channels", "seq_length")
VERSIONS = ("v1", "v2", "v3")


def detect_version(config: dict, tokenizer_config: dict | None = None, path: str | None = None) -> str:
    """Which release a checkpoint is: "v1", "v2" or "v3".

    The rule, in order: an explicit `chatglm_version` (config.json or tokenizer_config.json) or the
    CHATGLM_VERSION environment variable; v1 when the config has GLM fields (position_encoding_2d,
    inner_hidden_size); otherwise v3 when a name says so ("chatglm3" in _name_or_path / name_or_path, the
    directory name, or a chat_template using <|user|>); otherwise v2. ChatGLM2 and ChatGLM3 ship the same
    tokenizer.model and architecture, so names are all there is to tell them apart.
    """
    tokenizer_config = tokenizer_config or {}
    explicit = settings.version or config.get("chatglm_version") or tokenizer_config.get("chatglm_version")
    if explicit:
        if explicit not in VERSIONS:
            where = "CHATGLM_VERSION" if settings.version else "chatglm_version"
            raise ValueError(f"{where} must be one of {', '.join(VERSIONS)}, got {explicit!r}")
        return explicit
    if any(k in config for k in GLM1_ONLY_KEYS):
        return "v1"
    if not any(k in config for k in GLM2_ONLY_KEYS) and config:
        raise ValueError(
            "config.json is not a ChatGLM-6B, ChatGLM2-6B or ChatGLM3-6B config "
            f"(none of {GLM1_ONLY_KEYS + GLM2_ONLY_KEYS} present)"
        )
    names = [config.get("_name_or_path"), config.get("name_or_path")]
    names += [tokenizer_config.get("name_or_path"), tokenizer_config.get("_name_or_path")]
    if path:
        names.append(os.path.basename(os.path.normpath(path)))
    if _names_say_v3(names):
        return "v3"
    if "<|user|>" in str(tokenizer_config.get("chat_template", "")):
        return "v3"
    return "v2"


# Sizes that must be positive integers when a config.json gives them (a string, a float such as 1e9, or a
# negative number is reported before anything is built).
SIZE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size", "vocab_size",
               "ffn_hidden_size", "kv_channels", "multi_query_group_num", "inner_hidden_size", "seq_length",
               "max_sequence_length")  # fmt: skip


def require_directory(path: str, what: str, hint: str = "") -> str:
    """`path` if it is a directory; else a FileNotFoundError (nothing there) or NotADirectoryError (a file) whose
    message names `what` and ends with `hint`."""
    path = str(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{what} {path!r} is a file, not a directory{hint}")
    raise FileNotFoundError(f"{what} {path!r} does not exist{hint}")


def read_json_object(file: str) -> dict:
    """A JSON object from `file`, or a ValueError that names the file and says what is wrong."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e.reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object {{...}}, found a {type(data).__name__}")
    return data


def check_fields(data: dict, file: str) -> None:
    """Types and ranges of the fields that size the model, checked before a model is built from them."""
    for key in SIZE_FIELDS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{file}: {key!r} must be a positive integer, got {value!r}")
    pre = data.get("pre_seq_len")
    if pre is not None and (isinstance(pre, bool) or not isinstance(pre, int) or pre < 1):
        raise ValueError(f"{file}: 'pre_seq_len' must be a positive integer or null, got {pre!r}")
    bits = data.get("quantization_bit")
    if bits not in (None, 0, 4, 8):
        raise ValueError(f"{file}: 'quantization_bit' must be 0, 4 or 8, got {bits!r}")
    check_version_field(data, file)


def check_version_field(data: dict, file: str) -> None:
    """An explicit 'chatglm_version' (config.json, tokenizer_config.json) must name a release."""
    version = data.get("chatglm_version")
    if version is not None and version not in VERSIONS:
        raise ValueError(f"{file}: 'chatglm_version' must be one of {', '.join(VERSIONS)}, got {version!r}")


def parameter_count(config) -> int:
    """Parameters the config describes (both architectures), to compare with what the weight files can hold."""
    h, n = config.hidden_size, config.num_layers
    if config.arch == 1:
        inner = config.inner_hidden_size or 4 * h
        return n * (4 * h * h + 2 * h * inner + 9 * h) + 2 * config.vocab_size * h
    heads, kv, f = config.num_attention_heads, config.kv_channels, config.ffn_hidden_size
    groups = config.multi_query_group_num if config.multi_query_attention else heads
    qkv = (heads + 2 * groups) * kv
    return n * (h * qkv + qkv + heads * kv * h + 3 * h * f + 2 * h) + 2 * config.padded_vocab_size * h


def _names_say_v3(names) -> bool:
    return any(n and "chatglm3" in str(n).lower() for n in names)


class ChatGLMConfig(PretrainedConfig):
    """Reads and writes the config.json of every ChatGLM generation.

    Only the fields of the checkpoint's own generation are set (and so written back by save_pretrained),
    with the defaults of the original configuration class for the missing ones.
    """

    model_type = "chatglm"

    def __init__(self, **kwargs):
        version = kwargs.pop("chatglm_version", None)
        if "torch_dtype" in kwargs:  # the name in the released config.json files
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        is_glm1 = version == "v1" or any(k in kwargs for k in GLM1_ONLY_KEYS)
        if not is_glm1 and "vocab_size" in kwargs and "padded_vocab_size" not in kwargs and version is None:
            is_glm1 = True  # a bare v1-style config
        defaults = GLM_DEFAULTS if is_glm1 else GLM2_DEFAULTS
        for key, value in defaults.items():
            if key not in ("bos_token_id", "eos_token_id", "pad_token_id"):
                setattr(self, key, kwargs.pop(key, value))
            else:
                kwargs.setdefault(key, value)
        if not is_glm1 and "rope_ratio" in kwargs:  # 32K variants
            self.rope_ratio = kwargs.pop("rope_ratio")
        if not is_glm1 and version is None:
            version = "v3" if _names_say_v3([kwargs.get("_name_or_path"), kwargs.get("name_or_path")]) else "v2"
        self._version = "v1" if is_glm1 else version
        kwargs.setdefault("tie_word_embeddings", is_glm1)
        super().__init__(**kwargs)
        if not is_glm1:
            # v2/v3 code reads vocab_size too; the original class sets it from padded_vocab_size.
            self.vocab_size = self.padded_vocab_size

    # The architecture: 1 for GLM (ChatGLM-6B), 2 for GLM2 (ChatGLM2/3).
    @property
    def arch(self) -> int:
        return 1 if hasattr(self, "position_encoding_2d") else 2

    @property
    def chatglm_version(self) -> str:
        if self.arch == 1:
            return "v1"
        return self.__dict__.get("_version") or "v2"

    @chatglm_version.setter
    def chatglm_version(self, value: str) -> None:
        if value not in VERSIONS:
            raise ValueError(f"chatglm_version must be one of {VERSIONS}, got {value!r}")
        self.__dict__["_version"] = value

    def to_dict(self):
        out = super().to_dict()
        out.pop("_version", None)
        out["chatglm_version"] = self.chatglm_version  # unknown to the original code, which ignores it
        if self.arch == 2:
            out.pop("vocab_size", None)  # the original v2/v3 config.json has only padded_vocab_size
        if "dtype" in out and out["dtype"] is not None:
            out["torch_dtype"] = out["dtype"]  # the name older transformers (and the original code) read
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        # Always every field: a diff against class defaults would drop the fields that tell the
        # generations apart (and the original code expects full config.json files).
        return super().to_json_string(use_diff=False)

    @classmethod
    def from_checkpoint(cls, path: str, **overrides) -> ChatGLMConfig:
        """Read DIR/config.json, deciding v2 vs v3 with `detect_version`."""
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no config.json in {path!r}: is this a ChatGLM checkpoint directory?")
        data = read_json_object(config_file)
        check_fields(data, config_file)
        tok_file = os.path.join(path, "tokenizer_config.json")
        tok_cfg = read_json_object(tok_file) if os.path.isfile(tok_file) else {}
        check_version_field(tok_cfg, tok_file)
        version = overrides.pop("chatglm_version", None) or detect_version(data, tok_cfg, path)
        data.update(overrides)
        config = cls(**{k: v for k, v in data.items() if k != "chatglm_version"}, chatglm_version=version)
        config.chatglm_version = version
        return config
