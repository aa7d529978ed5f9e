"""transformers' `generate` options on our generation loop.

`plan_generation` merges the options the way `GenerationMixin.generate` does (the call's keyword arguments over
`generation_config=`, over the model's `generation_config`, which the checkpoint's generation_config.json fills) and
turns them into transformers' own logits processors, warpers and stopping criteria, in transformers' order. Our
loop keeps its fast paths (the top-k window sampler, the static / compiled / CUDA-graph decode steps); these
objects only look at each step's logits and ids, so every option works in every decode mode.

An option that is set and cannot be honoured is an error naming it; one that cannot change the tokens here (a
beam-search length penalty at one beam, a cache implementation: ours is always preallocated) is logged once.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp
from transformers.generation.stopping_criteria import MaxTimeCriteria, StoppingCriteriaList, StopStringCriteria

from .config import read_json_object
from .sampling import apply_repetition_penalty, greedy_rule, sample_next, warp

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"

# What only sampling reads (transformers' validate() flags them when do_sample is false); past the first three,
# transformers' own warpers (our window sampler covers temperature / top-k / top-p).
OTHER_WARPERS = ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
SAMPLING_FLAGS = ("temperature", "top_p", "top_k", *OTHER_WARPERS)

# Options of the loop itself; everything else goes through GenerationConfig.
LOOP_OPTIONS = ("logits_processor", "stopping_criteria", "streamer", "prefix_allowed_tokens_fn", "generator",
                "tokenizer", "generation_config")  # fmt: skip
# What each option means when it is unset (transformers' defaults): the value that changes nothing.
NEUTRAL = {
    "max_length": None, "max_new_tokens": None, "min_length": 0, "min_new_tokens": 0, "do_sample": False,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "top_h": None, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "num_return_sequences": 1, "output_scores": False, "output_logits": False,
    "return_dict_in_generate": False, "output_attentions": False, "output_hidden_states": False,
    "remove_invalid_values": False, "renormalize_logits": False, "use_cache": True, "guidance_scale": 1.0,
    "low_memory": False, "token_healing": False, "use_mtp": False,
}  # fmt: skip
HONOURED = {
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h", "repetition_penalty", "no_repeat_ngram_size",
    "bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "renormalize_logits",
    "eos_token_id", "pad_token_id", "bos_token_id", "max_time", "stop_strings", "num_return_sequences",
    "output_scores", "output_logits", "return_dict_in_generate", "use_cache", "num_beams",
}  # fmt: skip
# Set, but cannot change the tokens of one-beam generation without an assistant model: logged once, not an error.
NO_EFFECT = {
    "length_penalty": "a beam-search option (num_beams is 1)",
    "early_stopping": "a beam-search option (num_beams is 1)",
    "num_assistant_tokens": "an assisted-generation option (no assistant model)",
    "num_assistant_tokens_schedule": "an assisted-generation option (no assistant model)",
    "assistant_confidence_threshold": "an assisted-generation option (no assistant model)",
    "assistant_lookbehind": "an assisted-generation option (no assistant model)",
    "target_lookbehind": "an assisted-generation option (no assistant model)",
    "max_matching_ngram_size": "a prompt-lookup option (no prompt lookup)",
    "decoder_start_token_id": "an encoder-decoder option",
    "cache_implementation": "the KV cache is always chatglm's own preallocated one",
    "cache_config": "the KV cache is always chatglm's own preallocated one",
    "max_cache_len": "the KV cache grows by itself",
    "compile_config": "compiled decode is chosen with decode='compile'",
    "disable_compile": "compiled decode is chosen with decode='compile'",
    "prefill_chunk_size": "the prompt is prefilled in one pass",
    "low_memory": "a beam-search option",
    "is_assistant": "an assisted-generation option",
}
_logged: set[str] = set()


def load_generation_config(path: str, config) -> GenerationConfig:
    """The checkpoint's generation_config.json, or one made from the model config (eos / pad / bos ids)."""
    file = os.path.join(str(path), GENERATION_CONFIG_FILE)
    if os.path.isfile(file):
        data = read_json_object(file)
        try:
            return GenerationConfig.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{file}: not a valid generation config ({e})") from None
    return default_generation_config(config)


def default_generation_config(config) -> GenerationConfig:
    ids = {k: getattr(config, k, None) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
    return GenerationConfig(**{k: v for k, v in ids.items() if v is not None})


def _value(gc: GenerationConfig, name: str):
    value = getattr(gc, name, None)
    return NEUTRAL.get(name) if value is None else value


def _is_set(gc: GenerationConfig, name: str) -> bool:
    value = getattr(gc, name, None)
    return value is not None and value != NEUTRAL.get(name, None) and not (isinstance(value, dict) and not value)


@dataclass
class GenerationPlan:
    """What one generation does at each step: processors, then the sampler, then the stopping criteria."""

    config: GenerationConfig
    max_length: int
    eos: list[int]
    pad: int
    processors: list = field(default_factory=list)
    warpers: list | None = None  # transformers' warpers; None: our top-k window sampler does temperature/top-k/top-p
    stopping: StoppingCriteriaList | None = None
    streamer: object = None
    generator: torch.Generator | None = None
    scores: list = field(default_factory=list)
    logits: list = field(default_factory=list)

    @property
    def do_sample(self) -> bool:
        return bool(_value(self.config, "do_sample"))

    @property
    def greedy_rule(self) -> tuple[bool, int | None] | None:
        """sampling.greedy_rule's (guard, limit) when the next token is a greedy choice that
        sampling.greedy_tokens makes for many rows at once (plain greedy, or with the chat's own guards), nothing
        is recorded and no stopping criterion reads processed scores; else None."""
        gc = self.config
        if self.do_sample or gc.output_logits or gc.output_scores:
            return None
        rule = greedy_rule(self.processors)
        return None if rule is None or (rule != (False, None) and self.stopping) else rule

    def choose(self, input_ids: torch.Tensor, logits: torch.Tensor):
        """(next tokens [b], the processed scores [b, vocab] that transformers reports and stops on)."""
        gc = self.config
        if gc.output_logits:
            self.logits.append(logits.float().clone())
        scores = logits.float()
        for proc in self.processors:
            scores = proc(input_ids, scores)
        if not self.do_sample:
            tokens = scores.argmax(dim=-1)
        elif self.warpers is not None:
            for w in self.warpers:
                scores = w(input_ids, scores)
            tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=self.generator).squeeze(1)
        else:
            t, k, p = _value(gc, "temperature"), _value(gc, "top_k"), _value(gc, "top_p")
            tokens = sample_next(input_ids, scores, True, t, k, p, generator=self.generator)
            if gc.output_scores:
                scores = warp(scores, t, k, p)  # what transformers reports: the warped scores
        if gc.output_scores:
            self.scores.append(scores.clone())
        return tokens, scores

    def stopped(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        """Rows the stopping criteria end at this step (bool [b]), or None when there are none."""
        if not self.stopping:
            return None
        done = self.stopping(input_ids, scores)
        if isinstance(done, bool):
            done = torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
        return done.to(torch.bool)


class RepetitionPenalty:
    """The CTRL penalty over every id of the sequence so far (the original's rule, padding included)."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids, scores):
        return apply_repetition_penalty(input_ids, scores, self.penalty)


def plan_generation(model, prompt_len: int, options: dict, device) -> GenerationPlan:
    """Merge the options (call > generation_config= > model.generation_config) and build the step's objects."""
    options = dict(options)
    loop = {k: options.pop(k) for k in LOOP_OPTIONS if k in options}
    base = loop.get("generation_config") or getattr(model, "generation_config", None)
    gc = copy.deepcopy(base) if base is not None else default_generation_config(model.config)
    if not options.get("do_sample", gc.do_sample):
        # greedy: the sampling flags say nothing, and transformers would warn of the model's own defaults (a
        # line in the middle of a terminal chat)
        fresh = GenerationConfig()
        for name in SAMPLING_FLAGS:
            if hasattr(fresh, name):
                options.pop(name, None)
                setattr(gc, name, getattr(fresh, name))
    unknown = gc.update(**options)
    unknown.pop("synced_gpus", None)  # one process: nothing to synchronize
    unknown.pop("use_model_defaults", None)  # the model's generation_config is always the base, as by default
    if unknown:
        raise TypeError(f"unexpected generation arguments: {', '.join(sorted(unknown))}")
    _check_supported(gc, loop)

    eos = gc.eos_token_id if gc.eos_token_id is not None else model.config.eos_token_id
    eos = [eos] if isinstance(eos, int) else [int(e) for e in eos]
    pad = gc.pad_token_id if gc.pad_token_id is not None else model.config.pad_token_id
    if gc.max_new_tokens is not None:
        max_length = prompt_len + int(gc.max_new_tokens)
    elif gc.max_length is not None:
        max_length = int(gc.max_length)
    else:
        max_length = prompt_len + 20  # a short reply when nothing says how long
    if prompt_len >= max_length:
        logger.warning("input length %d >= max_length %d: generating a single token", prompt_len, max_length)

    eos_t = torch.tensor(eos, device=device)
    procs = []  # transformers' order (GenerationMixin._get_logits_processor)
    if gc.sequence_bias:
        procs.append(lp.SequenceBiasLogitsProcessor(sequence_bias=gc.sequence_bias))
    if _is_set(gc, "repetition_penalty"):
        if gc.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {gc.repetition_penalty}")
        procs.append(RepetitionPenalty(gc.repetition_penalty))
    if _is_set(gc, "no_repeat_ngram_size"):
        procs.append(lp.NoRepeatNGramLogitsProcessor(gc.no_repeat_ngram_size))
    if gc.bad_words_ids is not None:
        procs.append(lp.NoBadWordsLogitsProcessor(gc.bad_words_ids, eos_t))
    if _is_set(gc, "min_length"):
        procs.append(lp.MinLengthLogitsProcessor(gc.min_length, eos_t, device=device))
    if _is_set(gc, "min_new_tokens"):
        procs.append(lp.MinNewTokensLengthLogitsProcessor(prompt_len, gc.min_new_tokens, eos_t, device=device))
    if loop.get("prefix_allowed_tokens_fn") is not None:
        procs.append(lp.PrefixConstrainedLogitsProcessor(loop["prefix_allowed_tokens_fn"], 1))
    if gc.forced_bos_token_id is not None:
        procs.append(lp.ForcedBOSTokenLogitsProcessor(gc.forced_bos_token_id))
    if gc.forced_eos_token_id is not None:
        procs.append(lp.ForcedEOSTokenLogitsProcessor(max_length, gc.forced_eos_token_id, device=device))
    if gc.remove_invalid_values:
        procs.append(lp.InfNanRemoveLogitsProcessor())
    if gc.exponential_decay_length_penalty is not None:
        procs.append(lp.ExponentialDecayLengthPenalty(gc.exponential_decay_length_penalty, eos_t, prompt_len))
    if gc.suppress_tokens is not None:
        procs.append(lp.SuppressTokensLogitsProcessor(gc.suppress_tokens, device=device))
    if gc.begin_suppress_tokens is not None:
        procs.append(lp.SuppressTokensAtBeginLogitsProcessor(gc.begin_suppress_tokens, prompt_len, device=device))
    procs += list(loop.get("logits_processor") or ())

    warpers = None
    if _value(gc, "do_sample"):
        t, k, p = _value(gc, "temperature"), _value(gc, "top_k"), _value(gc, "top_p")
        if t is not None and t <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {t}")
        if p is not None and not 0 <= p <= 1:  # 0 keeps the most likely token (transformers and the originals)
            raise ValueError(f"top_p must be in [0, 1], got {p}")
        extra = [n for n in OTHER_WARPERS if _is_set(gc, n)]
        if extra or gc.renormalize_logits:
            # transformers' own warpers in its order; our window sampler covers temperature / top-k / top-p only
            warpers = []
            if t != 1.0:
                warpers.append(lp.TemperatureLogitsWarper(t))
            if _is_set(gc, "top_h"):
                warpers.append(lp.TopHLogitsWarper(top_h=gc.top_h))
            if k:
                warpers.append(lp.TopKLogitsWarper(top_k=k))
            if p < 1.0:
                warpers.append(lp.TopPLogitsWarper(top_p=p))
            if _is_set(gc, "min_p"):
                warpers.append(lp.MinPLogitsWarper(min_p=gc.min_p))
            if _is_set(gc, "typical_p"):
                warpers.append(lp.TypicalLogitsWarper(mass=gc.typical_p))
            if _is_set(gc, "epsilon_cutoff"):
                warpers.append(lp.EpsilonLogitsWarper(epsilon=gc.epsilon_cutoff))
            if _is_set(gc, "eta_cutoff"):
                warpers.append(lp.EtaLogitsWarper(epsilon=gc.eta_cutoff, device=device))
            if gc.renormalize_logits:
                warpers.append(lp.LogitNormalization())
    elif gc.renormalize_logits:
        procs.append(lp.LogitNormalization())

    criteria = StoppingCriteriaList()
    if gc.max_time is not None:
        criteria.append(MaxTimeCriteria(max_time=gc.max_time))
    if gc.stop_strings:
        if loop.get("tokenizer") is None:
            raise ValueError("stop_strings needs the tokenizer: generate(..., stop_strings=..., tokenizer=tokenizer)")
        criteria.append(StopStringCriteria(stop_strings=gc.stop_strings, tokenizer=loop["tokenizer"]))
    criteria += list(loop.get("stopping_criteria") or ())
    return GenerationPlan(
        config=gc, max_length=max_length, eos=eos, pad=pad, processors=procs, warpers=warpers,
        stopping=criteria or None, streamer=loop.get("streamer"), generator=loop.get("generator"),
    )  # fmt: skip


def _check_supported(gc: GenerationConfig, loop: dict) -> None:
    if _value(gc, "num_beams") != 1:
        raise ValueError("beam search is not supported; use num_beams=1")
    for name, value in sorted(gc.to_dict().items()):
        if name.startswith("_") or name == "transformers_version" or not _is_set(gc, name) or name in HONOURED:
            continue
        if name in NO_EFFECT:
            if name not in _logged:
                _logged.add(name)
                logger.warning("generate(): %s=%r has no effect here: %s", name, value, NO_EFFECT[name])
            continue
        raise ValueError(f"generate(): {name}={value!r} is not supported by chatglm's generation")
    if _value(gc, "num_return_sequences") > 1 and not _value(gc, "do_sample"):
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy would repeat one sequence)")
    if gc.max_new_tokens is not None and gc.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {gc.max_new_tokens}")
