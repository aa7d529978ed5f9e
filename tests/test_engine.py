"""The engine (chatglm/engine.py): many requests batched together, each getting the reply it gets alone.

Requests arrive from threads at different times with different prompt lengths and lengths of reply, some leave
early; the engine prefills long prompts in chunks beside the running decode and batches the decode steps. Every
reply is compared with the same request run alone without the engine (greedy, and sampled with its own seed)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import chatglm
from chatglm import engine as engine_module
from chatglm.engine import Engine, EngineBusy, attach
from chatglm.generation import generate_stream
from chatglm.sampling import greedy_tokens
from kernels.settings import settings

PROMPTS = ["你好", "Hello world, how are you today? A longer prompt than the others, by far.", "What is 1 + 1?",
           "晚上睡不着应该怎么办", "One more"]  # fmt: skip
NEW = [12, 4, 10, 7, 9]  # the second leaves first


@pytest.fixture(autouse=True)
def rows_computed_alike():
    """Bit-identical replies need each row computed the same way whatever shares its call. The fused INT8/INT4
    kernels do; on a CPU with native bf16 matmuls, 32+ rows of a prompt would otherwise take the dequantize + bf16
    GEMM path (settings.cpu_quantized_gemm), whose rounding differs from the rows' decode and chunked path."""
    with settings.override(cpu_quantized_gemm=False):
        yield


def _model(tiny_dirs, version, bits=0):
    path = str(tiny_dirs[version])
    return (chatglm.load_model(path, dtype=torch.float32, quantization_bit=bits or None).eval(),
            chatglm.load_tokenizer(path))  # fmt: skip


def _options(i, sample):
    if sample:
        return dict(do_sample=True, top_p=0.9, temperature=0.8, generator=torch.Generator().manual_seed(i))
    return dict(do_sample=False)


def _reply(model, ids, n, options):
    out = None
    for out in generate_stream(model, ids, max_new_tokens=n, eos_token_id=[-1], **options):  # noqa: B007
        pass
    return out[0, ids.shape[1] :].tolist()


def _together(model, prompts, sample, options=None):
    """Each request on its own thread (with options[i], else _options), all in the engine before its first step
    (the model's lock held meanwhile): the first max_batch start together, the others join as slots free, at
    other steps. A request takes a decode row for each of its tokens, the first included, so fewer steps than
    sum(NEW) means steps were shared."""
    replies, errors = [None] * len(prompts), []

    def run(i):
        try:
            replies[i] = _reply(model, prompts[i], NEW[i], options[i] if options else _options(i, sample))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    with engine_module.model_lock(model):  # the engine's steps wait; its admissions do not
        for t in threads:
            t.start()
        _wait_until(lambda: sum(model.engine.load()) == len(prompts) or bool(errors))
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return replies


@pytest.mark.parametrize("bits", [0, 4], ids=["fp32", "int4"])
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_requests_batched_together_get_their_replies_alone(tiny_dirs, version, bits, monkeypatch):
    monkeypatch.setattr(engine_module, "IDS_ROOM", 3)  # the ids buffers grow during the replies
    model, tok = _model(tiny_dirs, version, bits)
    prompts = [tok([p], return_tensors="pt")["input_ids"] for p in PROMPTS]
    alone = {s: [_reply(model, p, n, _options(i, s)) for i, (p, n) in enumerate(zip(prompts, NEW))]
             for s in (False, True)}  # fmt: skip
    engine = attach(model, max_batch=3, prefill_chunk=5)  # fewer slots than requests: some wait; chunked prompts
    try:
        for sample in (False, True):
            before = engine.steps
            assert _together(model, prompts, sample) == alone[sample]
            assert engine.steps - before < sum(NEW)  # decode steps were shared: batched, not one by one
        assert engine.load() == (0, 0)
    finally:
        engine.close()


def test_what_a_reader_was_handed_never_changes(tiny_dirs, monkeypatch):
    """The sequences yielded are views of a request's ids buffer: each stays the prefix it was when handed over
    while later tokens are written (and the buffer grows)."""
    monkeypatch.setattr(engine_module, "IDS_ROOM", 2)
    model, tok = _model(tiny_dirs, "v2")
    ids = tok(["Hello world"], return_tensors="pt")["input_ids"].int()  # int32 in, int64 out, as without the engine
    plain = list(generate_stream(model, ids, max_new_tokens=9, eos_token_id=[-1]))
    engine = attach(model, max_batch=2)
    try:
        seen = [(out, out.clone()) for out in generate_stream(model, ids, max_new_tokens=9, eos_token_id=[-1])]
    finally:
        engine.close()
    assert {(out.dtype, out.is_inference()) for out, _ in seen} == {(p.dtype, p.is_inference()) for p in plain}
    assert torch.equal(seen[-1][0], plain[-1])
    assert [out.shape[1] for out, _ in seen] == list(range(ids.shape[1] + 1, ids.shape[1] + 10))
    assert all(torch.equal(out, copy) for out, copy in seen)
    assert torch.equal(seen[-1][0][:, : ids.shape[1]], ids)


def test_a_running_request_gets_its_tokens_at_most_every_stream_interval(tiny_dirs):
    """The first token goes out at once; later tokens wait until `stream_interval` has passed since the last
    handover (each wakes the reader's thread), and whatever is pending goes out with the end, every token still
    yielded one by one."""
    model, tok = _model(tiny_dirs, "v2")
    ids = tok(["Hello world"], return_tensors="pt")["input_ids"]
    release = threading.Event()

    def until_released(input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), release.is_set(), dtype=torch.bool)

    with pytest.raises(ValueError, match="stream_interval"):
        Engine(model, stream_interval=-1)
    engine = attach(model, max_batch=2, stream_interval=60.0)
    lengths, running = [], []
    try:
        for out in generate_stream(model, ids, max_new_tokens=500, eos_token_id=[-1], do_sample=False,
                                   stopping_criteria=[until_released]):  # fmt: skip
            lengths.append(out.shape[1])
            running.append(engine.load()[0])
            if len(lengths) == 1:
                _wait_steps(engine, 3)  # steps run meanwhile; their tokens wait
                release.set()
    finally:
        release.set()
        engine.close()
    assert running[0] == 1  # the first token while the request still runs
    assert len(lengths) > 2 and all(r == 0 for r in running[1:])  # the rest with the end
    assert lengths == list(range(ids.shape[1] + 1, ids.shape[1] + 1 + len(lengths)))


def test_no_token_waits_through_a_prompt_chunk(tiny_dirs, monkeypatch):
    """Tokens held back by stream_interval are handed over before the engine reads a prompt (a step that takes
    seconds on a CPU): when a new request's prompt is read, the running requests have nothing pending."""
    model, tok = _model(tiny_dirs, "v2")
    a = tok(["Hello world"], return_tensors="pt")["input_ids"]
    b = tok(["A second request, with a prompt of its own"], return_tensors="pt")["input_ids"]
    release = threading.Event()

    def until_released(input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), release.is_set(), dtype=torch.bool)

    engine = attach(model, max_batch=2, stream_interval=60.0)
    pending_at_prompts = []
    forward = model.forward

    def recording(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1 and threading.current_thread() is engine._thread:  # a prompt chunk
            pending_at_prompts.append(sum(len(r.pending) for r in engine.slots if r is not None))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    first = threading.Event()
    got = []

    def run_a():
        for out in generate_stream(model, a, max_new_tokens=500, eos_token_id=[-1], do_sample=False,
                                   stopping_criteria=[until_released]):  # fmt: skip
            got.append(out.shape[1])
            first.set()

    thread = threading.Thread(target=run_a)
    try:
        thread.start()
        assert first.wait(60)
        _wait_steps(engine, 3)  # a's tokens pile up (handed over at most once a minute)
        assert _reply(model, b, 3, {"do_sample": False}) == _reply_alone(model, b, 3, engine)
    finally:
        release.set()
        thread.join(timeout=60)
        engine.close()
    assert pending_at_prompts == [0, 0]  # two prompts read, nothing held at either
    assert len(got) > 3 and got == list(range(a.shape[1] + 1, a.shape[1] + 1 + len(got)))


def _wait_until(done, seconds=60.0):
    """Poll `done()` until it holds or `seconds` pass (a busy CPU may do little in a fixed sleep)."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.001)


def _wait_steps(engine, n):
    """Wait until the engine has run `n` more decode steps."""
    start = engine.steps
    _wait_until(lambda: engine.steps >= start + n)
    assert engine.steps >= start + n


def _reply_alone(model, ids, n, engine):
    """The reply without the engine (the model's engine taken off for the call)."""
    model.__dict__.pop("engine")
    try:
        return _reply(model, ids, n, {"do_sample": False})
    finally:
        model.engine = engine


class _StopAt:
    """A stopping criterion: stop once the sequence is `length` long; records the scores it was shown."""

    def __init__(self, length):
        self.length, self.seen = length, []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(scores)
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_plain_greedy_rows_share_one_argmax_beside_sampled_and_processed_rows(tiny_dirs):
    """Plain greedy rows take their tokens from one argmax over the batch's logits; rows with a processor
    (repetition penalty), sampling or a stopping criterion in the same batch still get their replies alone, and
    a criterion sees a plain greedy row's logits in fp32, as choose() gives them."""
    model, tok = _model(tiny_dirs, "v3")
    prompts = [tok([p], return_tensors="pt")["input_ids"] for p in PROMPTS]
    stop_alone, stop_together = (_StopAt(prompts[4].shape[1] + 5) for _ in range(2))

    def options(stop):  # fresh each time: the sampled row's generator starts from its seed
        return [dict(do_sample=False), _options(1, True), dict(do_sample=False, repetition_penalty=1.3),
                dict(do_sample=False), dict(do_sample=False, stopping_criteria=[stop])]  # fmt: skip

    alone = [_reply(model, p, n, o) for p, n, o in zip(prompts, NEW, options(stop_alone))]
    assert len(alone[4]) == 5  # the criterion ended it
    engine = attach(model, max_batch=5)
    try:
        assert _together(model, prompts, False, options=options(stop_together)) == alone
        assert len(stop_together.seen) == len(stop_alone.seen) == 5
        for a, b in zip(stop_alone.seen, stop_together.seen):  # (the path alone rounds a few last bits otherwise)
            assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, rtol=0, atol=1e-5)
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_requests_batched_together_on_cuda_get_their_replies_alone(tiny_dirs, version):
    """The same code on a GPU (fp32: cuBLAS without TF32, whose last bits may depend on the row count, far from a
    greedy near-tie on these prompts), prompts in chunks and more requests than slots, and a chat."""
    path = str(tiny_dirs[version])
    model, tok = chatglm.load_model(path, dtype=torch.float32).cuda().eval(), chatglm.load_tokenizer(path)
    prompts = [tok([p], return_tensors="pt")["input_ids"].cuda() for p in PROMPTS]
    alone = [_reply(model, p, n, _options(i, False)) for i, (p, n) in enumerate(zip(prompts, NEW))]
    chat_alone = model.chat(tok, PROMPTS[0], do_sample=False, max_length=48)[0]
    engine = attach(model, max_batch=3, prefill_chunk=5)
    try:
        before = engine.steps
        assert _together(model, prompts, False) == alone
        assert engine.steps - before < sum(NEW)
        assert model.chat(tok, PROMPTS[0], do_sample=False, max_length=48)[0] == chat_alone
        assert engine.load() == (0, 0)
    finally:
        engine.close()


def test_chat_through_the_engine_is_the_chat_alone(tiny_dirs, monkeypatch):
    """Chats batched together get their replies alone; their greedy rows (the chat's own guards, no other
    processor) get their tokens from one greedy_tokens call a step, not one choose() a row."""
    model, tok = _model(tiny_dirs, "v3")
    alone = [model.chat(tok, q, do_sample=False, max_length=64)[0] for q in PROMPTS[:3]]
    rows_per_call = []

    def counted(scores, *rule):
        rows_per_call.append((scores.shape[0], rule))
        return greedy_tokens(scores, *rule)

    monkeypatch.setattr(engine_module, "greedy_tokens", counted)
    engine = attach(model, max_batch=4)
    try:
        got = [None] * 3
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(
            i, model.chat(tok, PROMPTS[i], do_sample=False, max_length=64)[0])) for i in range(3)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == alone
        assert max(n for n, _ in rows_per_call) > 1
        assert {rule for _, rule in rows_per_call} == {(True, tok.vocab_size)}
        # What the engine does not take (a cache passed in and asked back) runs beside it, under the model lock.
        response, history, past = model.stream_chat(tok, "你好", [], return_past_key_values=True,
                                                    do_sample=False, max_length=64).__next__()  # fmt: skip
        assert past is not None
    finally:
        engine.close()


def test_a_reader_that_leaves_frees_its_slot(tiny_dirs):
    model, tok = _model(tiny_dirs, "v2")
    ids = tok(["你好"], return_tensors="pt")["input_ids"]
    engine = Engine(model, max_batch=1, max_waiting=0)
    model.engine = engine
    try:
        stream = generate_stream(model, ids, max_new_tokens=2000, eos_token_id=[-1], do_sample=False)
        next(stream), next(stream)
        with pytest.raises(EngineBusy):  # the only slot is taken and nobody may wait
            next(generate_stream(model, ids, max_new_tokens=3, do_sample=False))
        steps = engine.steps
        stream.close()  # the client left
        _wait_until(lambda: engine.load() == (0, 0), 10)
        # stopped, not run to 2000 (a loaded CPU may pause this thread for a few of the engine's sub-ms steps)
        assert engine.load() == (0, 0) and engine.steps < steps + 1000
        assert len(_reply(model, ids, 3, {"do_sample": False})) == 3  # the slot serves the next request
    finally:
        engine.close()
    with pytest.raises(EngineBusy, match="shut down"):
        engine.stream(None, ids).__next__()


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_a_follow_up_reuses_the_kept_prefix_and_answers_as_alone(tiny_dirs, version):
    """A slot keeps its last request's keys; a prompt that starts with that request's prompt and reply prefills
    only the rest, also while the kept slot sat idle between running rows (dummy keys go past what it keeps)."""
    model, tok = _model(tiny_dirs, version)
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(5, 100, (1, n), generator=g) for n in (9, 14, 6))
    engine = attach(model, max_batch=3)
    release = threading.Event()  # a and c run until the follow-up is answered (whatever the machine's speed)

    def until_released(input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), release.is_set(), dtype=torch.bool)

    try:
        results = {}

        def run(name, ids, n):
            options = {"do_sample": False, "stopping_criteria": [until_released] if n > 4 else []}
            results[name] = _reply(model, ids, n, options)

        threads = [threading.Thread(target=run, args=args) for args in (("a", a, 4000), ("b", b, 4), ("c", c, 4000))]
        for t in threads:  # slots 0, 1, 2 in this order; b finishes first and its slot waits between a and c
            t.start()
            time.sleep(0.05)
        threads[1].join(timeout=60)
        _wait_until(lambda: engine.load() == (2, 0))  # a and c run until released; c may still be on its way in
        assert engine.kept[1] is not None and engine.load() == (2, 0)
        follow = torch.cat([b, torch.tensor([results["b"][:3]]), torch.randint(5, 100, (1, 5), generator=g)], 1)
        before = engine.reused
        got = _reply(model, follow, 6, {"do_sample": False})
        assert engine.reused - before == b.shape[1] + 3  # the prompt and the reply's tokens already written
    finally:
        release.set()
        for t in threads:
            t.join(timeout=60)
        engine.close()
        del model.engine
    assert got == _reply(model, follow, 6, {"do_sample": False})  # the same follow-up alone, no engine
    assert results["a"] == _reply(model, a, len(results["a"]), {"do_sample": False})


def test_a_stream_without_every_token_yields_the_newest_of_the_tokens_handed_over_together(tiny_dirs):
    """generate_stream(every_token=False) through the engine yields only the newest of the sequences handed over
    at once (several tokens a yield when they pile up), ending on the same reply; the servers' chat_events give
    the same text and usage from it; without an engine every token is yielded."""
    from serving.events import chat_events

    model, tok = _model(tiny_dirs, "v2")
    ids = tok([PROMPTS[1]], return_tensors="pt")["input_ids"]
    alone = list(generate_stream(model, ids, max_new_tokens=24, eos_token_id=[-1], do_sample=False, every_token=False))
    assert len(alone) == 24  # no engine: every token
    want_chat = list(chat_events(model, tok, PROMPTS[0], [], gen={"max_new_tokens": 24, "do_sample": False}))
    engine = attach(model, max_batch=2, stream_interval=0.05)  # tokens pile up between handovers
    try:
        seqs = list(generate_stream(model, ids, max_new_tokens=24, eos_token_id=[-1], do_sample=False,
                                    every_token=False))  # fmt: skip
        assert 1 < len(seqs) < 24
        assert torch.equal(seqs[-1], alone[-1])
        assert all(torch.equal(b[:, : a.shape[1]], a) and b.shape[1] > a.shape[1] for a, b in zip(seqs, seqs[1:]))
        every = list(generate_stream(model, ids, max_new_tokens=24, eos_token_id=[-1], do_sample=False))
        assert len(every) == 24 and torch.equal(every[-1], alone[-1])
        got = list(chat_events(model, tok, PROMPTS[0], [], gen={"max_new_tokens": 24, "do_sample": False}))
        text = "".join(e.get("content", "") for e in got)
        assert text == "".join(e.get("content", "") for e in want_chat)
        assert got[-1]["usage"] == want_chat[-1]["usage"] and len(got) < len(want_chat)
    finally:
        engine.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_the_same_request_sent_again_gets_the_same_reply(tiny_dirs, version, dtype):
    """A request sent again finds its prompt kept in a slot and reads only the last token; the first time, the
    last token is read as a decode row too, so both get the same logits: the same greedy reply every time (read
    with the rest of the prompt, then alone, bf16 activations rounded it differently, and on a CPU with native bf16
    the tiny model's replies alternated between two texts)."""
    path = str(tiny_dirs[version])
    model = chatglm.load_model(path, dtype=dtype).eval()
    tok = chatglm.load_tokenizer(path)
    engine = attach(model, max_batch=2)
    try:
        for prompt in PROMPTS:
            ids = tok([prompt], return_tensors="pt")["input_ids"]
            first = _reply(model, ids, 48, {"do_sample": False})
            before = engine.reused
            again = [_reply(model, ids, 48, {"do_sample": False}) for _ in range(2)]
            assert engine.reused - before == 2 * (ids.shape[1] - 1)  # all but the last token kept, both times
            assert again == [first, first], prompt
    finally:
        engine.close()
        del model.engine
