"""Scripts written for transformers run unchanged: generate's options, streamers, stopping criteria,
generation_config, and ChatGLM3's basic-demo pattern, on the tiny checkpoints (float and INT4)."""

import json
import logging
import shutil
import threading
import time

import pytest
import torch
from transformers import (
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

import chatglm
from chatglm.generation import SuppressUndecodableLogitsProcessor

VERSIONS = ["v1", "v2", "v3"]


@pytest.fixture(scope="module")
def int4(tiny_dirs):
    return {v: chatglm.load_model(str(d), dtype=torch.float32).quantize(4) for v, d in tiny_dirs.items()}


def _prompt(tok, version, text="你好"):
    if version == "v3":
        return tok.build_chat_input(text)["input_ids"]
    return tok([tok.build_prompt(text)], return_tensors="pt")["input_ids"]


def _greedy(model, ids, n=8, **kw):
    """n new greedy tokens, never stopping early (no eos), as a plain transformers call."""
    kw.setdefault("eos_token_id", [-1])
    return model.generate(ids, do_sample=False, max_new_tokens=n, **kw)


def _readable(tok):
    return [SuppressUndecodableLogitsProcessor(tok.vocab_size)]  # a random model may pick padded-vocabulary ids


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int4"])
@pytest.mark.parametrize("version", VERSIONS)
def test_streamed_text_equals_returned_text(tiny, int4, version, quantized):
    _, tok = tiny[version]
    model = int4[version] if quantized else tiny[version][0]
    ids = _prompt(tok, version)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    kwargs = dict(input_ids=ids, streamer=streamer, max_new_tokens=16, do_sample=False,
                  logits_processor=_readable(tok))  # fmt: skip
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    streamed = list(streamer)
    thread.join()
    out = model.generate(ids, max_new_tokens=16, do_sample=False, logits_processor=_readable(tok))
    assert "".join(streamed) == tok.decode(out[0, ids.shape[1] :])
    assert len(streamed) >= 1


def test_text_streamer_prints_the_reply(tiny, capsys):
    model, tok = tiny["v2"]
    ids = _prompt(tok, "v2")
    out = model.generate(ids, streamer=TextStreamer(tok, skip_prompt=True), max_new_tokens=10, do_sample=False,
                         logits_processor=_readable(tok))  # fmt: skip
    assert capsys.readouterr().out == tok.decode(out[0, ids.shape[1] :]) + "\n"


def test_streamer_ends_when_generation_fails(tiny):
    model, tok = tiny["v2"]
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=30)  # a reader left waiting raises queue.Empty
    errors = []

    def boom(ids, scores):
        raise RuntimeError("a broken processor")

    def run():
        try:
            model.generate(_prompt(tok, "v2"), streamer=streamer, logits_processor=[boom])
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    start = time.monotonic()
    thread.start()
    assert "".join(streamer) == ""  # released at once, with nothing streamed
    thread.join()
    assert time.monotonic() - start < 20 and len(errors) == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_stopping_criteria_stop_at_n(tiny, version):
    model, tok = tiny[version]
    ids = _prompt(tok, version)

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids.shape[1] >= ids.shape[1] + 3  # a plain bool, as older criteria return

    out = _greedy(model, ids, n=20, stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert out.shape[1] == ids.shape[1] + 3
    assert torch.equal(out, _greedy(model, ids, n=3))


def test_generation_config_argument_and_checkpoint_file(tiny, tiny_dirs, tmp_path):
    model, tok = tiny["v2"]
    ids = _prompt(tok, "v2")
    out = model.generate(ids, generation_config=GenerationConfig(max_new_tokens=7, eos_token_id=-1))
    assert out.shape[1] == ids.shape[1] + 7
    out = model.generate(ids, generation_config=GenerationConfig(max_new_tokens=7, eos_token_id=-1), max_new_tokens=2)
    assert out.shape[1] == ids.shape[1] + 2  # the call's own options win, as in transformers

    d = tmp_path / "v2"
    shutil.copytree(tiny_dirs["v2"], d)
    (d / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5, "eos_token_id": [-1]}))
    loaded = chatglm.load_model(str(d), dtype=torch.float32)
    assert loaded.generation_config.max_new_tokens == 5
    assert loaded.generate(ids).shape[1] == ids.shape[1] + 5
    loaded.generation_config.max_new_tokens = 3  # what scripts do to change the defaults
    assert loaded.generate(ids).shape[1] == ids.shape[1] + 3

    (d / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json"):
        chatglm.load_model(str(d), dtype=torch.float32)


def test_save_pretrained_writes_generation_config(tiny, tmp_path):
    model, tok = tiny["v3"]
    saved = model.generation_config
    model.generation_config = GenerationConfig(do_sample=True, top_p=0.8, eos_token_id=2, pad_token_id=0)
    try:
        model.save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
    finally:
        model.generation_config = saved
    assert json.loads((tmp_path / "generation_config.json").read_text())["top_p"] == 0.8
    reloaded = chatglm.load_tokenizer(str(tmp_path))
    assert reloaded.chat_template == tok.chat_template
    assert chatglm.load_model(str(tmp_path), dtype=torch.float32).generation_config.top_p == 0.8


@pytest.mark.parametrize("version", VERSIONS)
def test_min_new_tokens_and_min_length(tiny, version):
    model, tok = tiny[version]
    ids = _prompt(tok, version)
    first = _greedy(model, ids, n=1)[0, -1].item()
    assert _greedy(model, ids, n=10, eos_token_id=first).shape[1] == ids.shape[1] + 1  # stops at once...
    out = _greedy(model, ids, n=10, eos_token_id=first, min_new_tokens=6)
    assert out.shape[1] >= ids.shape[1] + 6  # ...unless it must say at least 6 tokens
    assert first not in out[0, ids.shape[1] : ids.shape[1] + 5].tolist()
    out = _greedy(model, ids, n=10, eos_token_id=first, min_length=ids.shape[1] + 4)
    assert out.shape[1] >= ids.shape[1] + 4


@pytest.mark.parametrize("version", VERSIONS)
def test_banned_ids_never_produced(tiny, version):
    model, tok = tiny[version]
    ids = _prompt(tok, version)
    plain = _greedy(model, ids, n=12)[0, ids.shape[1] :].tolist()
    banned = max(set(plain), key=plain.count)
    for kw in (dict(bad_words_ids=[[banned]]), dict(suppress_tokens=[banned])):
        assert banned not in _greedy(model, ids, n=12, **kw)[0, ids.shape[1] :].tolist()
    out = _greedy(model, ids, n=12, no_repeat_ngram_size=1)[0].tolist()
    assert len(set(out[ids.shape[1] :])) == 12 and not set(out[ids.shape[1] :]) & set(out[: ids.shape[1]])


def test_eos_list_and_stop_strings(tiny):
    model, tok = tiny["v3"]
    ids = _prompt(tok, "v3")
    plain = _greedy(model, ids, n=12)[0, ids.shape[1] :].tolist()
    third = plain[2]
    stop_at = plain.index(third) + 1
    out = _greedy(model, ids, n=12, eos_token_id=[12345, third])
    assert out.shape[1] == ids.shape[1] + stop_at and out[0, -1].item() == third
    # stop_strings (needs the tokenizer, as in transformers): a piece of the greedy reply's text stops it early
    text = tok.decode(plain)
    pieces = [tok.decode(plain[: i + 1]) for i in range(len(plain))]
    target = next((p for p in pieces[2:] if p and p[-1] not in "\ufffd " and p[-1] not in pieces[1]), None)
    assert text and target is not None, "the tiny model's greedy reply has no character to stop on"
    out = _greedy(model, ids, n=12, stop_strings=[target[-1]], tokenizer=tok)
    assert target[-1] in tok.decode(out[0, ids.shape[1] :]) and out.shape[1] < ids.shape[1] + 12
    with pytest.raises(ValueError, match="tokenizer"):
        _greedy(model, ids, stop_strings=["x"])


def test_max_time_stops_generation(tiny):
    model, tok = tiny["v2"]
    ids = _prompt(tok, "v2")
    assert _greedy(model, ids, n=50, max_time=0.0).shape[1] == ids.shape[1] + 1


@pytest.mark.parametrize("version", VERSIONS)
def test_scores_and_logits_returned(tiny, version):
    model, tok = tiny[version]
    ids = _prompt(tok, version)
    out = _greedy(model, ids, n=5, return_dict_in_generate=True, output_scores=True, output_logits=True,
                  repetition_penalty=1.3)  # fmt: skip
    vocab = model.config.padded_vocab_size if version != "v1" else model.config.vocab_size
    assert out.sequences.shape == (1, ids.shape[1] + 5)
    assert len(out.scores) == len(out.logits) == 5
    for i, (score, logit) in enumerate(zip(out.scores, out.logits)):
        assert score.shape == logit.shape == (1, vocab)
        assert score.argmax(-1).item() == out.sequences[0, ids.shape[1] + i].item()
        assert not torch.equal(score, logit)  # scores are processed (the penalty), logits are raw
    plain = _greedy(model, ids, n=5, return_dict_in_generate=True, output_scores=True)
    assert plain.logits is None and torch.equal(plain.scores[0], _greedy(model, ids, n=1, output_logits=True,
                                                                        return_dict_in_generate=True).logits[0])  # fmt: skip
    sampled = model.generate(ids, do_sample=True, top_k=5, max_new_tokens=3, eos_token_id=[-1],
                             return_dict_in_generate=True, output_scores=True)  # fmt: skip
    assert all(int(torch.isfinite(s).sum()) <= 5 for s in sampled.scores)  # the warped scores, as transformers


def test_num_return_sequences_with_sampling(tiny):
    model, tok = tiny["v2"]
    batch = tok(["你好", "晚上睡不着应该怎么办"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, temperature=2.0, top_k=0, num_return_sequences=3,
                         max_new_tokens=6, eos_token_id=[-1])  # fmt: skip
    n = batch["input_ids"].shape[1]
    assert out.shape == (6, n + 6)
    assert torch.equal(out[:3, :n], batch["input_ids"][[0, 0, 0]]) and torch.equal(
        out[3:, :n], batch["input_ids"][[1, 1, 1]]
    )
    assert len({tuple(r) for r in out[:3, n:].tolist()}) > 1  # three draws, not one repeated
    with pytest.raises(ValueError, match="do_sample"):
        model.generate(**batch, num_return_sequences=2, max_new_tokens=2)


def test_transformers_warpers_when_ours_do_not_cover_them(tiny):
    model, tok = tiny["v2"]
    ids = _prompt(tok, "v2")
    greedy = _greedy(model, ids, n=6)
    # min_p=1.0 keeps only the most likely token: sampling must equal greedy
    assert torch.equal(model.generate(ids, do_sample=True, min_p=1.0, max_new_tokens=6, eos_token_id=[-1]), greedy)
    torch.manual_seed(0)
    out = model.generate(ids, do_sample=True, typical_p=0.5, renormalize_logits=True, max_new_tokens=6,
                         eos_token_id=[-1], return_dict_in_generate=True, output_scores=True)  # fmt: skip
    assert all(torch.allclose(s.exp().sum(-1), torch.ones(1)) for s in out.scores)  # renormalized log-probs


def test_options_that_cannot_be_honoured_fail_by_name(tiny, caplog):
    model, tok = tiny["v2"]
    ids = _prompt(tok, "v2")
    for option in (dict(penalty_alpha=0.6, top_k=4), dict(guidance_scale=1.5), dict(output_attentions=True),
                   dict(num_beams=2)):  # fmt: skip
        name = next(iter(option)) if "num_beams" not in option else "beam"
        with pytest.raises(ValueError, match=name):
            model.generate(ids, max_new_tokens=2, **option)
    with pytest.raises(TypeError, match="assistant_model"):
        model.generate(ids, max_new_tokens=2, assistant_model=model)
    with caplog.at_level(logging.WARNING, logger="chatglm.generation_config"):
        out = model.generate(ids, max_new_tokens=2, eos_token_id=[-1], length_penalty=2.0)
    assert out.shape[1] == ids.shape[1] + 2 and "length_penalty" in caplog.text


@pytest.mark.parametrize("decode", ["static", "compile"])
def test_options_work_in_every_decode_mode(tiny, decode):
    model, tok = tiny["v3"]
    ids = _prompt(tok, "v3")
    plain = _greedy(model, ids, n=10)[0, ids.shape[1] :].tolist()
    kw = dict(bad_words_ids=[[plain[1]]], min_new_tokens=4, logits_processor=_readable(tok))
    eager = _greedy(model, ids, n=10, **kw)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=120)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=_greedy(model, ids, n=10, decode=decode,
                                                                       streamer=streamer, **kw)))  # fmt: skip
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert torch.equal(result["out"], eager)
    assert text == tok.decode(eager[0, ids.shape[1] :])


def test_chatglm3_basic_demo_pattern_runs_unchanged(tiny):
    """The shape of ChatGLM3's basic_demo/web_demo_gradio.py predict(), line for line where it matters."""
    model, tokenizer = tiny["v3"]

    class StopOnTokens(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> bool:
            stop_ids = [tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>"), 2]
            for stop_id in stop_ids:
                if input_ids[0][-1] == stop_id:
                    return True
            return False

    history = [["你好", "你好，有什么可以帮你？"], ["讲个笑话", None]]
    messages = []
    for idx, (user_msg, model_msg) in enumerate(history):
        if idx == len(history) - 1 and not model_msg:
            messages.append({"role": "user", "content": user_msg})
            break
        if user_msg:
            messages.append({"role": "user", "content": user_msg})
        if model_msg:
            messages.append({"role": "assistant", "content": model_msg})
    model_inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_tensors="pt").to(next(model.parameters()).device)  # fmt: skip
    streamer = TextIteratorStreamer(tokenizer, timeout=60, skip_prompt=True, skip_special_tokens=True)
    generate_kwargs = {
        "input_ids": model_inputs,
        "streamer": streamer,
        "max_new_tokens": 24,
        "do_sample": True,
        "top_p": 0.8,
        "temperature": 0.6,
        "stopping_criteria": StoppingCriteriaList([StopOnTokens()]),
        "repetition_penalty": 1.2,
        "logits_processor": _readable(tokenizer),
    }
    torch.manual_seed(0)
    t = threading.Thread(target=model.generate, kwargs=generate_kwargs)
    t.start()
    reply = ""
    for new_token in streamer:
        if new_token != "":
            reply += new_token
    t.join()
    expected = tokenizer.build_chat_input("讲个笑话", history=[{"role": "user", "content": "你好"},
                                                            {"role": "assistant", "content": "你好，有什么可以帮你？"}])  # fmt: skip
    assert torch.equal(model_inputs["input_ids"], expected["input_ids"])
    torch.manual_seed(0)
    generate_kwargs.pop("streamer")
    out = model.generate(**generate_kwargs)
    assert reply == tokenizer.decode(out[0, expected["input_ids"].shape[1] :], skip_special_tokens=True)


def test_stream_generate_and_return_past_key_values_keep_the_original_api(tiny):
    model, tok = tiny["v2"]
    ids = _prompt(tok, "v2")
    final = _greedy(model, ids, n=4)
    steps = list(model.stream_generate(ids, do_sample=False, max_new_tokens=4, eos_token_id=[-1],
                                       return_past_key_values=True))  # fmt: skip
    assert len(steps) == 4 and torch.equal(steps[-1][0], final)
    assert steps[-1][1].length == final.shape[1] - 1  # the cache holds every position but the last token
    assert torch.equal(_greedy(model, ids, n=4, return_past_key_values=True), final)  # generate returns the ids
