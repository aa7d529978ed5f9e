"""Fixed-shape decode steps (chatglm/static_decode.py): the same tokens and logits as eager decode.

"static" (the fixed-shape step run eagerly) and "compile" (torch.compile) run on the CPU here; "cuda_graph"
and compile-plus-graph need a GPU and skip without one.
"""

import argparse

import pytest
import torch

import chatglm
import utils
from chatglm.generation import generate_stream
from chatglm.kv_cache import KVCache
from chatglm.static_decode import CAPACITY_STEP, MIN_SPAN, get_decoder, spans

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _run(model, decode, extra=(), **kw):
    """(tokens, logits of every step) of a greedy generation; `extra` logits processors run after the record."""
    logits = []

    def record(input_ids, scores):
        logits.append(scores.clone())
        return scores

    out = None
    for out in generate_stream(model, decode=decode, do_sample=False, logits_processor=[record, *extra], **kw):
        pass
    return out, torch.stack(logits)


def _batch(tok, device="cpu"):
    enc = tok(["你好", "Hello world, how are you today? A longer prompt."], padding=True, return_tensors="pt")
    assert not bool(enc["attention_mask"].all())  # left padding in the first row
    return dict(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))


def _assert_same(a, b, atol=1e-5):
    (ids_a, logits_a), (ids_b, logits_b) = a, b
    assert ids_a.tolist() == ids_b.tolist()
    assert logits_a.shape == logits_b.shape
    torch.testing.assert_close(logits_a, logits_b, atol=atol, rtol=1e-4)


def test_spans():
    assert spans(256) == [256]
    assert spans(300) == [256, 300]
    assert spans(2048) == [256, 512, 1024, 2048]
    assert spans(2304) == [256, 512, 1024, 2048, 2304]
    assert all(s >= MIN_SPAN for s in spans(5000))


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_static_step_equals_eager_batched_across_spans(tiny, version):
    model, tok = tiny[version]
    # 300 new tokens: the step moves from the 256-position span to the 512 one mid-reply.
    kw = dict(_batch(tok), max_new_tokens=300, eos_token_id=[-1])
    _assert_same(_run(model, "static", **kw), _run(model, "eager", **kw))


def test_decoder_grows_mid_reply(tiny):
    model, tok = tiny["v3"]
    ids = tok.build_chat_input("你好")["input_ids"]
    kw = dict(input_ids=ids, max_new_tokens=600, eos_token_id=[-1])
    static = _run(model, "static", **kw)  # room for prompt + 256 at first, then 2x when the reply needs it
    decoder = model._static_decoders[(1, "static")][0]
    assert decoder.capacity >= ids.shape[1] + 600 and decoder.cache.capacity == decoder.capacity
    _assert_same(static, _run(model, "eager", **kw))


def test_prompt_longer_than_max_length(tiny):
    model, tok = tiny["v2"]
    ids = tok(["Hello world, how are you today? A longer prompt. " * 40], return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 256  # past the room a decoder gets for a short max_length
    kw = dict(input_ids=ids, max_length=4, eos_token_id=[-1])  # the original's rule: one token all the same
    static = _run(model, "static", **kw)
    assert static[0].shape[1] == ids.shape[1] + 1
    _assert_same(static, _run(model, "eager", **kw))


def test_begin_makes_room_for_the_prompt(tiny_dirs):
    model = chatglm.load_model(str(tiny_dirs["v2"]), dtype=torch.float32).eval()
    dec = get_decoder(model, 2, 8, "static")
    assert dec.capacity == CAPACITY_STEP
    mask = torch.ones(2, 600, dtype=torch.long)
    mask[0, :5] = 0
    cache = dec.begin(mask, 600)
    dec.release()
    assert cache.length == 0 and dec.capacity >= 601 and dec.cache.capacity == dec.capacity
    assert dec.key_valid.shape == (2, dec.capacity) and not dec.key_valid[0, :5].any() and dec.key_valid[1].all()


def test_compiled_step_equals_eager(tiny):
    model, tok = tiny["v2"]
    kw = dict(_batch(tok), max_new_tokens=24, eos_token_id=[-1])
    eager = _run(model, "eager", **kw)
    _assert_same(_run(model, "compile", **kw), eager)
    _assert_same(_run(model, "compile", **kw), eager)  # the second generation reuses the compiled step


@pytest.mark.parametrize(
    "dtype, bits, device",
    [(torch.bfloat16, 0, None), (torch.bfloat16, 4, None), (torch.bfloat16, 4, "cpu")],
    ids=["bf16", "int4", "int4-loaded-for-cpu"],
)
def test_compiled_step_keeps_the_cpu_kernels(tiny_dirs, dtype, bits, device):
    """The C kernels enter the compiled step as operators (kernels/torch_ops.py): one graph, no breaks, the
    operators in it, and eager decode's logits at every step (each step forced onto eager's token). Loaded for the
    CPU, the INT4 weights are in the kernels' own layout where they have one (lanes16)."""
    import torch._dynamo

    from kernels import get_cpu_kernel, native_half_gemm

    if get_cpu_kernel() is None:
        pytest.skip("no CPU kernels here (no compiler)")
    path = str(tiny_dirs["v3"])
    model = chatglm.load_model(path, dtype=dtype, quantization_bit=bits or None, device=device).eval()
    if device:
        from quantization import QuantizedLinear

        layouts = {m.weight_layout for m in model.modules() if isinstance(m, QuantizedLinear)}
        assert layouts == {"lanes16" if get_cpu_kernel().packed_layout else "thudm"}
    tok = chatglm.load_tokenizer(path)
    # Tight where the trunk computes in fp32 (an INT4 model, or no native bf16: the kernels take fp32
    # activations); bf16 weights with native bf16 keep bf16 activations, which inductor's fused kernels round at
    # other points than eager's ops: a few bf16 steps (2^-6 each at these logits' magnitude ~2).
    fp32_trunk = bool(bits) or not native_half_gemm(dtype)
    atol = 1e-4 if fp32_trunk else 8 * 2**-6
    _follows_eager(model, tok, "compile", "cpu", atol, new=12)
    decoder = model._static_decoders[(2, "compile")][0]
    with torch.inference_mode():
        explained = torch._dynamo.explain(lambda: decoder._forward(256))()
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    code = "\n".join(g.code for g in explained.graphs)
    wanted = ["cpu_linear" if bits else "cpu_float_linear"]
    if fp32_trunk:  # the fp32-activation helpers; bf16 activations take torch's own ops
        wanted += ["cpu_rms_norm", "cpu_rotary_", "cpu_silu_mul"]
    assert all(f"torch.ops.chatglm.{name}" in code for name in wanted), code[:2000]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_static_step_with_ptuning_prefix(tiny_dirs, version):
    path = str(tiny_dirs[version])
    model = chatglm.load_model(path, dtype=torch.float32, pre_seq_len=3, prefix_projection=True).eval()
    tok = chatglm.load_tokenizer(path)
    kw = dict(_batch(tok), max_new_tokens=8, eos_token_id=[-1])
    _assert_same(_run(model, "static", **kw), _run(model, "eager", **kw))


def test_quantized_static_step_equals_eager(tiny_dirs):
    model = chatglm.load_model(str(tiny_dirs["v3"]), dtype=torch.float32, quantization_bit=4).eval()
    tok = chatglm.load_tokenizer(str(tiny_dirs["v3"]))
    kw = dict(input_ids=tok.build_chat_input("你好")["input_ids"], max_new_tokens=10, eos_token_id=[-1])
    # The eager decode attention is a C kernel, the static one SDPA with a mask: rounding differs slightly.
    _assert_same(_run(model, "static", **kw), _run(model, "eager", **kw), atol=1e-4)


def test_chat_turns_keep_their_caches(tiny):
    """The decoder's buffers serve every generation; caches handed out earlier must survive that."""
    model, tok = tiny["v2"]
    kw = dict(do_sample=False, max_length=60)

    def turn(decode, query, history, past):
        return model.chat(tok, query, history=history, past_key_values=past, return_past_key_values=True,
                          decode=decode, **kw)  # fmt: skip

    ref1 = turn("eager", "你好", [], None)
    ref2 = turn("eager", "再见", ref1[1], ref1[2])
    r1 = turn("static", "你好", [], None)
    assert r1[0] == ref1[0] and isinstance(r1[2], KVCache)
    kept1 = [t.clone() for t in r1[2][0]]
    r2 = turn("static", "再见", r1[1], r1[2])
    assert r2[0] == ref2[0]
    kept2 = [t.clone() for t in r2[2][0]]
    retry = turn("static", "再见", r1[1], r1[2])  # the first turn's cache continued a second time
    assert retry[0] == r2[0]
    other = turn("static", "Hello", [], None)  # a new conversation over the same buffers
    assert other[0] == turn("eager", "Hello", [], None)[0]
    for kept, cache in ((kept1, r1[2]), (kept2, r2[2])):
        assert all(torch.equal(a, b) for a, b in zip(kept, cache[0]))
    torch.testing.assert_close(r2[2][0][0], ref2[2][0][0], atol=1e-5, rtol=1e-4)


def test_interleaved_generations_do_not_share_buffers(tiny):
    """Servers run the steps of two requests in turn: the second gets a decoder of its own."""
    model, tok = tiny["v3"]
    a_ids = tok.build_chat_input("你好")["input_ids"]
    b_ids = tok.build_chat_input("Hello there, tell me a story")["input_ids"]
    kw = dict(max_new_tokens=12, eos_token_id=[-1], do_sample=False)
    ref_a = model.generate(a_ids, decode="eager", **kw)
    ref_b = model.generate(b_ids, decode="eager", **kw)
    ga = generate_stream(model, a_ids, decode="static", **kw)
    gb = generate_stream(model, b_ids, decode="static", **kw)
    out_a, out_b = next(ga), next(gb)
    kept = model._static_decoders[(1, "static")][0]
    assert kept.busy  # held by the first generation; the second one runs on a private decoder
    for out_a, out_b in zip(ga, gb):
        pass
    assert out_a.tolist() == ref_a.tolist() and out_b.tolist() == ref_b.tolist()
    assert not kept.busy  # released when its generation ended


def test_threads_without_a_lock_each_get_their_own_buffers(tiny):
    import threading

    model, tok = tiny["v2"]
    prompts = [tok([p], return_tensors="pt")["input_ids"] for p in ("你好", "Hello", "What is 1+1?", "再见")]
    kw = dict(max_new_tokens=40, eos_token_id=[-1], do_sample=False)
    expected = [model.generate(ids, decode="eager", **kw).tolist() for ids in prompts]
    got = [None] * len(prompts)

    def run(i):
        got[i] = model.generate(prompts[i], decode="static", **kw).tolist()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert not model._static_decoders[(1, "static")][0].busy


def test_decoder_is_kept_and_rebuilt_when_the_weights_move(tiny_dirs):
    model = chatglm.load_model(str(tiny_dirs["v2"]), dtype=torch.float32).eval()
    first = get_decoder(model, 1, 100, "static")
    first.release()
    assert first.capacity == CAPACITY_STEP
    assert get_decoder(model, 1, 200, "static") is first  # same batch, enough room: kept
    first.release()
    bigger = get_decoder(model, 1, CAPACITY_STEP + 1, "static")
    bigger.release()
    assert bigger is first and bigger.capacity == 2 * CAPACITY_STEP  # grown in place
    tok = chatglm.load_tokenizer(str(tiny_dirs["v2"]))
    ids = tok(["你好"], return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=6, eos_token_id=[-1])
    model.generate(ids, decode="static", **kw)
    model.to(torch.float64)  # new parameter storage: a captured step would read the old one
    assert get_decoder(model, 1, 100, "static") is not bigger
    _assert_same(_run(model, "static", input_ids=ids, **kw), _run(model, "eager", input_ids=ids, **kw))


def test_bad_requests(tiny):
    model, tok = tiny["v2"]
    ids = tok(["你好"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="ChatGLM model of this package"):
        get_decoder(torch.nn.Linear(2, 2), 1, 8, "static")
    with pytest.raises(ValueError, match="CUDA device"):
        model.generate(ids, decode="cuda_graph", max_new_tokens=2)
    with pytest.raises(ValueError, match="decode must be one of"):
        model.generate(ids, decode="fast", max_new_tokens=2)
    # A failed start leaves no decoder marked busy.
    dec = get_decoder(model, 1, 16, "static")
    assert dec is model._static_decoders[(1, "static")][0]
    dec.release()


def test_utils_decode_flag(tiny_dirs):
    parser = utils.add_model_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model-path", str(tiny_dirs["v3"]), "--device", "cpu", "--decode", "static"])
    model, tok = utils.load_from_args(args)
    assert model.decode_mode == "static"
    ids = tok.build_chat_input("你好")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, eos_token_id=[-1], do_sample=False)
    assert out.tolist() == model.generate(ids, max_new_tokens=5, eos_token_id=[-1], do_sample=False,
                                          decode="eager").tolist()  # fmt: skip
    assert model._static_decoders[(1, "static")][0].busy is False  # the default path went through it
    with pytest.raises(ValueError, match="CUDA device"):
        utils.load_model_and_tokenizer(str(tiny_dirs["v3"]), device="cpu", decode="cuda_graph")
    with pytest.raises(SystemExit):
        parser.parse_args(["--decode", "turbo"])


def _follows_eager(model, tok, mode, device, atol, new=300):
    """Generate `new` tokens in `mode`, twice, each step forced onto eager decode's token (fp16/bf16 greedy may
    flip a near-tie and then part ways); every step's logits close to eager's."""
    kw = dict(_batch(tok, device), max_new_tokens=new, eos_token_id=[-1])
    ids_e, logits_e = _run(model, "eager", **kw)

    def follow_eager(input_ids, scores):
        want = ids_e[:, input_ids.shape[1]].view(-1, 1)
        return torch.full_like(scores, float("-inf")).scatter(1, want, 0.0)

    for _ in range(2):  # the second generation replays what the first one captured or compiled
        ids, logits = _run(model, mode, extra=[follow_eager], **kw)
        assert ids.tolist() == ids_e.tolist() and ids.shape[1] == kw["input_ids"].shape[1] + new
        torch.testing.assert_close(logits, logits_e, atol=atol, rtol=atol)


@pytest.mark.parametrize("version, bits", [("v2", 0), ("v1", 0), ("v3", 4)])
def test_graph_replay_semantics_on_cpu(tiny_dirs, monkeypatch, version, bits):
    """A CUDA graph replays the recorded kernels on the same tensors and runs no Python: a step that baked a
    per-step Python value (a length, a position) into the recording would replay it wrongly. make_fx records the
    step the same way on the CPU (aten ops on the same tensors), so "cuda_graph" runs here on that stand-in."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from chatglm import layers, static_decode

    monkeypatch.setattr(static_decode, "_device_for", lambda model, mode: torch.device("cpu"))
    monkeypatch.setattr(layers, "get_cpu_kernel", lambda: None)  # ctypes calls would be missing from a recording
    recorded = []

    def record(fn, device):
        fn()  # the warm-up, as the real capture does
        graph = make_fx(fn)()
        recorded.append(graph)
        return lambda: graph().clone()

    monkeypatch.setattr(static_decode, "_capture", record)
    path = str(tiny_dirs[version])
    model = chatglm.load_model(path, dtype=torch.float32, quantization_bit=bits or None).eval()
    monkeypatch.setattr("quantization.ops.get_cpu_kernel", lambda: None)  # INT4: the PyTorch path, recordable
    tok = chatglm.load_tokenizer(path)
    kw = dict(_batch(tok), max_new_tokens=300, eos_token_id=[-1])
    _assert_same(_run(model, "cuda_graph", **kw), _run(model, "eager", **kw))
    assert len(recorded) == 2  # one recording per span: 256, then 512
    _assert_same(_run(model, "cuda_graph", **kw), _run(model, "eager", **kw))  # replayed, not recorded again
    assert len(recorded) == 2


def test_forced_tokens_check_on_cpu(tiny):
    """The GPU test's method, on the CPU with the fixed-shape step run eagerly."""
    model, tok = tiny["v2"]
    _follows_eager(model, tok, "static", "cpu", 1e-5)


@needs_cuda
@pytest.mark.parametrize(
    "version, mode, bits",
    [("v2", "cuda_graph", 0), ("v2", "cuda_graph", 4), ("v2", "compile", 0), ("v2", "compile", 4),
     ("v1", "cuda_graph", 0), ("v3", "cuda_graph", 8)],
)  # fmt: skip
def test_cuda_decode_equals_eager(tiny_dirs, version, mode, bits):
    path = str(tiny_dirs[version])
    model = chatglm.load_model(path, dtype=torch.float16, quantization_bit=bits or None)
    _follows_eager(model.cuda().eval(), chatglm.load_tokenizer(path), mode, "cuda", 3e-2)


def test_v1_rotary_tables_are_sized_once_per_forward(tiny_dirs):
    """v1 layers read their rotary tables without sizing them (no per-layer host read of the positions): the
    model sizes all of them first, also past the first 2048 positions."""
    path = str(tiny_dirs["v1"])
    model = chatglm.load_model(path, dtype=torch.float32).eval()
    tables = [layer.attention.rotary_emb for layer in model.transformer.layers]
    ids = torch.randint(10, 500, (1, 2100))
    with torch.no_grad():
        grown = model(ids).logits
    assert all(t._cache.shape[1] >= 2100 for t in tables)
    fresh = chatglm.load_model(path, dtype=torch.float32).eval()
    for t in (layer.attention.rotary_emb for layer in fresh.transformer.layers):
        t.table(4096, "cpu")  # sized ahead: the same angles, a bigger table
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, grown)
