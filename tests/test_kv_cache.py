"""The one KV cache: the same tokens and logits as the original's tuple cache at the API, growth, snapshots,
and rows written at their own positions."""

import pytest
import torch

import chatglm
from chatglm.generation import FORWARD_KEYS, generate_stream
from chatglm.kv_cache import KVCache, cache_length

VERSIONS = ["v1", "v2", "v3"]


def _last(it):
    out = None
    for out in it:
        pass
    return out


def _run(model, **kw):
    """(tokens, logits of every step) of a greedy generation on the preallocated cache."""
    logits = []

    class Record:
        def __call__(self, input_ids, scores):
            logits.append(scores.clone())
            return scores

    ids = _last(generate_stream(model, do_sample=False, logits_processor=[Record()], **kw))
    return ids, torch.stack(logits)


@torch.no_grad()
def _tuple_run(model, input_ids, max_new_tokens, attention_mask=None):
    """(tokens, logits) of greedy decoding through the original API: `model(...)` with the tuple
    `past_key_values` it returns handed back at every step (copied in each time, as the original concatenates)."""
    state = model._init_generation(input_ids, attention_mask, None, None)
    ids, logits = input_ids, []
    for _ in range(max_new_tokens):
        out = model(**{k: state[k] for k in FORWARD_KEYS}, use_cache=True)
        assert isinstance(out.past_key_values, tuple)
        logits.append(out.logits[:, -1].float())
        nxt = logits[-1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        state = model._next_generation_inputs(state, nxt, out.past_key_values)
    return ids, torch.stack(logits)


@pytest.mark.parametrize("version", VERSIONS)
def test_cache_equals_the_original_tuple_api_batched(tiny, version):
    model, tok = tiny[version]
    enc = tok(["你好", "Hello world, how are you today? A longer prompt."], padding=True, return_tensors="pt")
    ids_s, logits_s = _run(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           max_new_tokens=12, eos_token_id=[-1])  # fmt: skip
    ids_t, logits_t = _tuple_run(model, enc["input_ids"], 12, enc["attention_mask"])
    assert ids_s.tolist() == ids_t.tolist()
    assert torch.allclose(logits_s, logits_t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cache_with_prefix(tiny_dirs, version):
    path = str(tiny_dirs[version])
    model = chatglm.load_model(path, dtype=torch.float32, pre_seq_len=3, prefix_projection=True).eval()
    tok = chatglm.load_tokenizer(path)
    enc = tok(["你好"], return_tensors="pt")
    ids_s, logits_s = _run(model, input_ids=enc["input_ids"], max_new_tokens=6, eos_token_id=[-1])
    ids_t, logits_t = _tuple_run(model, enc["input_ids"], 6)
    assert ids_s.tolist() == ids_t.tolist()
    assert torch.allclose(logits_s, logits_t, atol=1e-5)
    with torch.no_grad():
        past = model(enc["input_ids"], use_cache=True).past_key_values
    assert cache_length(past) == 3 + enc["input_ids"].shape[1]  # the prefix first, as the original's tuple


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
    ref, _ = _tuple_run(model, ids, n_new)
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
    kept = past[0][0].clone()
    nxt = tok.build_chat_input("再见", history=None)["input_ids"][:, 2:]
    a = model.generate(nxt, past_key_values=past, do_sample=False, max_new_tokens=5, eos_token_id=[-1])
    whole = model.generate(torch.cat([ids, nxt], dim=1), do_sample=False, max_new_tokens=5, eos_token_id=[-1])
    assert a.tolist() == whole[:, ids.shape[1] :].tolist()  # the cached prompt is the prompt recomputed
    assert past[0][0].shape[2] == ids.shape[1] and torch.equal(past[0][0], kept)  # untouched


def test_kv_cache_object_unit():
    cache = KVCache.empty(num_layers=2, capacity=2)
    assert cache_length(cache) == 0 and cache_length(None) == 0
    k = torch.randn(1, 2, 3, 4)
    v = torch.randn(1, 2, 3, 4)
    cache.reserve(3)
    for i in range(2):
        kk, vv = cache.append(i, k, v)
        assert torch.equal(kk, k) and torch.equal(vv, v)
    snap = cache.advance(3)
    assert cache.length == 0 and snap.length == 3 and len(snap) == 2
    snap.reserve(1)
    k1, v1 = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    kk, _ = snap.append(0, k1, v1)
    assert torch.equal(kk, torch.cat([k, k1], dim=2))
    with pytest.raises(RuntimeError, match="capacity"):
        snap.append(1, torch.randn(1, 2, 100, 4), torch.randn(1, 2, 100, 4))
    copy = KVCache.from_past(snap, capacity=8)
    assert copy.length == 3 and torch.equal(copy[1][0], k) and copy.capacity == 8
    assert isinstance(snap.to_tuple(), tuple) and torch.equal(snap.to_tuple()[1][0], k)


def test_rows_are_written_at_their_own_positions():
    """Rows of one cache at different lengths: each row's keys land at its own position, the rest stays zero."""
    base = KVCache.empty(num_layers=1, capacity=8)
    rows = KVCache(base._storage, (3, 1, 5))  # three sequences, cached 3, 1 and 5 positions
    assert rows.length == 5
    k = torch.arange(3 * 2 * 2 * 4, dtype=torch.float32).view(3, 2, 2, 4) + 1  # [rows, heads, 2 new, d]
    kk, vv = rows.append(0, k, -k)
    assert kk.shape == (3, 2, 7, 4)  # up to the longest row's new end
    for r, start in enumerate((3, 1, 5)):
        assert torch.equal(kk[r, :, start : start + 2], k[r]) and torch.equal(vv[r, :, start : start + 2], -k[r])
        written = torch.zeros(7, dtype=torch.bool)
        written[start : start + 2] = True
        assert not kk[r, :, ~written].any()  # nothing else was written in that row (zeros, never garbage)
    after = rows.advance(2)
    assert after.lengths == (5, 3, 7) and after.length == 7
    assert KVCache(base._storage, (4, 4)).lengths == 4  # rows that agree are one length (slice writes)


def test_fixed_step_writes_at_tensor_positions():
    """The fixed-shape decode step: writes at positions held in a tensor (every row, or one per row), reads a
    fixed span."""
    cache = KVCache.empty(num_layers=1, capacity=8)
    cache.append(0, torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4, 3))
    k = torch.ones(2, 1, 1, 3)
    kk, _ = cache.at(torch.tensor([4]), span=6).append(0, k, k)
    assert kk.shape == (2, 1, 6, 3) and kk[:, :, 4].eq(1).all() and kk[:, :, :4].eq(0).all()
    kk, _ = cache.at(torch.tensor([5, 2]), span=8).append(0, 2 * k, 2 * k)
    assert kk[0, 0, 5].eq(2).all() and kk[1, 0, 2].eq(2).all() and kk[1, 0, 5].eq(0).all()
