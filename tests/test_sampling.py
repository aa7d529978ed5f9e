"""The windowed sampler gives exactly the distribution of the full-vocabulary warpers."""

import pytest
import torch

from chatglm.generation import NUCLEUS_CANDIDATES, candidate_probs, sample_next, warp


def _dense(window, vocab):
    probs, ids = window
    return torch.zeros(probs.shape[0], vocab, dtype=probs.dtype).scatter(1, ids, probs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 50, 0.8), (0.95, 0, 0.7), (1.0, 0, 1.0),
                                                       (0.6, 5, 1.0), (1.3, 0, 0.99), (0.8, 200, 0.5)])  # fmt: skip
def test_window_equals_warp(seed, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(seed)
    vocab = 3000
    scores = torch.randn(3, vocab, generator=g) * 4
    scores[0, :10] += 12  # a peaked row: the nucleus is a handful of tokens
    scores[:, -7:] = float("-inf")  # suppressed rows of the padded vocabulary
    window = candidate_probs(scores, temperature, top_k, top_p)
    expected = warp(scores, temperature, top_k, top_p).softmax(dim=-1)
    if window is None:  # only allowed when the nucleus is wider than the window
        assert top_k == 0 and top_p < 1
        assert (expected > 0).sum(-1).max() > NUCLEUS_CANDIDATES
        return
    assert torch.allclose(_dense(window, vocab), expected, atol=1e-6)


def test_ties_at_the_kth_score_fall_back_to_warp():
    scores = torch.tensor([[5.0, 4.0, 3.0, 3.0, 1.0]])
    assert candidate_probs(scores, 1.0, 3, 1.0) is None  # warp keeps both tokens tied at the 3rd score
    assert torch.isfinite(warp(scores, top_k=3)).sum() == 4


def test_sample_next_follows_the_distribution():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    draws = torch.stack([sample_next(ids, scores, top_k=0, top_p=0.8, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    # top_p 0.8 keeps the tokens whose more likely mass is < 0.8: 0.5, 0.3 (before = 0, 0.5), not 0.15 (0.8)
    assert freq[2:].sum() == 0
    assert abs(freq[0].item() - 0.5 / 0.8) < 0.03 and abs(freq[1].item() - 0.3 / 0.8) < 0.03


def test_invalid_sampling_parameters():
    scores = torch.randn(1, 10)
    with pytest.raises(ValueError, match="temperature"):
        candidate_probs(scores, 0.0, 0, 0.8)
    with pytest.raises(ValueError, match="top_p"):
        candidate_probs(scores, 1.0, 0, 1.5)
    with pytest.raises(ValueError, match="top_p"):
        warp(scores, 1.0, 0, -0.1)


def test_top_p_zero_keeps_the_most_likely_token():
    """top_p 0 (the web demos' slider goes down to it, as the originals'; transformers takes it): only the most
    likely token is left, by the window and by the full sort alike."""
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    kept = torch.isfinite(warp(scores, 0.8, 0, 0.0))
    assert kept.sum(-1).tolist() == [1, 1, 1] and kept.float().argmax(-1).tolist() == scores.argmax(-1).tolist()
    probs, ids = candidate_probs(scores, 0.8, 0, 0.0)
    assert (probs > 0).sum(-1).tolist() == [1, 1, 1]
    assert ids.gather(1, probs.argmax(-1, keepdim=True))[:, 0].tolist() == scores.argmax(-1).tolist()


def _processed_alone(row, procs):
    """A row's greedy token as GenerationPlan.choose gives it alone: the processors, then argmax."""
    scores = row.float().clone()
    for p in procs:
        scores = p(None, scores)
    return int(scores.argmax(dim=-1))


@pytest.mark.parametrize("kernels_on", [True, False])
def test_greedy_tokens_are_each_rows_choice_alone_under_the_chat_guards(kernels_on):
    """greedy_tokens (the CPU kernel, or torch) gives every row the token the chat's processors and argmax give that
    row alone: a row with a NaN or an infinity is guarded on its own (token 5), the others are not; ids past the
    tokenizer's vocabulary are never chosen; bf16 scores alike."""
    from chatglm.sampling import (
        InvalidScoreLogitsProcessor,
        SuppressUndecodableLogitsProcessor,
        greedy_rule,
        greedy_tokens,
    )
    from kernels.settings import settings

    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 640, generator=g)
    s[1, 7] = float("nan")
    s[2, 600] = float("inf")
    s[3, 630] = 50.0  # the maximum past the vocabulary: suppressed
    s[4, 5] = float("-inf")
    cases = [
        [],
        [InvalidScoreLogitsProcessor()],
        [SuppressUndecodableLogitsProcessor(605)],
        [InvalidScoreLogitsProcessor(), SuppressUndecodableLogitsProcessor(605)],
    ]
    with settings.override(cpu_kernels=kernels_on):
        for procs in cases:
            rule = greedy_rule(procs)
            for scores in (s, s.bfloat16()):
                tokens, ids = greedy_tokens(scores, *rule)
                want = [_processed_alone(r[None], procs) for r in scores]
                assert ids == want == tokens.tolist(), (procs, scores.dtype)
    assert ids[1] == ids[2] == ids[4] == 5 and ids[3] != 630


def test_greedy_rule_takes_only_the_chat_guards_in_their_order():
    from chatglm.generation_config import RepetitionPenalty
    from chatglm.sampling import InvalidScoreLogitsProcessor, SuppressUndecodableLogitsProcessor, greedy_rule

    guard, suppress = InvalidScoreLogitsProcessor(), SuppressUndecodableLogitsProcessor(100)
    assert greedy_rule([]) == (False, None)
    assert greedy_rule([guard, suppress]) == (True, 100)
    assert greedy_rule([suppress, guard]) is None  # the guard after -inf would always fire: choose() alone
    assert greedy_rule([guard, RepetitionPenalty(1.2)]) is None
