"""The generation loop, and the original chat / stream_chat API of each generation.

The loop is one generator over a `GenerationPlan` (generation_config.py: transformers' options as its
processors, warpers and stopping criteria; sampling.py: our sampler); `generate` and `chat` are thin wrappers
over it. The model classes provide two hooks: `_init_generation` (inputs of
the first forward) and `_next_generation_inputs` (inputs of each decode step).
"""

from __future__ import annotations

import ast
import copy
import logging
import re
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .generation_config import default_generation_config, plan_generation
from .kv_cache import KVCache, cache_length
from .sampling import (  # noqa: F401  (re-exported: the names callers have imported from here)
    NUCLEUS_CANDIDATES,
    InvalidScoreLogitsProcessor,
    SuppressUndecodableLogitsProcessor,
    apply_repetition_penalty,
    candidate_probs,
    sample_next,
    warp,
)
from .static_decode import check_mode, get_decoder

logger = logging.getLogger(__name__)

# chat() defaults of the original model files: (max_length, top_p, temperature)
CHAT_DEFAULTS = {"v1": (2048, 0.7, 0.95), "v2": (8192, 0.8, 0.8), "v3": (8192, 0.8, 0.8)}
FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "past_key_values")


def generate_stream(
    model,
    input_ids,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    return_past_key_values=False,
    decode=None,
    every_token=True,
    **options,
) -> Iterator:
    """Yield the growing sequences [b, prompt + new] after every new token (and the KV cache if asked).
    every_token=False lets the model's engine yield several new tokens at once (the newest of those it hands over
    together: chatglm/engine.py); without an engine it changes nothing.

    options: what transformers' `generate` takes (max_new_tokens, do_sample, streamer, stopping_criteria,
    generation_config, ...; see chatglm/generation_config.py), plus `generator` (a torch.Generator for sampling).
    Keys and values are written in place into a preallocated `KVCache` (a `past_key_values` passed in, the
    original's tuple or a cache from an earlier call, is copied first and never changed).
    decode: "eager" (default), or a fixed-shape decode step (chatglm/static_decode.py): "cuda_graph",
    "compile", or "static" (that step run eagerly). None takes `model.decode_mode` when set.
    """
    input_ids, attention_mask, position_ids = _unpack_inputs(input_ids, attention_mask, position_ids)
    plan = plan_generation(model, input_ids.shape[1], options, input_ids.device)
    engine = getattr(model, "engine", None)  # chatglm/engine.py: many requests batched together
    if engine is not None and engine.can_take(plan, input_ids, attention_mask, position_ids, past_key_values,
                                              return_past_key_values, decode):  # fmt: skip
        yield from engine.stream(plan, input_ids, every_token)
        return
    steps = _generate(model, plan, input_ids, attention_mask, position_ids, past_key_values, return_past_key_values,
                      decode)  # fmt: skip
    if engine is None:
        yield from steps
    else:  # each step under the model lock: a request the engine does not take never runs beside its steps
        from .engine import locked_steps

        yield from locked_steps(model, steps)


def _unpack_inputs(input_ids, attention_mask, position_ids):
    """A tokenizer's output passed whole as input_ids (ChatGLM3's demos pass apply_chat_template's)."""
    if isinstance(input_ids, Mapping):
        attention_mask = input_ids.get("attention_mask") if attention_mask is None else attention_mask
        position_ids = input_ids.get("position_ids") if position_ids is None else position_ids
        input_ids = input_ids["input_ids"]
    if input_ids is None:
        raise ValueError("generate needs input_ids (inputs_embeds alone is not supported)")
    return input_ids, attention_mask, position_ids


@torch.inference_mode()
def _generate(model, plan, input_ids, attention_mask, position_ids, past_key_values, return_past_key_values,
              decode):  # fmt: skip
    n = plan.config.num_return_sequences or 1
    if n > 1:  # each prompt n times, as transformers expands its inputs
        if past_key_values is not None:
            raise ValueError("num_return_sequences > 1 cannot continue from past_key_values")
        input_ids, attention_mask, position_ids = (
            None if t is None else t.repeat_interleave(n, dim=0) for t in (input_ids, attention_mask, position_ids)
        )
    b, prompt_len = input_ids.shape
    state = model._init_generation(input_ids, attention_mask, position_ids, past_key_values)
    decoder = None
    decode = check_mode(decode or getattr(model, "decode_mode", None) or "eager")
    # Room for the prompt and the first tokens (one token for a prompt past max_length); either cache grows
    # (doubling) when a long reply needs more.
    room = max(prompt_len + 1, min(plan.max_length, prompt_len + 256))
    capacity = cache_length(past_key_values) + (model.config.pre_seq_len or 0) + room
    if decode != "eager":
        decoder = get_decoder(model, b, capacity, decode)
        try:
            keys = state.get("keep", state["attention_mask"])  # v1 keeps a 2D mask beside the original's 3D one
            state["past_key_values"] = decoder.begin(keys, prompt_len, past_key_values)
        except BaseException:
            decoder.release()
            raise
    elif past_key_values is None:
        state["past_key_values"] = KVCache.empty(model.config.num_layers, capacity)
    else:  # a copy: the caller's cache stays valid (a retry from an older turn, two branches)
        state["past_key_values"] = KVCache.from_past(past_key_values, capacity)
    if plan.streamer is not None:
        plan.streamer.put(input_ids.cpu())  # the prompt first, as transformers does (skip_prompt drops it)
    try:
        yield from _loop(model, plan, state, decoder, input_ids, return_past_key_values)
    finally:
        if decoder is not None:
            decoder.release()
        if plan.streamer is not None:
            plan.streamer.end()  # also on an error or an abandoned stream: a reader in another thread never hangs


def _loop(model, plan, state, decoder, input_ids, return_past_key_values):
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(plan.eos, device=input_ids.device)
    prefill = True
    while True:
        if decoder is None or prefill:
            out = model(**{k: state[k] for k in FORWARD_KEYS}, use_cache=True, return_last_logit=True)
            logits, past = out.logits[:, -1], out.past_key_values
        else:  # one replay of the captured (or compiled) step
            cache = state["past_key_values"]
            logits = decoder.step(state["input_ids"], state["position_ids"], cache)
            past = cache.advance(1)
        prefill = False
        next_tokens, scores = plan.choose(input_ids, logits)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, plan.pad or 0))
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
        if plan.streamer is not None:
            plan.streamer.put(next_tokens.cpu())
        unfinished &= ~torch.isin(next_tokens, eos)
        stopped = plan.stopped(input_ids, scores)
        if stopped is not None:
            unfinished &= ~stopped
        if decoder is not None and return_past_key_values:
            decoder.track(past)  # moved out of the decoder's buffers before the next generation reuses them
        yield (input_ids, past) if return_past_key_values else input_ids
        if not unfinished.any() or input_ids.shape[1] >= plan.max_length:
            return
        state = model._next_generation_inputs(state, next_tokens, past)


class ChatStep(NamedTuple):
    """One generated token of a chat (`chat_steps`)."""

    ids: list[int]  # the reply's token ids so far (all generated, the newest and a stop token included)
    text: str  # the reply decoded so far, raw (before process_response); only changes when `grew`
    delta: str  # what `text` gained at this step ("" when it did not grow, or changed other than by appending)
    grew: bool  # this token left the text ending in a whole character (the original stream_chat yields then)
    prompt_tokens: int
    past: object = None  # the cache, when return_past_key_values


class StreamDecoder:
    """Decode a growing list of ids to text, holding back a trailing incomplete UTF-8 character: the text of the
    whole list, or None while it ends in a broken character.

    A stream calls it after every token with the whole reply so far, so it decodes only the newest tokens: with
    the tokens of at least CONTEXT characters before them, and keeps what those decode to alone, so the new text
    is what the window gained (decoding the whole reply at every token was O(n^2): at 8 streams on the tiny model
    the readers' decoding took more of the GIL than the engine's steps). The text the tokenizers write for a
    token depends on at most the 12 characters before it (ChatGLM-6B's "<|blank_12|>" and "<n>" written in
    pieces, transformers' clean_up_tokenization " n't", SentencePiece's leading space only at the start), so the
    window gives the whole list's text; where it does not extend its context (a clean-up that changes what came
    before) or the ids do not extend the last ones, the whole list is decoded (tests: every prefix of random
    replies, the three real tokenizers)."""

    CONTEXT = 16

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # the ids of `text`
        self.text = ""  # their text, ending in a whole character
        self.marks: list[tuple[int, int]] = [(0, 0)]  # (ids, characters) of earlier texts; the first starts windows
        self.window = (-1, "")  # (start, the text of ids[start:]) when the last call decoded that window

    def __call__(self, ids: list[int]) -> str | None:
        start, n, window = self.marks[0][0], len(self.ids), None
        if len(ids) >= n and ids[start:n] == self.ids[start:]:  # extends the last ids (checked over the window)
            if len(ids) == n:
                return self.text
            context = self.window[1] if self.window[0] == start else self.tokenizer.decode(self.ids[start:])
            window = self.tokenizer.decode(ids[start:])
            text = self.text + window[len(context) :] if window.startswith(context) else self.tokenizer.decode(ids)
        else:
            text = self.tokenizer.decode(ids)
        if text.rstrip().endswith("\ufffd"):  # replies are stripped: a broken byte before spaces is still last
            return None
        if not text.startswith(self.text) or len(ids) < n:  # what came before changed: windows start again
            self.marks = [(0, 0)]
        self.ids, self.text = list(ids), text
        self.window = (start, window) if window is not None and self.marks[0][0] == start else (-1, "")
        self.marks.append((len(ids), len(text)))
        while len(self.marks) > 1 and len(text) - self.marks[1][1] >= self.CONTEXT:
            self.marks.pop(0)  # the next window starts at the last mark CONTEXT characters back
        return text

    def longest_whole(self, ids: list[int]) -> str | None:
        """The text of the longest prefix of `ids` (longer than the ids last decoded) that ends in a whole
        character, None when there is none: what a caller that skipped tokens would have seen last."""
        for k in range(len(ids) - 1, len(self.ids), -1):
            text = self(ids[:k])
            if text is not None:
                return text
        return None


def parse_tool_call(code: str) -> dict:
    """Parameters of a `tool_call(a=1, b="x")` expression, read with `ast` (never evaluated).

    Only keyword arguments with literal values are accepted; anything else raises ValueError.
    """
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"tool call is not valid Python: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise ValueError("tool call is nested too deeply to read") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError("a tool call must be a single tool_call(...) expression")
    if call.args or any(kw.arg is None for kw in call.keywords):
        raise ValueError("tool_call takes keyword arguments only")
    params = {}
    for kw in call.keywords:
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            raise ValueError(f"argument {kw.arg!r} of tool_call is not a literal") from None
    return params


def process_response(version: str, response: str, history=None):
    """The original post-processing of a decoded reply; v3 returns (content, history)."""
    if version == "v1":
        response = response.strip().replace("[[训练时间]]", "2023年")
        pairs = [[",", "，"], ["!", "！"], [":", "："], [";", "；"], [r"\?", "？"]]
        for en, zh in pairs:
            response = re.sub(r"([\u4e00-\u9fff])%s" % en, r"\1%s" % zh, response)
            response = re.sub(r"%s([\u4e00-\u9fff])" % en, r"%s\1" % zh, response)
        return response
    if version == "v2":
        return response.strip().replace("[[训练时间]]", "2023年")
    history = copy.deepcopy(history or [])
    content = ""
    tools_in_system = bool(history) and history[0].get("role") == "system" and "tools" in history[0]
    for part in response.split("<|assistant|>"):
        metadata, content = part.split("\n", maxsplit=1) if "\n" in part else ("", part)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        if tools_in_system:
            code = "\n".join(content.split("\n")[1:-1])  # drop the ```python fences
            try:
                content = {"name": metadata.strip(), "parameters": parse_tool_call(code)}
            except ValueError:
                content = {"name": metadata.strip(), "content": content}
        else:
            content = {"name": metadata.strip(), "content": content}
    return content, history


def _last(iterable):
    """The last item of an iterable (None when empty)."""
    item = None
    for item in iterable:  # noqa: B007
        pass
    return item


class ChatGLMGenerationMixin:
    """generate / stream_generate / chat / stream_chat, faithful to each generation's original."""

    @property
    def generation_config(self) -> GenerationConfig:
        """The defaults `generate` starts from: the checkpoint's generation_config.json, or the config's ids."""
        gc = self.__dict__.get("_generation_config")
        if gc is None:
            gc = self.__dict__["_generation_config"] = default_generation_config(self.config)
        return gc

    @generation_config.setter
    def generation_config(self, value: GenerationConfig):
        self.__dict__["_generation_config"] = value

    def generate(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        """transformers' `generate` on (left-padded) prompts: [b, prompt + new] ids, or with
        return_dict_in_generate=True a `GenerateDecoderOnlyOutput` (sequences, and scores / logits when asked).
        Takes every option transformers' takes except beam search and assisted decoding (see
        chatglm/generation_config.py), plus decode= (see `generate_stream`)."""
        kwargs.pop("return_past_key_values", None)  # a stream_generate option: generate returns the ids
        decode = kwargs.pop("decode", None)
        past = kwargs.pop("past_key_values", None)
        input_ids, attention_mask, position_ids = _unpack_inputs(input_ids, attention_mask, position_ids)
        plan = plan_generation(self, input_ids.shape[1], kwargs, input_ids.device)
        as_dict = bool(plan.config.return_dict_in_generate)
        out = _last(_generate(self, plan, input_ids, attention_mask, position_ids, past, as_dict, decode))
        if not as_dict:
            return out
        sequences, cache = out
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=tuple(plan.scores) if plan.config.output_scores else None,
            logits=tuple(plan.logits) if plan.config.output_logits else None,
            past_key_values=cache,
        )

    def stream_generate(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        """The original's stream_generate: the growing ids after every token (with the cache when
        return_past_key_values=True)."""
        yield from generate_stream(self, input_ids, attention_mask, position_ids, **kwargs)

    def _chat_version(self, tokenizer) -> str:
        return getattr(tokenizer, "chatglm_version", None) or self.config.chatglm_version

    def _gen_kwargs(self, version, max_length, top_p, temperature, logits_processor, kwargs):
        d_len, d_top_p, d_temp = CHAT_DEFAULTS[version]
        processors = list(logits_processor or []) + [InvalidScoreLogitsProcessor()]
        return dict(
            max_length=max_length or d_len,
            do_sample=kwargs.pop("do_sample", True),
            top_p=d_top_p if top_p is None else top_p,
            temperature=d_temp if temperature is None else temperature,
            logits_processor=processors,
            **kwargs,
        )

    def _chat_inputs(self, tokenizer, version, query, history, role, past_key_values):
        if version == "v3":
            return tokenizer.build_chat_input(query, history=None if past_key_values is not None else history,
                                              role=role)  # fmt: skip
        if version == "v1":
            return tokenizer([tokenizer.build_prompt(query, history)], return_tensors="pt")
        if past_key_values is None:
            # The whole conversation. (The original, asked for return_past_key_values without a cache, sent
            # only the new round and lost the history; with no history the two prompts are the same.)
            return tokenizer([tokenizer.build_prompt(query, history)], return_tensors="pt")
        # ChatGLM2 incremental chat: only the new round, its first token dropped, no [gMASK] sop prefix.
        if history:
            ids = tokenizer.encode(f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答：", add_special_tokens=False)
            return {"input_ids": torch.tensor([ids[1:]])}
        return tokenizer([f"[Round 1]\n\n问：{query}\n\n答："], return_tensors="pt")

    def chat_steps(self, tokenizer, query: str, history=None, role: str = "user", past_key_values=None,
                   return_past_key_values=False, every_token=True, **gen) -> Iterator[ChatStep]:  # fmt: skip
        """The one token stream under every chat surface: a `ChatStep` per generated token (ids, the reply's text
        with a trailing incomplete UTF-8 character and, for ChatGLM3, the last token (a role marker when it ends
        the reply) held back, the delta that text gained). `stream_chat` turns it into (response, history); the
        servers (serving/events.py) into deltas and usage, with every_token=False: under the model's engine a
        step may then bring several tokens (generate_stream). Arguments (and generation options) as
        `stream_chat`."""
        version = self._chat_version(tokenizer)
        if version != "v3" and role != "user":
            raise ValueError(f"role={role!r} needs a ChatGLM3 model and tokenizer")
        if version == "v1" and (past_key_values is not None or return_past_key_values):
            raise ValueError("ChatGLM-6B (v1) chat does not reuse past_key_values")
        inputs = self._chat_inputs(tokenizer, version, query, list(history or []), role, past_key_values)
        yield from self._text_steps(tokenizer, version, inputs["input_ids"], gen, True, every_token,
                                    past_key_values=past_key_values,
                                    return_past_key_values=return_past_key_values)  # fmt: skip

    def completion_steps(self, tokenizer, prompt: str, every_token=True, **gen) -> Iterator[ChatStep]:
        """`chat_steps` for a raw text prompt (no chat template: the tokenizer's own special tokens only), as
        /v1/completions serves it; the same defaults, guards and stop tokens as chat."""
        version = self._chat_version(tokenizer)
        yield from self._text_steps(
            tokenizer, version, tokenizer([prompt], return_tensors="pt")["input_ids"], gen, False, every_token
        )

    def _text_steps(self, tokenizer, version, input_ids, gen, chat: bool, every_token=True,
                    **cache) -> Iterator[ChatStep]:  # fmt: skip
        """ChatSteps of one generation from input_ids. A chat's ChatGLM3 text always leaves out the last token (the
        original's rule: a role marker when it ends the reply); other text leaves out only a stop token."""
        gen = self._gen_kwargs(version, gen.pop("max_length", None), gen.pop("top_p", None),
                               gen.pop("temperature", None), gen.pop("logits_processor", None), gen)  # fmt: skip
        if version == "v3":
            gen["eos_token_id"] = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"),
                                   tokenizer.get_command("<|observation|>")]  # fmt: skip
        gen["logits_processor"].append(
            SuppressUndecodableLogitsProcessor(tokenizer.vocab_size)
        )  # after the nan/inf guard
        input_ids = input_ids.to(self.device)
        attention_mask = None  # built from input_ids (and the cache length) by _init_generation
        decode = StreamDecoder(tokenizer)
        eos = self.reply_stop_ids(tokenizer)
        n_prompt = input_ids.shape[1]
        text = ""
        for out in generate_stream(self, input_ids, attention_mask, None, **cache, every_token=every_token, **gen):
            ids, past = out if cache.get("return_past_key_values") else (out, None)
            new = ids[0, n_prompt:].tolist()
            cut = new[-1:] and (version == "v3" if chat else new[-1] in eos)
            shown = new[:-1] if cut else new
            piece = decode(shown)
            if piece is None and not every_token:  # several tokens at once: the text a token-by-token stream
                piece = decode.longest_whole(shown)  # would hold now (the newest whole-character one)
            grew = bool(piece)  # nothing printable yet, or a partial UTF-8 character: the text stays as it was
            delta = piece[len(text) :] if grew and piece.startswith(text) else ""
            text = piece if grew else text
            yield ChatStep(new, text, delta, grew, n_prompt, past)

    def reply_stop_ids(self, tokenizer) -> frozenset:
        """Ids that end a reply without being part of its text: the tokenizer's and the generation config's EOS,
        and ChatGLM3's role markers."""
        ids = {tokenizer.eos_token_id}
        eos = self.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        if self._chat_version(tokenizer) == "v3":
            ids.update(tokenizer.get_command(t) for t in ("<|user|>", "<|observation|>"))
        return frozenset(i for i in ids if i is not None)

    def stream_chat(
        self,
        tokenizer,
        query: str,
        history=None,
        role: str = "user",
        past_key_values=None,
        max_length: int | None = None,
        do_sample=True,
        top_p: float | None = None,
        temperature: float | None = None,
        logits_processor=None,
        return_past_key_values=False,
        **kwargs,
    ):
        """Yield (response, history) — plus past_key_values when asked — as the reply grows.

        Defaults per generation, as the originals: v1 max_length 2048, top_p 0.7, temperature 0.95;
        v2/v3 8192, 0.8, 0.8. v1/v2 history is a list of (query, response); v3 a list of role dicts.
        """
        version = self._chat_version(tokenizer)
        history = list(history or [])
        steps = self.chat_steps(tokenizer, query, history, role=role, past_key_values=past_key_values,
                                max_length=max_length, do_sample=do_sample, top_p=top_p, temperature=temperature,
                                logits_processor=logits_processor, return_past_key_values=return_past_key_values,
                                **kwargs)  # fmt: skip
        if version == "v3":
            history = history + [{"role": role, "content": query}]
        text, past, yielded = "", None, False
        for step in steps:
            past = step.past
            if not step.grew:  # the original yields only when the decoded text ends in a whole character
                continue
            text, yielded = step.text, True
            yield self._chat_result(version, text, query, history, past, return_past_key_values)
        if not yielded:  # always end with the final state, even when nothing printable came out
            yield self._chat_result(version, text, query, history, past, return_past_key_values)

    @staticmethod
    def _chat_result(version, text, query, history, past, return_past):
        if version == "v3":
            response, new_history = process_response(version, text, history)
        else:
            response = process_response(version, text)
            new_history = history + [(query, response)]
        return (response, new_history, past) if return_past else (response, new_history)

    def chat(
        self,
        tokenizer,
        query: str,
        history=None,
        role: str = "user",
        max_length: int | None = None,
        num_beams: int = 1,
        do_sample=True,
        top_p: float | None = None,
        temperature: float | None = None,
        logits_processor=None,
        **kwargs,
    ):
        """One reply: (response, history). Same defaults and formats as `stream_chat`."""
        if num_beams != 1:
            raise ValueError("beam search is not supported; use num_beams=1")
        return _last(
            self.stream_chat(
                tokenizer, query, history, role=role, max_length=max_length, do_sample=do_sample, top_p=top_p,
                temperature=temperature, logits_processor=logits_processor, **kwargs,
            )
        )  # fmt: skip
