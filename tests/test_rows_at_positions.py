"""Rows of one batch at different positions (issue 31): sequences that start at different steps, with different
prompt lengths, one leaving early and others joining late, decode together through the one forward and each
gets exactly the greedy tokens it gets alone, on v1, v2 and v3, float and INT4, eager and compiled.

Each sequence is prefilled alone into its own slot of one cache (`KVCache.select`), then every step decodes the
sequences still running in one forward, each at its own length and position. Eager decode selects the running
rows only (scattered slots once one has left); the compiled step runs every slot of a `StaticDecoder` with
per-row write positions, the rows not running fed a dummy token and ignored.
"""

import pytest
import torch

import chatglm
from chatglm.kv_cache import KVCache
from chatglm.static_decode import get_decoder

# (prompt, the step it joins at, new tokens): different lengths; the second leaves first; two join late.
SCHEDULE = [
    ("你好", 0, 12),
    ("Hello world, how are you today? A longer prompt.", 0, 4),
    ("What is 1 + 1?", 3, 10),
    ("晚上睡不着应该怎么办", 6, 7),
]


def _prompts(tok, device="cpu"):
    return [tok([text], return_tensors="pt")["input_ids"].to(device) for text, _, _ in SCHEDULE]


def _alone(model, prompt, n, decode):
    """(greedy tokens, logits [n, vocab]) of the sequence generated alone."""
    out = model.generate(prompt, max_new_tokens=n, eos_token_id=[-1], decode=decode, return_dict_in_generate=True,
                         output_logits=True)  # fmt: skip
    return out.sequences[0, prompt.shape[1] :].tolist(), torch.cat(out.logits).float()


@torch.inference_mode()
def _together(model, prompts, decode, follow=None):
    """Each sequence's (greedy tokens, logits [n, vocab]) when they share the batch as SCHEDULE says. follow: each
    sequence's tokens to feed instead of its own argmax (half precision may flip a near-tie and part ways)."""

    def choose(r, logits):
        if follow is None:
            return logits.argmax(-1, keepdim=True)
        return torch.tensor([follow[r][len(out[r])]], device=logits.device)

    slots = len(prompts)
    if decode == "eager":
        cache, decoder = KVCache.empty(model.config.num_layers, 16, slots=slots), None  # grows as needed
    else:
        decoder = get_decoder(model, slots, 64, decode)
        cache = decoder.cache.clear()
        decoder.key_valid.fill_(True)  # no padding: each row's own length hides what is not its own
    out = {r: [] for r in range(slots)}
    seen = {r: [] for r in range(slots)}  # logits
    lengths, state = {}, {}
    step = 0
    try:
        while any(len(out[r]) < n for r, (_, _, n) in enumerate(SCHEDULE)):
            for r, (_, join, _) in enumerate(SCHEDULE):
                if join == step:  # prefill alone into slot r (the prefix, when there is one, goes in first)
                    start = model._init_generation(prompts[r])
                    res = model(input_ids=prompts[r], position_ids=start["position_ids"],
                                past_key_values=cache.select([r], 0), return_last_logit=True)  # fmt: skip
                    tok = choose(r, res.logits[0, -1])
                    lengths[r] = res.past_key_values.length
                    state[r] = model._next_generation_inputs(start, tok, None)
                    out[r].append(int(tok))
                    seen[r].append(res.logits[0, -1].float())
            running = [r for r in sorted(state) if len(out[r]) < SCHEDULE[r][2]]
            if running:
                if decoder is None:
                    res = model(input_ids=torch.cat([state[r]["input_ids"] for r in running]),
                                position_ids=torch.cat([state[r]["position_ids"] for r in running]),
                                past_key_values=cache.select(running, tuple(lengths[r] for r in running)),
                                return_last_logit=True)  # fmt: skip
                    logits = dict(zip(running, res.logits[:, -1]))
                else:  # every slot steps; the rows not running write at their own length and are ignored
                    like = state[running[0]]
                    ids = torch.cat([state[r]["input_ids"] if r in state else torch.zeros_like(like["input_ids"])
                                     for r in range(slots)])  # fmt: skip
                    pos = torch.cat([state[r]["position_ids"] if r in state else
                                     torch.zeros_like(like["position_ids"]) for r in range(slots)])  # fmt: skip
                    every = cache.select(range(slots), tuple(lengths.get(r, 0) for r in range(slots)))
                    logits = dict(enumerate(decoder.step(ids, pos, every)))
                for r in running:
                    tok = choose(r, logits[r])
                    out[r].append(int(tok))
                    seen[r].append(logits[r].float())
                    lengths[r] += 1
                    state[r] = model._next_generation_inputs(state[r], tok, None)
            step += 1
    finally:
        if decoder is not None:
            decoder.release()
    return [(out[r], torch.stack(seen[r])) for r in range(slots)]


def _check(model, tok, decode, atol=1e-4, device="cpu", follow=False):
    """The same tokens, and logits within rounding (these fp32 weights go through torch's sgemm, whose last bits
    depend on the row count, and the compiled step attends under a mask; the logits are compared too because a
    tiny random model often repeats one token). follow: the batch is fed the tokens each sequence got alone, and
    only the logits are compared (half precision on a GPU)."""
    prompts = _prompts(tok, device)
    alone = [_alone(model, p, n, decode) for p, (_, _, n) in zip(prompts, SCHEDULE)]
    together = _together(model, prompts, decode, [ids for ids, _ in alone] if follow else None)
    assert [ids for ids, _ in together] == [ids for ids, _ in alone]
    for (_, got), (_, want) in zip(together, alone):
        torch.testing.assert_close(got, want, atol=atol, rtol=max(atol, 1e-4))


def test_a_batch_fed_the_tokens_alone_runs_the_same_steps(tiny_dirs):
    """The GPU check's method (the batch fed each sequence's tokens alone) on the CPU, bf16 weights: the same
    steps as choosing its own tokens, within bf16 rounding."""
    path = str(tiny_dirs["v2"])
    model = chatglm.load_model(path, dtype=torch.bfloat16).eval()
    _check(model, chatglm.load_tokenizer(path), "eager", atol=3e-2, follow=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "version, dtype, bits",
    [("v2", torch.float32, 0), ("v2", torch.float16, 0), ("v2", torch.float16, 4), ("v1", torch.float16, 0),
     ("v3", torch.float16, 8)],
)  # fmt: skip
def test_cuda_rows_at_their_own_positions_decode_as_alone(tiny_dirs, version, dtype, bits):
    """The engine's batched decode on a GPU (cuBLAS, SDPA, the Triton INT8/INT4 kernels): each row's logits
    those it gets alone, within the rounding of the dtype; in fp32 also the same greedy tokens."""
    path = str(tiny_dirs[version])
    model = chatglm.load_model(path, dtype=dtype, quantization_bit=bits or None).cuda().eval()
    half = dtype != torch.float32
    _check(model, chatglm.load_tokenizer(path), "eager", atol=3e-2 if half else 1e-4, device="cuda", follow=half)


@pytest.mark.parametrize("bits", [0, 4], ids=["fp32", "int4"])
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("decode", ["eager", "compile"])
def test_rows_at_their_own_positions_decode_as_alone(tiny_dirs, version, bits, decode):
    path = str(tiny_dirs[version])
    model = chatglm.load_model(path, dtype=torch.float32, quantization_bit=bits or None).eval()
    _check(model, chatglm.load_tokenizer(path), decode)


@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16], ids=["fp32-act", "bf16-act"])
@pytest.mark.parametrize("bits", [0, 4], ids=["bf16", "int4"])
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_rows_beside_others_get_the_same_bits_as_alone(tiny_dirs, monkeypatch, version, bits, activations):
    """bf16 weights (the CPU path: our kernels for decode rows), activations in fp32 (a CPU without native bf16)
    or bf16 (one with it, forced here on either kind): each row's logits in a batch of rows at their own lengths
    are bit for bit those it gets alone. Both kinds of batch rounding differ otherwise: torch's bf16 attention with
    other rows or padding beside a row, and a rotary pass that left the rows of a decode batch to the reference."""
    import kernels

    monkeypatch.setitem(kernels._native_half, torch.bfloat16, activations == torch.bfloat16)
    path = str(tiny_dirs[version])
    model = chatglm.load_model(path, dtype=torch.bfloat16, quantization_bit=bits or None).eval()
    tok = chatglm.load_tokenizer(path)
    prompts = _prompts(tok)
    alone = [_alone(model, p, n, "eager") for p, (_, _, n) in zip(prompts, SCHEDULE)]
    together = _together(model, prompts, "eager")
    assert [ids for ids, _ in together] == [ids for ids, _ in alone]
    for (_, got), (_, want) in zip(together, alone):
        assert torch.equal(got, want)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_rows_at_their_own_positions_with_a_ptuning_prefix(tiny_dirs, version):
    path = str(tiny_dirs[version])
    model = chatglm.load_model(path, dtype=torch.float32, pre_seq_len=3, prefix_projection=True).eval()
    _check(model, chatglm.load_tokenizer(path), "eager")


def test_scattered_rows_read_and_write_only_their_slots():
    """A snapshot of slots (2, 0) writes each row at its own length in its own slot and reads them in that order;
    slot 1 stays untouched (zero)."""
    cache = KVCache.empty(1, 8, slots=3)
    cache.select([1], 0)  # nothing written yet: selecting is free
    k = torch.arange(2 * 1 * 1 * 2, dtype=torch.float).view(2, 1, 1, 2) + 1  # rows (slot 2, slot 0), one new key
    kk, vv = cache.select([2, 0], (3, 1)).append(0, k, -k)
    assert kk.shape == (2, 1, 4, 2)  # the longest row's end: 3 + 1
    buf = cache._storage.k[0]
    assert torch.equal(buf[2, 0, 3], k[0, 0, 0]) and torch.equal(buf[0, 0, 1], k[1, 0, 0])
    assert torch.equal(kk[0, 0, 3], k[0, 0, 0]) and torch.equal(kk[1, 0, 1], k[1, 0, 0])
    assert not buf[1].any()
    # several heads and several new keys a row: each row's keys land at its own length, head by head
    cache = KVCache.empty(1, 8, slots=3)
    k = torch.randn(2, 2, 3, 4)  # rows (slot 2 at 3, slot 0 at 1), 2 heads, 3 new keys
    kk, _ = cache.select([2, 0], (3, 1)).append(0, k, -k)
    buf = cache._storage.k[0]
    assert torch.equal(buf[2, :, 3:6], k[0]) and torch.equal(buf[0, :, 1:4], k[1]) and not buf[1].any()
    assert torch.equal(kk[0, :, 3:6], k[0]) and torch.equal(kk[1, :, 1:4], k[1]) and kk.shape == (2, 2, 6, 4)
    with pytest.raises(ValueError, match="distinct slots"):
        cache.select([0, 0], 0)
    with pytest.raises(ValueError, match="distinct slots"):
        KVCache.empty(1, 8).select([0], 0)  # a storage without slots
    with pytest.raises(ValueError, match="lengths"):
        cache.select([0, 1], (1, 2, 3))
