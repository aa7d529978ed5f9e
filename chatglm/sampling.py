"""Choosing the next token: the original's logits guards, repetition penalty, temperature / top-k / top-p warping
(transformers' order), and a sampler that looks at a top-k window instead of sorting the whole vocabulary."""

from __future__ import annotations

import threading

import torch

GUARD_TOKEN = 5  # where the original's guard puts all the mass of nan/inf scores


class InvalidScoreLogitsProcessor:
    """The original guard: on nan/inf scores, put all the mass on token 5."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(scores).all()):  # one read back to the host per step, not two
            scores.zero_()
            scores[..., GUARD_TOKEN] = 5e4
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
        if not 0 <= top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
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
    if top_p is not None and not 0 <= top_p <= 1:  # 0: the most likely token only (as transformers)
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
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


def greedy_rule(processors) -> tuple[bool, int | None] | None:
    """How a greedy row's token follows from its logits when `processors` are at most the chat's own guards, in
    their order (InvalidScoreLogitsProcessor, then SuppressUndecodableLogitsProcessor): (guard, limit) for
    `greedy_tokens`; None for any other processor."""
    procs, guard, limit = list(processors), False, None
    if procs and type(procs[0]) is InvalidScoreLogitsProcessor:
        procs.pop(0)
        guard = True
    if procs and type(procs[0]) is SuppressUndecodableLogitsProcessor:
        limit = procs.pop(0).vocab_size
    return None if procs else (guard, limit)


def greedy_tokens(scores: torch.Tensor, guard: bool = False, limit: int | None = None):
    """The greedy token of every row of scores [b, vocab] under `greedy_rule`'s (guard, limit), each row on its
    own (the guard looks at its own row), as choose() gives that row alone: (tokens [b] on the scores' device,
    the same as a list). On the CPU one kernel call for all rows (torch's isfinite and argmax over 65024 scores
    take 60-130 us a row there); elsewhere, or without the kernels, torch."""
    from kernels import cpu_fast_paths, get_cpu_kernel

    s = scores.float()
    kernel = get_cpu_kernel() if s.device.type == "cpu" and cpu_fast_paths() else None
    if kernel is not None:
        ids, finite = kernel.greedy(s if s.stride(-1) == 1 else s.contiguous(), limit)
        if guard:
            ids = [i if ok else GUARD_TOKEN for i, ok in zip(ids, finite)]
        return torch.tensor(ids), ids
    return greedy_tokens_reference(s, guard, limit)


def greedy_tokens_reference(scores: torch.Tensor, guard: bool = False, limit: int | None = None):
    """`greedy_tokens` in torch: the processors' rules row by row, then argmax."""
    if guard:
        bad = ~torch.isfinite(scores).all(dim=-1, keepdim=True)
        fixed = torch.zeros_like(scores)
        fixed[:, GUARD_TOKEN] = 5e4
        scores = torch.where(bad, fixed, scores)
    if limit is not None and limit < scores.shape[-1]:
        scores = torch.cat([scores[:, :limit], torch.full_like(scores[:, limit:], float("-inf"))], dim=-1)
    tokens = scores.argmax(dim=-1)
    return tokens, tokens.tolist()


class ForceTokens:
    """A logits processor that makes the model write `ids`, one per step (then repeats the last): scores stay finite,
    so no nan/inf guard fires. For scripted replies through the real generation (the composite demo's
    demonstration mode, tests)."""

    def __init__(self, ids):
        self.ids, self.start = list(ids), None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        k = min(input_ids.shape[1] - self.start, len(self.ids) - 1)
        scores[:] = -1e4
        scores[..., self.ids[k]] = 1e4
        return scores


class _GeneratedIds:
    """Counts positions from the first call: the ids a generation has written so far (not its prompt)."""

    start: int | None = None

    def generated(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        return input_ids[:, self.start :]


class PresenceFrequencyPenalty(_GeneratedIds):
    """OpenAI's penalties over the tokens generated so far: score[j] -= frequency * count[j] + presence * (count[j]
    > 0). The prompt is not counted (as OpenAI and vLLM do)."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0):
        self.presence, self.frequency = presence, frequency

    def __call__(self, input_ids, scores):
        gen = self.generated(input_ids)
        if gen.shape[1]:
            counts = torch.zeros_like(scores).scatter_add_(
                1, gen.to(scores.device), torch.ones_like(gen, dtype=scores.dtype)
            )
            scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        return scores


class LogitBias:
    """OpenAI's logit_bias: {token id: bias} added to the scores at every step (-100 bans, 100 forces)."""

    def __init__(self, bias: dict[int, float]):
        self.ids, self.values = torch.tensor(list(bias)), torch.tensor(list(bias.values()))

    def __call__(self, input_ids, scores):
        scores[..., self.ids.to(scores.device)] += self.values.to(scores.device, scores.dtype)
        return scores


class ForcePrefix(_GeneratedIds):
    """Make the reply start with one of `sequences` (token id lists), then leave it free: at each step only the
    tokens that continue a sequence matching what was written so far stay possible (tool_choice "required" or a
    named tool: ChatGLM3's tool name line)."""

    def __init__(self, sequences):
        self.sequences = [list(s) for s in sequences if s]

    def __call__(self, input_ids, scores):
        gen = self.generated(input_ids)[0].tolist()
        n = len(gen)
        allowed = {s[n] for s in self.sequences if len(s) > n and s[:n] == gen}
        if allowed and not any(s == gen for s in self.sequences):
            # far below every allowed score but finite: -inf would trip the original's nan/inf guard
            keep = torch.full_like(scores, min(float(scores.min()), 0.0) - 1e4)
            ids = torch.tensor(sorted(allowed), device=scores.device)
            keep[..., ids] = scores[..., ids]
            return keep
        return scores


class LogprobRecorder(_GeneratedIds):
    """Records the model's log-probabilities (log-softmax of the raw logits: put it first in the processor list) of
    each generated token and of the `top` most likely ones at its step. A token's entry is settled at the next
    step (when its id is known) or by `finish(ids)` once generation is over; only the last step's
    full row is kept. Safe to read from another thread than the one generating."""

    def __init__(self, top: int = 0, vocab: int | None = None):
        self.top, self.vocab, self.done, self.last = top, vocab, [], None  # vocab: top ids only below it
        self._lock = threading.Lock()

    def _settle(self, token: int):
        row, tops = self.last
        self.done.append((token, float(row[token]), tops))
        self.last = None

    def __call__(self, input_ids, scores):
        gen = self.generated(input_ids)
        row = scores[0].float().log_softmax(-1)
        tops = []
        if self.top:
            values, ids = row[: self.vocab].topk(self.top)
            tops = list(zip(ids.tolist(), values.tolist()))
        with self._lock:
            if self.last is not None:
                self._settle(int(gen[0, -1]))
            self.last = (row, tops)
        return scores

    def entries(self, n: int) -> list:
        """[(token, logprob, [(token, logprob)] * top)] of the first n generated tokens, as far as settled."""
        with self._lock:
            return self.done[:n]

    def finish(self, ids: list[int]) -> list:
        """Every generated token's entry, the last one settled from `ids` (call once nothing generates any more)."""
        with self._lock:
            if self.last is not None and len(ids) > len(self.done):
                self._settle(ids[len(self.done)])
            return self.done[: len(ids)]
