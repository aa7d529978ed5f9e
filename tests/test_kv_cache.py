"""The preallocated KV cache: same tokens and logits as the original's concatenated cache, growth, snapshots."""

import pytest
import torch

import chatglm
from chatglm.generation import generate_stream
from chatglm.kv_cache import KVCache, cache_length, extend

VERSIONS = ["v1", "v2", "v3"]


def _last(it):
    out = None
    for out in it:
        pass
    return out


def _run(model, kv_cache, **kw):
    """(tokens, logits of every step) of a greedy generation with the given cache kind."""
    logits = []

    class Record:
        def __call__(self, input_ids, scores):
            logits.append(scores.clone())
            return scores

    ids = _last(generate_stream(model, kv_cache=kv_cache, do_sample=False, logits_processor=[Record()], **kw))
    return ids, torch.stack(logits)


@pytest.mark.parametrize("version", VERSIONS)
def test_static_cache_equals_concatenation_batched(tiny, version):
    model, tok = tiny[version]
    enc = tok(["你好", "Hello world, how are you today? A longer prompt."], padding=True, return_tensors="pt")
    kw = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=12, eos_token_id=[-1])
    ids_s, logits_s = _run(model, "static", **kw)
    ids_c, logits_c = _run(model, "concat", **kw)
    assert ids_s.tolist() == ids_c.tolist()
    assert torch.allclose(logits_s, logits_c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_static_cache_with_prefix(tiny_dirs, version):
    path = str(tiny_dirs[version])
    model = chatglm.load_model(path, dtype=torch.float32, pre_seq_len=3, prefix_projection=True).eval()
    tok = chatglm.load_tokenizer(path)
    enc = tok(["你好"], return_tensors="pt")
    kw = dict(input_ids=enc["input_ids"], max_new_tokens=6, eos_token_id=[-1])
    ids_s, logits_s = _run(model, "static", **kw)
    ids_c, logits_c = _run(model, "concat", **kw)
    assert ids_s.tolist() == ids_c.tolist()
    assert torch.allclose(logits_s, logits_c, atol=1e-5)


def test_cache_grows_past_its_first_capacity(tiny):
    model, tok = tiny["v2"]
    ids = tok(["你好"], return_tensors="pt")["input_ids"]
    n_new = 300  # the first allocation holds prompt + 256
    seen = []
    for ids_out, past in generate_stream(model, ids, do_sample=False, max_new_tokens=n_new, eos_token_id=[-1],
                                         return_past_key_values=True):  # fmt: skip
        seen.append((past, past.capacity))
    assert isinstance(past, KVCache) and past.length == ids.shape[1] + n_new - 1
    assert past.capacity >= past.length and seen[0][1] < past.capacity  # it grew
    # The early snapshot still reads its own positions, and they match the final cache's first positions.
    k0, _ = seen[0][0][0]
    assert k0.shape[2] == ids.shape[1] and torch.equal(k0, past[0][0][:, :, : ids.shape[1]])
    ref = model.generate(ids, do_sample=False, max_new_tokens=n_new, eos_token_id=[-1], kv_cache="concat")
    assert ids_out.tolist() == ref.tolist()


def test_continuing_from_an_old_snapshot_twice_gives_the_same_reply(tiny):
    model, tok = tiny["v2"]
    history, past = [], None
    for response, history, past in model.stream_chat(tok, "你好", history=history, return_past_key_values=True,
                                                     do_sample=False, max_length=40):  # fmt: skip
        pass
    first_turn = past
    length = first_turn.length
    replies = []
    for _ in range(2):  # a retry: the same older cache continued twice
        out = model.chat(tok, "再见", history=history, past_key_values=first_turn, return_past_key_values=True,
                         do_sample=False, max_length=40)  # fmt: skip
        replies.append(out[0])
        assert out[2].length > length
    assert replies[0] == replies[1]
    assert first_turn.length == length  # the caller's cache was not extended in place


def test_tuple_cache_is_accepted_and_copied(tiny):
    model, tok = tiny["v3"]
    ids = tok.build_chat_input("你好")["input_ids"]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    past = out.past_key_values  # the original tuple format from a plain forward
    assert isinstance(past, tuple) and past[0][0].shape[2] == ids.shape[1]
    nxt = tok.build_chat_input("再见", history=None)["input_ids"][:, 2:]
    a = model.generate(nxt, past_key_values=past, do_sample=False, max_new_tokens=5, eos_token_id=[-1])
    b = model.generate(nxt, past_key_values=past, do_sample=False, max_new_tokens=5, eos_token_id=[-1],
                       kv_cache="concat")  # fmt: skip
    assert a.tolist() == b.tolist()
    assert past[0][0].shape[2] == ids.shape[1]  # untouched
    with pytest.raises(ValueError, match="kv_cache"):
        model.generate(nxt, kv_cache="bogus")


def test_kv_cache_object_unit():
    cache = KVCache.empty(num_layers=2, capacity=2)
    assert cache_length(cache) == 0 and cache_length(None) == 0
    k = torch.randn(1, 2, 3, 4)
    v = torch.randn(1, 2, 3, 4)
    cache.reserve(3)
    for i in range(2):
        kk, vv = extend(cache.layer(i), k, v)
        assert torch.equal(kk, k) and torch.equal(vv, v)
    snap = cache.advance(3)
    assert cache.length == 0 and snap.length == 3 and len(snap) == 2
    snap.reserve(1)
    k1, v1 = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    kk, _ = extend(snap.layer(0), k1, v1)
    assert torch.equal(kk, torch.cat([k, k1], dim=2))
    with pytest.raises(RuntimeError, match="capacity"):
        snap.append(1, torch.randn(1, 2, 100, 4), torch.randn(1, 2, 100, 4))
    copy = KVCache.from_past(snap, capacity=8)
    assert copy.length == 3 and torch.equal(copy[1][0], k) and copy.capacity == 8
