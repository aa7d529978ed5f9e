"""Many users at once: generated tokens/s of N concurrent clients through the engine, next to one client alone and
to N clients taking turns under the model lock (how every server ran before the engine), in one run.

    python benchmarks/bench_engine.py                                  # chatglm2-6b width, 4 blocks, INT4, 8 clients
    python benchmarks/bench_engine.py --model tiny                     # the tiny random v2 model
    python benchmarks/bench_engine.py --mode bf16 --clients 4 --new 64
    python benchmarks/bench_engine.py --device cuda --layers 28 --mode fp16    # on a GPU (Triton INT8/INT4 kernels)

The model is built from a real config.json at full width with `--layers` blocks and random weights (as
bench_generate.py does), or is the tiny checkpoint. Each client is a thread streaming greedy tokens through
generate_stream (what stream_chat and every server run), with its own random `--prompt`-token prompt, for `--new`
tokens (no EOS). Printed per row: clients, total generated tokens, wall seconds from the first request to the last
token, generated tokens/s, the ratio to one client alone, and whether every reply is token for token the reply its
prompt gets alone. Then each engine run against a one-client run timed just before it, and the median of those
ratios (this VM's memory changes speed between minutes: the first rows and the last can see different machines).

Then prefix reuse: time to first token of a follow-up turn whose prompt starts with a `--history`-token
conversation the engine has just answered (its prompt and reply), against the same prompt sent cold (a fresh
engine), and whether both give the same reply.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load(args):
    if args.model == "tiny":
        import chatglm
        from chatglm.tiny import make_tiny_checkpoint

        path = make_tiny_checkpoint(os.path.join(tempfile.mkdtemp(), "tiny"), "v2")
        return chatglm.load_model(path, dtype=torch.float32).to(args.device).eval(), "tiny random ChatGLM2 (fp32)"
    from benchmarks.bench_generate import MODES, build

    dtype_name, bits = MODES[args.mode]
    if args.device != "cpu" and bits:
        dtype_name = "fp16"  # INT8/INT4 on a GPU: fp16 activations, as the original's CUDA models
    cpu = args.device == "cpu"
    output = args.output_layer if args.output_layer != "auto" else "int8" if bits and cpu else "float"  # as the loader
    model, real = build(args.config, args.layers, getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}.get(
        dtype_name, "float32")), bits, args.device, output)  # fmt: skip
    return model, (f"{os.path.basename(args.config)} at full width, {args.layers} of {real} blocks, {args.mode}, "
                   f"output layer {output}")  # fmt: skip


def run(model, prompts, new: int) -> tuple[list[list[int]], float]:
    """Each prompt on its own thread at once; (replies, wall seconds)."""
    from benchmarks import all_at_once
    from chatglm.generation import generate_stream

    def client(i):
        out = None
        for out in generate_stream(model, prompts[i], max_new_tokens=new, eos_token_id=[-1], do_sample=False):  # noqa: B007
            pass
        return out[0, prompts[i].shape[1] :].tolist()

    return all_at_once(client, len(prompts))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["full", "tiny"], default="full", help="full width (default) or tiny")
    parser.add_argument("--config", default=os.path.join(REPO, "..", "shared", "models", "chatglm2-6b"),
                        help="directory with the real config.json (default ../shared/models/chatglm2-6b)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=4, help="blocks built (default 4)")
    parser.add_argument(
        "--mode", choices=["fp32", "bf16", "fp16", "int8", "int4"], default="int4", help="weights (default int4)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--output-layer", choices=["auto", "float", "bf16", "int8"], default="auto",
                        help="the output layer (default auto, as utils' loader: int8 for an INT8/INT4 model on the "
                             "CPU, else as the model)")  # fmt: skip
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per client (default 16)")
    parser.add_argument("--new", type=int, default=128, help="tokens generated per client (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--stream-interval", type=float, default=None, help="seconds between handovers of a "
                        "running request's tokens to its reader (default: the engine's, chatglm.engine.STREAM_INTERVAL; "
                        "0: every step)")  # fmt: skip
    parser.add_argument("--history", type=int, default=1000, help="shared conversation tokens of the follow-up turn "
                        "(default 1000; 0 skips it)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from chatglm.engine import attach, detach
    from kernels import cpu_summary, release_openmp_threads

    model, what = load(args)
    release_openmp_threads()  # as attach() does: the clients' threads (and the engine's) run unthrottled, alike
    vocab = min(getattr(model.config, "padded_vocab_size", None) or model.config.vocab_size, 60000)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, vocab, (1, args.prompt), generator=g).to(args.device) for _ in range(args.clients)]
    from chatglm.engine import STREAM_INTERVAL

    interval_s = STREAM_INTERVAL if args.stream_interval is None else args.stream_interval
    print(f"# {what}; {args.clients} clients, prompt {args.prompt} tokens, {args.new} new, greedy, "
          f"{args.threads} threads, engine stream interval {interval_s * 1e3:g} ms, torch {torch.__version__}")  # fmt: skip
    print(f"# CPU: {cpu_summary()}")
    if args.device != "cpu":
        print(f"# device: {torch.cuda.get_device_name(torch.device(args.device))}, CUDA {torch.version.cuda}")
    run(model, prompts[:1], 4)  # warm up (kernel load, allocator)

    solo, times = [], []  # each prompt's reply alone; its time (the median counts: one short run is noisy)
    for p in prompts:
        reply, t = run(model, [p], args.new)
        solo.append(reply[0])
        times.append(t)
    t1 = statistics.median(times)
    one = args.new / t1
    rows = [("1 client alone (median)", 1, args.new, t1, True)]
    replies, t = run(model, prompts, args.new)  # no engine: the steps of the clients take turns under the lock
    rows.append((f"{args.clients} clients, one at a time (lock)", args.clients, args.new * args.clients, t,
                 replies == solo))  # fmt: skip
    runs, paired = [], []
    interval = {} if args.stream_interval is None else {"stream_interval": args.stream_interval}
    for i in range(3):  # a fresh engine each time: nothing kept from an earlier run (prefix reuse is measured below)
        # one client just before: this VM's memory changes speed between minutes, and the one-client rate measured
        # minutes earlier moved the ratio by 1.5x (45-64 tok/s) where the engine's runs did not move alike
        _, alone = run(model, [prompts[i % len(prompts)]], args.new)
        paired.append(args.new / alone)
        attach(model, max_batch=args.clients, **interval)
        try:
            run(model, [torch.randint(3, 100, (1, args.prompt), generator=g).to(args.device) for _ in range(2)], 4)
            runs.append(run(model, prompts, args.new))  # (ids of 100+: no prefix shared with the warm-up)
            assert model.engine.reused == 0
        finally:
            detach(model)
    t = statistics.median(t for _, t in runs)
    same = all(replies == solo for replies, _ in runs)
    rows.append((f"{args.clients} clients, engine (median of 3)", args.clients, args.new * args.clients, t, same))
    print(f"{'':34} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'x one':>6}  same replies")
    for name, _, tokens, secs, same in rows:
        print(f"{name:34} {tokens:7d} {secs:7.2f} {tokens / secs:7.2f} {tokens / secs / one:6.2f}  {same}")
    ratios = [args.new * args.clients / t / rate for (_, t), rate in zip(runs, paired)]
    print(
        f"engine runs against one client run just before each: {' / '.join(f'{r:.2f}x' for r in ratios)} "
        f"(one client {' / '.join(f'{r:.1f}' for r in paired)} tok/s), median {statistics.median(ratios):.2f}x"
    )
    if args.history:
        follow_up(model, vocab, args.history, g)


def first_token(model, ids, new=8):
    """(seconds to the first token, the reply) of one greedy request."""
    from chatglm.generation import generate_stream

    start, first, out = time.perf_counter(), None, None
    for out in generate_stream(model, ids, max_new_tokens=new, eos_token_id=[-1], do_sample=False):  # noqa: B007
        first = first or time.perf_counter() - start
    return first, out[0, ids.shape[1] :].tolist()


def follow_up(model, vocab, history, g):
    from chatglm.engine import attach, detach

    device = next(model.parameters()).device
    turn1 = torch.randint(100, vocab, (1, history), generator=g).to(device)
    question = torch.randint(100, vocab, (1, 16), generator=g).to(device)
    try:
        engine = attach(model, max_batch=2)
        _, reply = first_token(model, turn1, 16)
        reply_ids = torch.tensor([reply[:-1]], device=device)
        turn2 = torch.cat([turn1, reply_ids, question], dim=1)  # history, reply, new question
        warm, warm_reply = first_token(model, turn2)
        reused = engine.reused
        detach(model)
        attach(model, max_batch=2)  # a fresh engine: nothing kept
        cold, cold_reply = first_token(model, turn2)
    finally:
        detach(model)
    print(
        f"follow-up turn of {turn2.shape[1]} tokens ({reused} reused): ttft cold {cold:.3f} s, with the kept "
        f"prefix {warm:.3f} s = {warm / cold:.1%} of cold; same reply: {warm_reply == cold_reply}"
    )


if __name__ == "__main__":
    main()
