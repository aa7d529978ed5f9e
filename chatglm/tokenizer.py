"""SentencePiece tokenizers of the three ChatGLM generations, with the original ids, prompts and padding.

`ChatGLMTokenizer` is the class that tokenizer_config.json names; its `from_pretrained` looks at the
directory and returns the tokenizer of the right generation:
- `GLMTokenizer` (v1, ice_text.model): `<n>`, `<|tab|>`, `<|blank_N|>` pre-processing, ids offset by
  num_image_tokens, `[gMASK] <sop>` appended at the end, left padding with GLM's 2D positions and 3D mask.
- `GLM2Tokenizer` (v2, tokenizer.model): specials appended after the SentencePiece vocab, `[gMASK] sop` prefix.
- `GLM3Tokenizer` (v3): v2 plus the role tokens and `build_chat_input`.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import shutil

import numpy as np
import sentencepiece as spm
from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.utils import PaddingStrategy

from .config import detect_version, require_directory

V1_VOCAB_FILE = "ice_text.model"
V2_VOCAB_FILE = "tokenizer.model"

# Chat templates: `apply_chat_template(messages, add_generation_prompt=True)` gives exactly the ids of the
# original prompt builders (v1/v2 `build_prompt` then the special tokens, v3 `build_chat_input`). The original
# encodes some pieces of a prompt separately (v3: each message's "metadata\n" and its content), which text alone
# cannot express, so the rendered text is tokenized by `_tokenize_chat`, which splits where the original does.
V1_CHAT_TEMPLATE = (
    "{% set ns = namespace(round=0) %}"
    "{% if messages | length == 1 and messages[0]['role'] == 'user' %}{{ messages[0]['content'] }}"
    "{% else %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[Round {{ ns.round }}]\n问：{{ message['content'] }}\n答："
    "{% set ns.round = ns.round + 1 %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}\n"
    "{% else %}{{ raise_exception('ChatGLM-6B has user and assistant turns only, not ' ~ message['role']) }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if add_generation_prompt %}[gMASK]<sop>{% endif %}"
)
V2_CHAT_TEMPLATE = (
    "[gMASK]sop{% set ns = namespace(round=0) %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.round = ns.round + 1 %}"
    "[Round {{ ns.round }}]\n\n问：{{ message['content'] }}\n\n答："
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}\n\n"
    "{% else %}{{ raise_exception('ChatGLM2-6B has user and assistant turns only, not ' ~ message['role']) }}"
    "{% endif %}{% endfor %}"
)
V3_TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
V3_CHAT_TEMPLATE = (
    "[gMASK]sop"
    # tools passed to apply_chat_template (OpenAI style or plain) become ChatGLM3's system message with tools
    "{% if tools and not (messages and messages[0]['role'] == 'system' and messages[0]['tools'] is defined) %}"
    "{% set ns = namespace(tools=[]) %}{% for tool in tools %}"
    "{% set ns.tools = ns.tools + [tool['function'] if tool['function'] is defined else tool] %}{% endfor %}"
    "<|system|>\n" + V3_TOOLS_PROMPT + "\n{{ ns.tools | tojson(indent=4) }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'observation' if message['role'] == 'tool' else message['role'] %}"
    "{% if role not in ['system', 'user', 'assistant', 'observation'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': expected system, user, assistant or observation') }}"
    "{% endif %}"
    "<|{{ role }}|>{{ message['metadata'] if message['metadata'] is defined else '' }}\n"
    "{{ message['content'] if message['content'] is defined else '' }}"
    "{% if role == 'system' and message['tools'] is defined %}{{ '\\n' }}{{ message['tools'] | tojson(indent=4) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Set while apply_chat_template tokenizes what its template rendered.
_CHAT_TEXT = contextvars.ContextVar("chatglm_chat_text", default=False)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ChatGLMTokenizer(PreTrainedTokenizer):
    """Shared behaviour; `from_pretrained` dispatches to the generation's subclass."""

    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    chatglm_version = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = require_directory(pretrained_model_name_or_path, "tokenizer directory",
                                 " (this toolkit loads local checkpoints only, nothing is downloaded)")  # fmt: skip
        kwargs.pop("trust_remote_code", None)
        version = kwargs.pop("chatglm_version", None)
        if cls is ChatGLMTokenizer:
            if version is None:
                if os.path.isfile(os.path.join(path, V1_VOCAB_FILE)):
                    version = "v1"
                elif os.path.isfile(os.path.join(path, V2_VOCAB_FILE)):
                    config = _read_json(os.path.join(path, "config.json"))
                    tok_cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
                    version = detect_version(config, tok_cfg, path)
                    version = "v2" if version == "v1" else version
                else:
                    raise FileNotFoundError(
                        f"no tokenizer file in {path!r}: expected {V1_VOCAB_FILE} (ChatGLM-6B) or "
                        f"{V2_VOCAB_FILE} (ChatGLM2-6B / ChatGLM3-6B)"
                    )
            klass = {"v1": GLMTokenizer, "v2": GLM2Tokenizer, "v3": GLM3Tokenizer}[version]
            return klass.from_pretrained(path, *args, **kwargs)
        vocab = os.path.join(path, cls.vocab_files_names["vocab_file"])
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"tokenizer file {vocab!r} is missing")
        return super().from_pretrained(path, *args, **kwargs)

    # --- what every generation shares -------------------------------------------------------------------
    def tokenize(self, text: str, **kwargs) -> list[str]:
        # The originals hand text straight to SentencePiece; no added-token splitting.
        return self._tokenize_chat(text) if _CHAT_TEXT.get() else self._tokenize_plain(text)

    def _tokenize_plain(self, text: str) -> list[str]:
        return self._tokenize(text)

    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' apply_chat_template; the rendered prompt is tokenized as the original builds it."""
        token = _CHAT_TEXT.set(True)
        try:
            return super().apply_chat_template(conversation, *args, **kwargs)
        finally:
            _CHAT_TEXT.reset(token)

    def _tokenize_chat(self, text: str) -> list[str]:
        raise NotImplementedError

    def _pieces(self, ids) -> list[str]:
        """`_convert_id_to_token` of each id, remembered per id (at most the vocabulary): a streamed reply is
        decoded whole at every token, and converting its ids one by one was most of that (8 streams through the
        OpenAI server on the tiny model spent more time decoding text than generating it)."""
        cache = self.__dict__.setdefault("_piece_cache", {})
        pieces = []
        for t in ids:
            piece = cache.get(t)
            if piece is None:
                piece = cache[t] = self._convert_id_to_token(t)  # an id out of range raises, and is not kept
            pieces.append(piece)
        return pieces

    def decode(self, token_ids, skip_special_tokens=False, **kwargs):
        """As transformers' decode; a list of ints (what a stream passes, its whole reply, at every token) goes
        straight to _decode: transformers first converts every element, a third of that decoding."""
        if type(token_ids) is list and token_ids and type(token_ids[0]) is int:  # one sequence, not a batch
            return self._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = [int(t) for t in token_ids]
        if skip_special_tokens:
            specials = set(self.all_special_ids) | set(self._command_ids())
            token_ids = [t for t in token_ids if t not in specials]
        text = self._decode_ids(token_ids)
        clean = (
            self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        )
        return self.clean_up_tokenization(text) if clean else text

    def _command_ids(self) -> list[int]:
        return []

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None):
        name = self.vocab_files_names["vocab_file"]
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + name)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)

    def save_pretrained(self, save_directory, **kwargs):
        files = super().save_pretrained(save_directory, **kwargs)
        # Keep the original tokenizer_config.json shape: tokenizer_class names the original class.
        cfg_path = os.path.join(str(save_directory), "tokenizer_config.json")
        cfg = _read_json(cfg_path)
        cfg["tokenizer_class"] = "ChatGLMTokenizer"
        cfg["chatglm_version"] = self.chatglm_version
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
        return files


def _pad_target(n, strategy, max_length, multiple):
    """The padded length (None: no padding), as transformers computes it."""
    if strategy == PaddingStrategy.DO_NOT_PAD:
        return None
    if strategy == PaddingStrategy.LONGEST:
        max_length = n
    if max_length is not None and multiple is not None and max_length % multiple:
        max_length = (max_length // multiple + 1) * multiple
    return max_length


def _pad_left_extras(tokenizer, encoded, diff):
    for key in ("token_type_ids", "special_tokens_mask"):
        if key in encoded:
            fill = tokenizer.pad_token_type_id if key == "token_type_ids" else 1
            encoded[key] = [fill] * diff + list(encoded[key])
    encoded[tokenizer.model_input_names[0]] = [tokenizer.pad_token_id] * diff + list(
        encoded[tokenizer.model_input_names[0]]
    )


class GLMTokenizer(ChatGLMTokenizer):
    """ChatGLM-6B (v1) tokenizer over ice_text.model."""

    vocab_files_names = {"vocab_file": V1_VOCAB_FILE}
    chatglm_version = "v1"
    max_blank_length = 80

    def __init__(
        self,
        vocab_file,
        do_lower_case=False,
        remove_space=False,
        bos_token="<sop>",
        eos_token="<eop>",
        end_token="</s>",
        mask_token="[MASK]",
        gmask_token="[gMASK]",
        padding_side="left",
        pad_token="<pad>",
        unk_token="<unk>",
        num_image_tokens=20000,
        clean_up_tokenization_spaces=True,  # the transformers default the original ran with
        chat_template=None,
        **kwargs,
    ):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.num_image_tokens = num_image_tokens
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.end_token = end_token
        self.gmask_token = gmask_token
        kwargs.pop("tokenizer_class", None)
        kwargs.pop("auto_map", None)
        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            padding_side=padding_side,
            bos_token=bos_token,
            eos_token=eos_token,
            mask_token=mask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            chat_template=chat_template or V1_CHAT_TEMPLATE,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp.vocab_size()

    @property
    def gmask_token_id(self) -> int:
        return self._convert_token_to_id(self.gmask_token)

    @property
    def end_token_id(self) -> int:
        return self._convert_token_to_id(self.end_token)

    def _command_ids(self):
        return [self._convert_token_to_id(t) for t in ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")]

    def _preprocess(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(self.max_blank_length, 1, -1):  # longest runs first
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    def _postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for n in range(2, self.max_blank_length + 1):
            text = text.replace(f"<|blank_{n}|>", " " * n)
        return text

    def _tokenize_plain(self, text: str) -> list[str]:
        # As transformers 4.30 did for the original: the named special tokens written in the text
        # (<sop>, <eop>, [MASK], <pad>, <unk>; not [gMASK]) are kept whole, with the spaces next to them dropped.
        specials = [t for t in (self.bos_token, self.eos_token, self.mask_token, self.pad_token, self.unk_token) if t]
        parts = re.split("(" + "|".join(re.escape(t) for t in specials) + ")", text)
        pieces = []
        for i, part in enumerate(parts):
            if i % 2:
                pieces.append(part)
                continue
            if i > 0:
                part = part.lstrip()
            if i < len(parts) - 1:
                part = part.rstrip()
            if part:
                pieces += self._tokenize(part)
        return pieces

    def _tokenize(self, text, **kwargs):
        return self.sp.encode_as_pieces(self._preprocess(text))

    def _tokenize_chat(self, text: str) -> list[str]:
        # build_prompt's text, then [gMASK] <sop> as build_inputs_with_special_tokens appends them
        suffix = self.gmask_token + self.bos_token
        if text.endswith(suffix):
            return self._tokenize_plain(text[: -len(suffix)]) + [self.gmask_token, self.bos_token]
        return self._tokenize_plain(text)

    def _convert_token_to_id(self, token: str) -> int:
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.id_to_piece(index - self.num_image_tokens)

    def convert_tokens_to_string(self, tokens):
        return self._postprocess(self.sp.decode_pieces(tokens))

    def _decode_ids(self, ids):
        ids = [t for t in ids if t != self.pad_token_id]
        if not ids:
            return ""
        return self.convert_tokens_to_string(self._pieces(ids))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def build_prompt(self, query: str, history=None) -> str:
        """The ChatGLM-6B chat prompt: the bare query, or "[Round i]\\n问：..\\n答：..\\n" rounds from 0."""
        if not history:
            return query
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        return prompt + f"[Round {len(history)}]\n问：{query}\n答："

    def _pad(
        self,
        encoded_inputs,
        max_length=None,
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of=None,
        padding_side=None,
        return_attention_mask=None,
    ):
        # As the original: with padding, a [1, s, s] bool mask (True = masked; the context before <sop> is
        # bidirectional) and [2, s] positions (position, block position), padded on the left.
        ids = encoded_inputs[self.model_input_names[0]]
        n = len(ids)
        target = _pad_target(n, padding_strategy, max_length, pad_to_multiple_of)
        if target is None:
            return encoded_inputs
        bos, mask, gmask = self.bos_token_id, self._convert_token_to_id("[MASK]"), self.gmask_token_id
        ctx = ids.index(bos) if bos in ids else n
        if "attention_mask" not in encoded_inputs or np.ndim(encoded_inputs["attention_mask"]) < 3:
            allowed = np.tril(np.ones((1, n, n)))
            allowed[:, :, :ctx] = 1
            encoded_inputs["attention_mask"] = allowed < 0.5
        if "position_ids" not in encoded_inputs:
            pos = np.arange(n, dtype=np.int64)
            mask_token = mask if mask in ids else gmask
            if mask_token in ids:
                pos[ctx:] = ids.index(mask_token)
            block = np.concatenate([np.zeros(ctx, dtype=np.int64), np.arange(1, n - ctx + 1, dtype=np.int64)])
            encoded_inputs["position_ids"] = np.stack([pos, block], axis=0)
        diff = target - n
        if diff > 0:
            encoded_inputs["attention_mask"] = np.pad(
                encoded_inputs["attention_mask"], [(0, 0), (diff, 0), (diff, 0)], constant_values=True
            )
            encoded_inputs["position_ids"] = np.pad(encoded_inputs["position_ids"], [(0, 0), (diff, 0)])
            _pad_left_extras(self, encoded_inputs, diff)
        return encoded_inputs


class GLM2Tokenizer(ChatGLMTokenizer):
    """ChatGLM2-6B (v2) tokenizer over tokenizer.model."""

    vocab_files_names = {"vocab_file": V2_VOCAB_FILE}
    chatglm_version = "v2"
    command_tokens = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]

    default_chat_template = V2_CHAT_TEMPLATE

    def __init__(self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False, chat_template=None,
                 **kwargs):  # fmt: skip
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        n = self.sp.vocab_size()
        self.commands = {tok: n + i for i, tok in enumerate(self.command_tokens)}
        self.index_commands = {i: tok for tok, i in self.commands.items()}
        self.commands.update({"<bos>": self.sp.bos_id(), "<eos>": self.sp.eos_id(), "<pad>": self.sp.unk_id()})
        for key in ("tokenizer_class", "auto_map", "unk_token", "pad_token", "eos_token"):
            kwargs.pop(key, None)
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            unk_token="<unk>",
            pad_token="<unk>",
            eos_token="</s>",
            chat_template=chat_template or self.default_chat_template,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size() + len(self.command_tokens)

    def get_vocab(self) -> dict:
        # Every SentencePiece piece (including <unk>, <s>, </s>) and the appended special tokens.
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.vocab_size())}
        vocab.update({t: i for i, t in self.index_commands.items()})
        vocab.update(self._added_tokens_encoder)
        return vocab

    def get_command(self, token: str) -> int:
        if token not in self.commands:
            raise KeyError(f"{token} is not a special token of the ChatGLM {self.chatglm_version} tokenizer")
        return self.commands[token]

    def _command_ids(self):
        return list(self.index_commands)

    def _tokenize(self, text, **kwargs):
        return self.sp.encode_as_pieces(text)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.commands and token not in ("<bos>", "<eos>", "<pad>"):
            return self.commands[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        special = (self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id())
        if index in self.index_commands or index in special or index < 0:
            return ""
        if index >= self.sp.vocab_size():  # rows of the padded embedding no text maps to
            raise IndexError(f"token id {index} is out of the ChatGLM2 tokenizer's range")
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        return self.sp.decode_pieces(tokens)

    def _decode_ids(self, ids):
        return self.convert_tokens_to_string(self._pieces(ids))

    def get_prefix_tokens(self) -> list[int]:
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    _role_re = None  # v3: the role tokens

    def _tokenize_chat(self, text: str) -> list[str]:
        # "[gMASK]sop", then (v3) each role token followed by "metadata\n" and the content, each encoded apart
        pieces = []
        if text.startswith("[gMASK]sop"):
            pieces, text = ["[gMASK]", "sop"], text[len("[gMASK]sop") :]
        parts = self._role_re.split(text) if self._role_re is not None else [text]
        roles = self._role_re.findall(text) if self._role_re is not None else []
        pieces += self.sp.encode_as_pieces(parts[0]) if parts[0] else []
        for role, part in zip(roles, parts[1:]):
            pieces.append(role)
            head, newline, content = part.partition("\n")
            for segment in (head + newline, content):
                if segment:
                    pieces += self.sp.encode_as_pieces(segment)
        return pieces

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.get_command("<eos>")]
        return ids

    def build_prompt(self, query: str, history=None) -> str:
        """The ChatGLM2-6B chat prompt: "[Round i]\\n\\n问：..\\n\\n答：..\\n\\n" rounds from 1."""
        history = history or []
        prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history))
        return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："

    def _pad(
        self,
        encoded_inputs,
        max_length=None,
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of=None,
        padding_side=None,
        return_attention_mask=None,
    ):
        # Left padding; positions count from the first real token, as the original.
        n = len(encoded_inputs[self.model_input_names[0]])
        encoded_inputs.setdefault("attention_mask", [1] * n)
        encoded_inputs.setdefault("position_ids", list(range(n)))
        target = _pad_target(n, padding_strategy, max_length, pad_to_multiple_of)
        if target is not None and target > n:
            diff = target - n
            encoded_inputs["attention_mask"] = [0] * diff + list(encoded_inputs["attention_mask"])
            encoded_inputs["position_ids"] = [0] * diff + list(encoded_inputs["position_ids"])
            _pad_left_extras(self, encoded_inputs, diff)
        return encoded_inputs


class GLM3Tokenizer(GLM2Tokenizer):
    """ChatGLM3-6B (v3) tokenizer: v2 plus the role tokens and build_chat_input."""

    chatglm_version = "v3"
    default_chat_template = V3_CHAT_TEMPLATE
    role_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    command_tokens = GLM2Tokenizer.command_tokens + role_tokens
    _role_re = re.compile("|".join(re.escape(t) for t in role_tokens))

    def __init__(self, vocab_file, encode_special_tokens=False, **kwargs):
        self.encode_special_tokens = encode_special_tokens
        super().__init__(vocab_file, encode_special_tokens=encode_special_tokens, **kwargs)

    def _tokenize(self, text, **kwargs):
        if not self.encode_special_tokens:
            return self.sp.encode_as_pieces(text)
        pieces, last = [], 0
        for m in self._role_re.finditer(text):
            if last < m.start():
                pieces += self.sp.encode_as_pieces(text[last : m.start()])
            pieces.append(m.group())
            last = m.end()
        if last < len(text):
            pieces += self.sp.encode_as_pieces(text[last:])
        return pieces

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.index_commands:
            return self.index_commands[index]
        if index in (self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id()) or index < 0:
            return ""
        if index >= self.sp.vocab_size():  # padded embedding rows decode to nothing (fix of 456aa875)
            return ""
        return self.sp.id_to_piece(index)

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        if role not in ("system", "user", "assistant", "observation"):
            raise ValueError(f"unknown role {role!r}: expected system, user, assistant or observation")
        return [self.get_command(f"<|{role}|>")] + self.sp.encode(f"{metadata}\n") + self.sp.encode(message)

    def build_chat_input(self, query: str, history=None, role: str = "user"):
        """Token ids of a v3 conversation: `[gMASK] sop`, each turn, the query, then `<|assistant|>`."""
        ids = []
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query)
        ids.append(self.get_command("<|assistant|>"))
        ids = self.build_inputs_with_special_tokens(ids)
        return BatchEncoding(
            {"input_ids": [ids], "attention_mask": [[1] * len(ids)], "position_ids": [list(range(len(ids)))]},
            tensor_type="pt",
        )
