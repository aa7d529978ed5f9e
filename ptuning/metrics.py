"""The original's evaluation metrics, per sample then averaged, x100.

ROUGE-1/2/L: F-scores of rouge_chinese on jieba-segmented, space-joined text.
BLEU-4: nltk sentence_bleu on characters, smoothing method3.
"""

from __future__ import annotations

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def sample_scores(pred: str, label: str) -> dict[str, float]:
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis = " ".join(jieba.cut(pred))
    reference = " ".join(jieba.cut(label))
    if hypothesis.strip() and reference.strip():
        rouge = Rouge().get_scores(hypothesis, reference)[0]
        out = {k: round(rouge[k]["f"] * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")}
    else:  # rouge_chinese raises on empty text (an empty generation is a real outcome of a weak model)
        out = {k: 0.0 for k in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3) if pred else 0.0
    out["bleu-4"] = round(bleu * 100, 4)
    return out


def compute_metrics(preds: list[str], labels: list[str]) -> dict[str, float]:
    """Mean of the per-sample scores (keys rouge-1, rouge-2, rouge-l, bleu-4)."""
    import jieba

    jieba.setLogLevel(60)  # silence its "Building prefix dict" chatter
    scores = [sample_scores(p, lab) for p, lab in zip(preds, labels)]
    return {k: float(sum(s[k] for s in scores) / max(len(scores), 1)) for k in KEYS}
