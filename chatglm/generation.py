"""Sampling, the generation loop, and the original chat / stream_chat API of each generation.

The loop is small free functions (logits processing, sampling, one generator); `generate` and `chat` are
thin wrappers over `generate_stream`. The model classes provide two hooks: `_init_generation` (inputs of
the first forward) and `_next_generation_inputs` (inputs of each decode step).
"""

from __future__ import annotations

import ast
import copy
import logging
import re
from collections.abc import Iterator

import torch

from .kv_cache import KVCache, cache_length
from .static_decode import check_mode, get_decoder

logger = logging.getLogger(__name__)

# chat() defaults of the original model files: (max_length, top_p, temperature)
CHAT_DEFAULTS = {"v1": (2048, 0.7, 0.95), "v2": (8192, 0.8, 0.8), "v3": (8192, 0.8, 0.8)}
FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "past_key_values")


class InvalidScoreLogitsProcessor:
    """The original guard: on nan/inf scores, put all the mass on token 5."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(scores).all()):  # one read back to the host per step, not two
            scores.zero_()
            scores[..., 5] = 5e4
        return scores


def apply_repetition_penalty(input_ids, scores, penalty: float):
    # Tokens already present: divide positive scores by the penalty, multiply negative ones (CTRL, as HF).
    seen = torch.gather(scores, 1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, input_ids, seen)


def warp(scores, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Temperature, then top-k, then top-p (nucleus), in the order transformers applies them."""
    if temperature is not None and temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        scores = scores / temperature
    if top_k and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p)
        drop[..., -1:] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def sample_next(
    input_ids,
    logits,
    do_sample=True,
    temperature=1.0,
    top_k=50,
    top_p=1.0,
    repetition_penalty=1.0,
    logits_processor=None,
    generator=None,
):
    """Next token per row from the last-position logits [b, vocab]."""
    scores = logits.float()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        scores = apply_repetition_penalty(input_ids, scores, repetition_penalty)
    for proc in logits_processor or ():
        scores = proc(input_ids, scores)
    if not do_sample:
        return scores.argmax(dim=-1)
    window = candidate_probs(scores, temperature, top_k, top_p)
    if window is None:  # the nucleus is wider than the candidate window: the plain full-vocabulary path
        probs = warp(scores, temperature, top_k, top_p).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    probs, ids = window
    return ids.gather(1, torch.multinomial(probs, num_samples=1, generator=generator)).squeeze(1)


# Candidates looked at when sampling with top_p and no top_k: the nucleus of a chat model is almost always
# far smaller. A full sort of a 65K vocabulary costs tens of ms per token on a CPU; top-k of it well under one.
NUCLEUS_CANDIDATES = 256


def candidate_probs(scores, temperature=1.0, top_k=0, top_p=1.0):
    """`warp(...).softmax()` restricted to its non-zero entries: (probs [b, w], token ids [b, w]), or None.

    Same distribution as `warp` (temperature, top-k, then top-p, transformers' order), found from a top-k
    window instead of a sort of the whole vocabulary. None when the window cannot hold the answer exactly
    (ties at the k-th score, or a nucleus wider than the window); the caller then uses `warp`.
    """
    if temperature is not None and temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        scores = scores / temperature
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    vocab = scores.shape[-1]
    k = top_k if top_k and 0 < top_k < vocab else 0
    nucleus = top_p is not None and top_p < 1.0
    window = k or (min(NUCLEUS_CANDIDATES, vocab) if nucleus else vocab)
    vals, ids = torch.topk(scores, window, dim=-1)  # sorted, most likely first
    if k and bool(((scores >= vals[:, -1:]).sum(-1) > k).any()):
        return None  # warp keeps every token tied with the k-th; the window holds only k of them
    norm = vals if k else scores  # top-k renormalizes over the k kept tokens
    probs = (vals - torch.logsumexp(norm, dim=-1, keepdim=True)).exp()
    if nucleus:
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        if not k and window < vocab and bool((probs.sum(-1) < top_p).any()):
            return None
        keep = before < top_p
        keep[:, 0] = True
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, ids


@torch.inference_mode()
def generate_stream(
    model,
    input_ids,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    max_length=None,
    max_new_tokens=None,
    eos_token_id=None,
    pad_token_id=None,
    return_past_key_values=False,
    kv_cache="static",
    decode=None,
    **sampling,
) -> Iterator:
    """Yield the growing sequences [b, prompt + new] after every new token (and the KV cache if asked).

    kv_cache="static" (default) writes keys and values in place into a preallocated `KVCache`; "concat" grows
    the original's tuple cache with torch.cat at every step (kept as the reference-style path for benchmarks).
    decode: "eager" (default), or a fixed-shape decode step (chatglm/static_decode.py): "cuda_graph",
    "compile", or "static" (that step run eagerly). None takes `model.decode_mode` when set.
    """
    num_beams = sampling.pop("num_beams", 1)
    if num_beams and num_beams != 1:
        raise ValueError("beam search is not supported; use num_beams=1")
    for unused in ("use_cache", "output_scores", "return_dict_in_generate", "synced_gpus", "streamer"):
        sampling.pop(unused, None)
    b, prompt_len = input_ids.shape
    if max_new_tokens is not None:
        max_length = prompt_len + max_new_tokens
    if max_length is None:
        max_length = prompt_len + 20
    if prompt_len >= max_length:
        logger.warning("input length %d >= max_length %d: generating a single token", prompt_len, max_length)
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    unknown = set(sampling) - {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                               "logits_processor", "generator"}  # fmt: skip
    if unknown:
        raise TypeError(f"unexpected generation arguments: {', '.join(sorted(unknown))}")
    state = model._init_generation(input_ids, attention_mask, position_ids, past_key_values)
    decoder = None
    decode = check_mode(decode or getattr(model, "decode_mode", None) or "eager")
    # Room for the prompt and the first tokens (one token for a prompt past max_length); either cache grows
    # (doubling) when a long reply needs more.
    room = max(prompt_len + 1, min(max_length, prompt_len + 256))
    capacity = cache_length(past_key_values) + (model.config.pre_seq_len or 0) + room
    if decode != "eager":
        if kv_cache != "static":
            raise ValueError(f"decode={decode!r} needs kv_cache='static'")
        decoder = get_decoder(model, b, capacity, decode)
        try:
            keys = state.get("keep", state["attention_mask"])  # v1 keeps a 2D mask beside the original's 3D one
            state["past_key_values"] = decoder.begin(keys, prompt_len, past_key_values)
        except BaseException:
            decoder.release()
            raise
    elif kv_cache == "static":
        if past_key_values is None:
            state["past_key_values"] = KVCache.empty(model.config.num_layers, capacity)
        else:  # a copy: the caller's cache stays valid (a retry from an older turn, two branches)
            state["past_key_values"] = KVCache.from_past(past_key_values, capacity)
    elif kv_cache != "concat":
        raise ValueError(f"kv_cache must be 'static' or 'concat', got {kv_cache!r}")
    unfinished = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    try:
        yield from _loop(model, state, decoder, input_ids, unfinished, eos, pad, max_length,
                         return_past_key_values, sampling)  # fmt: skip
    finally:
        if decoder is not None:
            decoder.release()


def _loop(model, state, decoder, input_ids, unfinished, eos, pad, max_length, return_past_key_values, sampling):
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
        next_tokens = sample_next(input_ids, logits, **sampling)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad or 0))
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
        unfinished &= ~torch.isin(next_tokens, eos)
        if decoder is not None and return_past_key_values:
            decoder.track(past)  # moved out of the decoder's buffers before the next generation reuses them
        yield (input_ids, past) if return_past_key_values else input_ids
        if not unfinished.any() or input_ids.shape[1] >= max_length:
            return
        state = model._next_generation_inputs(state, next_tokens, past)


class SuppressUndecodableLogitsProcessor:
    """Never pick ids past the tokenizer's vocabulary (rows of the padded embedding that decode to nothing).

    The originals could sample them from a damaged or random model and then fail in decode; a trained model
    gives them no mass, so this changes nothing for it.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.vocab_size:
            scores[..., self.vocab_size :] = float("-inf")
        return scores


class StreamDecoder:
    """Decode a growing list of ids to text, holding back a trailing incomplete UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, ids) -> str | None:
        text = self.tokenizer.decode(ids)
        if text.rstrip().endswith("\ufffd"):  # replies are stripped: a broken byte before spaces is still last
            return None
        return text


def parse_tool_call(code: str) -> dict:
    """Parameters of a `tool_call(a=1, b="x")` expression, read with `ast` (never evaluated).

    Only keyword arguments with literal values are accepted; anything else raises ValueError.
    """
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"tool call is not valid Python: {e.msg}") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError("a tool call must be a single tool_call(...) expression")
    if call.args or any(kw.arg is None for kw in call.keywords):
        raise ValueError("tool_call takes keyword arguments only")
    params = {}
    for kw in call.keywords:
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, SyntaxError, TypeError):
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

    def generate(self, input_ids, attention_mask=None, position_ids=None, **kwargs) -> torch.Tensor:
        """Batched generation from (left-padded) prompts; returns [b, prompt + new] like transformers."""
        out = _last(generate_stream(self, input_ids, attention_mask, position_ids, **kwargs))
        return out[0] if kwargs.get("return_past_key_values") else out

    def stream_generate(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
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
        if version != "v3" and role != "user":
            raise ValueError(f"role={role!r} needs a ChatGLM3 model and tokenizer")
        if version == "v1" and (past_key_values is not None or return_past_key_values):
            raise ValueError("ChatGLM-6B (v1) chat does not reuse past_key_values")
        history = list(history or [])
        gen = self._gen_kwargs(version, max_length, top_p, temperature, logits_processor,
                               dict(kwargs, do_sample=do_sample))  # fmt: skip
        if version == "v3":
            gen["eos_token_id"] = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"),
                                   tokenizer.get_command("<|observation|>")]  # fmt: skip
        gen["logits_processor"].append(
            SuppressUndecodableLogitsProcessor(tokenizer.vocab_size)
        )  # after the nan/inf guard
        inputs = self._chat_inputs(tokenizer, version, query, history, role, past_key_values)
        input_ids = inputs["input_ids"].to(self.device)
        attention_mask = None  # built from input_ids (and the cache length) by _init_generation
        decode = StreamDecoder(tokenizer)
        if version == "v3":
            history = history + [{"role": role, "content": query}]
        n_prompt = input_ids.shape[1]
        text, past, yielded = "", None, False
        for out in generate_stream(self, input_ids, attention_mask, None, past_key_values=past_key_values,
                                   return_past_key_values=return_past_key_values, **gen):  # fmt: skip
            ids, past = out if return_past_key_values else (out, None)
            new = ids[0, n_prompt:].tolist()
            if version == "v3":
                new = new[:-1]  # the original always cuts the last token (the stop token at the end)
            piece = decode(new)
            if not piece:  # nothing printable yet, or a partial UTF-8 character
                continue
            text, yielded = piece, True
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
