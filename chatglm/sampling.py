"""Choosing the next token: the original's logits guards, repetition penalty, temperature / top-k / top-p warping
(transformers' order), and a sampler that looks at a top-k window instead of sorting the whole vocabulary."""

from __future__ import annotations

import torch


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
