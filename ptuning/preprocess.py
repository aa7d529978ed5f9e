"""Reading JSON-lines data and turning rows into token ids, with each generation's prompt format.

- v1 (ChatGLM-6B): `prompt [gMASK] <sop> answer <eop>`; with history the "[Round i]\\n问：..\\n答：.." rounds.
- v2 (ChatGLM2-6B): `[gMASK] sop prompt answer </s>`; rounds "[Round i]\\n\\n问：..\\n\\n答：..".
- v3 (ChatGLM3-6B): `[gMASK] sop <|user|>\\n query <|assistant|> \\n answer </s>`, history as user/assistant turns.

Labels are -100 over the prompt (v1 keeps <sop>, as the original) and padding, so the loss is on the answer.
"""

from __future__ import annotations

import json

import torch


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


def read_rows(path: str, prompt_column: str, response_column: str, history_column: str | None = None) -> list[dict]:
    """Every row of a JSON-lines file as {query, response, history, line}; bad lines raise DataError."""
    if not prompt_column or not response_column:
        raise DataError("--prompt_column and --response_column are required (e.g. content / summary)")
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read data file {path!r}: {e.strerror}") from e
    with f:
        for n, line in enumerate(f, 1):
            where = f"{path}, line {n}"
            if not line.strip():
                raise DataError(f"{where}: empty line (one JSON object per line, no blank lines)")
            try:
                obj = json.loads(line.rstrip("\r\n"))  # (a line cut short: the column at its end, not on a next line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            columns = [c for c in (prompt_column, response_column, history_column) if c]
            missing = [c for c in columns if c not in obj]
            if missing:
                raise DataError(f"{where}: missing column(s) {', '.join(missing)} (has: {', '.join(obj) or 'none'})")
            for c in (prompt_column, response_column):
                if not isinstance(obj[c], str):
                    raise DataError(f"{where}: column {c!r} must be a string, got {type(obj[c]).__name__}")
            history = obj[history_column] if history_column else None
            history = history or []
            if not isinstance(history, list) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in history
            ):
                raise DataError(f"{where}: column {history_column!r} must be a list of [query, response] pairs")
            rows.append({"query": obj[prompt_column], "response": obj[response_column], "history": history, "line": n})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def special_ids(tok, version: str) -> dict:
    if version == "v1":
        return {"head": [], "tail": [tok.gmask_token_id, tok.bos_token_id], "eos": tok.eos_token_id}
    tail = [tok.get_command("<|assistant|>")] if version == "v3" else []
    return {"head": tok.get_prefix_tokens(), "tail": tail, "eos": tok.get_command("<eos>")}


def prompt_ids(tok, version: str, query: str, history: list, prefix: str, max_length: int) -> list[int]:
    """The prompt with its special tokens, ready to generate from; the text is cut to fit max_length."""
    sp = special_ids(tok, version)
    if version == "v3":
        body = []
        for q, a in history:
            body += tok.build_single_message("user", "", q) + tok.build_single_message("assistant", "", a)
        body += tok.build_single_message("user", "", prefix + query)
    else:
        body = tok.encode(prefix + tok.build_prompt(query, history), add_special_tokens=False)
    body = body[: max(max_length - len(sp["head"]) - len(sp["tail"]), 0)]
    return sp["head"] + body + sp["tail"]


def answer_ids(tok, version: str, response: str) -> list[int]:
    if version == "v3":  # the assistant turn starts with its (empty) metadata line
        return tok.sp.encode("\n") + tok.sp.encode(response)
    return tok.encode(response, add_special_tokens=False)


def train_features(tok, version: str, row: dict, max_source_length: int, max_target_length: int, prefix="") -> dict:
    """input_ids = prompt + answer + eos; labels = -100 over the prompt."""
    sp = special_ids(tok, version)
    a = prompt_ids(tok, version, row["query"], row["history"], prefix, max_source_length)
    b = answer_ids(tok, version, row["response"])[: max(max_target_length - 1, 1)]
    input_ids = a + b + [sp["eos"]]
    # v1 learns <sop> from [gMASK] as the original did (its labels start at the <sop> position).
    context = len(a) - 1 if version == "v1" else len(a)
    labels = [-100] * context + input_ids[context:]
    return {"input_ids": input_ids, "labels": labels}


def eval_features(tok, version: str, row: dict, max_source_length: int, max_target_length: int, prefix="") -> dict:
    """input_ids = the prompt to generate from; labels = the reference answer ids."""
    return {
        "input_ids": prompt_ids(tok, version, row["query"], row["history"], prefix, max_source_length),
        "labels": tok.encode(row["response"], add_special_tokens=False)[:max_target_length],
        "generate": True,
    }


class Collator:
    """Pads a batch: training rows on the right (labels -100) to `train_length` as the original does (at least),
    prompts for generation on the left to the longest."""

    def __init__(self, pad_token_id: int, train_length: int = 0):
        self.pad, self.train_length = pad_token_id, train_length

    def __call__(self, features: list[dict]) -> dict:
        left = bool(features[0].get("generate"))
        n = max(len(f["input_ids"]) for f in features)
        n = n if left else max(n, self.train_length)
        m = max(len(f["labels"]) for f in features)
        ids, mask, labels = [], [], []
        for f in features:
            k = n - len(f["input_ids"])
            if left:
                ids.append([self.pad] * k + f["input_ids"])
                mask.append([0] * k + [1] * len(f["input_ids"]))
                labels.append(f["labels"] + [-100] * (m - len(f["labels"])))
            else:  # right padding sits after every real token: a causal model needs no mask for it
                ids.append(f["input_ids"] + [self.pad] * k)
                labels.append(f["labels"] + [-100] * k)
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if left:
            batch["attention_mask"] = torch.tensor(mask)
        return batch
