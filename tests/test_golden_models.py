"""Our models give THUDM's original logits on tiny checkpoints saved by the original code.

tests/data/golden/{v1,v2,v2_prefix}: config.json and model.safetensors written by the original
modeling_chatglm.py (random weights), with the logits and greedy tokens it produced.
"""

import json

import pytest
import torch

from chatglm import load_model

from .conftest import GOLDEN

CASES = ["v1", "v2", "v2_prefix"]


def _load(case):
    gold = json.loads((GOLDEN / case / "logits.json").read_text())
    return load_model(str(GOLDEN / case), dtype=torch.float32), gold


@pytest.mark.parametrize("case", CASES)
def test_logits_match_original(case):
    model, gold = _load(case)
    with torch.no_grad():
        logits = model(torch.tensor([gold["input_ids"]])).logits[0]
    assert (logits - torch.tensor(gold["logits"])).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_original(case):
    model, gold = _load(case)
    prompt = gold.get("generate_input_ids", gold["input_ids"])
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20)
    assert out[0, len(prompt) :].tolist() == gold["greedy_20"]


def test_v1_cached_step_logits_match_original():
    # Every decode step through the KV cache, against the original's scores at that step.
    model, gold = _load("v1")
    ids = torch.tensor([gold["generate_input_ids"]])
    state = model._init_generation(ids)
    with torch.no_grad():
        for step, expected in enumerate(gold["greedy_scores"]):
            out = model(**{k: state[k] for k in ("input_ids", "attention_mask", "position_ids", "past_key_values")})
            logits = out.logits[0, -1]
            assert (logits - torch.tensor(expected)).abs().max().item() < 1e-4, step
            nxt = logits.argmax().view(1)
            state = model._next_generation_inputs(state, nxt, out.past_key_values)


def test_v1_position_ids_and_mask_match_original():
    from chatglm.modeling_glm import glm_mask, glm_position_ids

    model, gold = _load("v1")
    ids = torch.tensor([gold["input_ids"]])
    assert glm_position_ids(ids, model.config)[0].tolist() == gold["position_ids"]
    allowed = glm_mask(ids, model.config, None, 0, ids.device)[0, 0]
    assert (~allowed).int().tolist() == gold["attention_mask_true_is_masked"]


def test_prefix_changes_the_logits():
    base, gold = _load("v2")
    pre, gold_pre = _load("v2_prefix")
    assert gold["input_ids"] == gold_pre["input_ids"]
    with torch.no_grad():
        a = base(torch.tensor([gold["input_ids"]])).logits
        b = pre(torch.tensor([gold["input_ids"]])).logits
    assert (a - b).abs().max() > 1e-2
    assert pre.transformer.prefix_encoder.embedding.weight.requires_grad
    assert not pre.transformer.encoder.layers[0].self_attention.query_key_value.weight.requires_grad
