"""End-to-end generation speed at real model width, ours next to the reference-style path, in one run.

    python benchmarks/bench_generate.py                       # CPU: bf16 int8 int4, threads 1 and 2, 4 layers
    python benchmarks/bench_generate.py --quick               # CI: 1 layer, short prompt; fails only if INT8/INT4
                                                              # decode is under --gate (4x) the reference's speed
    python benchmarks/bench_generate.py --device cuda --modes fp16 bf16 int8 int4 --threads 1 --paths ours ref graph
    python benchmarks/bench_generate.py --context 32768 --modes int4 --threads 2     # long-context memory

The model is built from a real config.json (../shared/models/chatglm2-6b by default; chatglm-6b works too)
with `--layers` blocks at full width and random weights (quantized models get random int8/int4 weights and
scales directly: no float copy is ever made). Nothing is read from disk but the config, nothing downloaded.

Each (mode, threads, path) runs in a fresh process, so its peak memory is its own. Per row:
  ttft       time to first token of a `--prompt`-token prompt (prefill + head + sampling), batch 1
  prefill    prompt tokens / ttft
  dec b1     decode at batch 1 over `--new` new tokens (greedy, through generate_stream), ms/token and tok/s
  dec b8     decode tokens/s summed over a batch of `--batch` prompts
  peak       peak resident memory of the generation (CPU, VmHWM after a reset) or peak allocated (GPU)
  scaled     the decode/prefill figure scaled to the real layer count: blocks in proportion to their bytes,
             the output layer counted once (decode is memory-bound: time follows bytes read)
  floor      weight bytes read per token at the real layer count / memory bandwidth measured in that process
  of floor   floor / scaled decode time (1.0 = reading the weights at the measured bandwidth)
Paths: "ours" (fused kernels, preallocated KV cache, windowed sampler, CPU weights in huge pages), "graph",
"compile" and "static" (ours with the fixed-shape decode step of chatglm/static_decode.py, replayed as a CUDA
graph, compiled with torch.compile, or run eagerly; their steps are captured in an untimed run first) and "ref"
(the reference-style path: plain float matmul, dequantize-then-matmul for INT8/INT4, the KV cache copied whole
every step as the original's torch.cat does; CHATGLM_NO_CPU_KERNEL=1, CHATGLM_NO_HUGE_PAGES=1 and CHATGLM_NO_TRITON=1 in that process). The
copy bandwidth behind the floor is the better of ordinary memory and huge pages, so huge pages do not flatter
the ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = {"fp32": ("fp32", 0), "bf16": ("bf16", 0), "fp16": ("fp16", 0), "int8": ("bf16", 8), "int4": ("bf16", 4)}
# Modes the gate compares (fused INT8/INT4 kernels against dequantize-then-matmul: 20x and more on every CPU
# measured, so a noisy machine cannot fail it); bf16's gap is small and CPU-dependent (native bf16 or not).
GATED = ("int8", "int4")
QUICK_GATE = 4.0
LEGEND = """# columns: ttft s = time to first token (prefill + head); pre t/s = prompt tokens / ttft; dec ms/t, dec t/s =
#   decode at batch 1; batch t/s = decode tokens/s over the whole batch; peak GiB = peak resident memory;
#   sc.ttft, sc.ms/t, sc.t/s = those scaled to the real layer count; floor ms = weight bytes per token /
#   measured bandwidth; of flr = floor / scaled decode time (100% = at the bandwidth floor); dec x, pre x =
#   the reference path's decode and ttft time / ours (how many times faster)"""
# Paths beyond "ours" and "ref": ours with the decode step captured in a CUDA graph, compiled, or run at fixed shape
DECODE_PATHS = {"graph": "cuda_graph", "compile": "compile", "static": "static"}


# ----------------------------------------------------------------------------------------------- the worker
def build(config_dir: str, layers: int, dtype, bits: int, device: str, output: str = "float"):
    """A full-width model with `layers` blocks and random weights, built in place (no float copy for INT);
    `output`: the output layer as the model (float), bf16 or int8 (quantization.set_output_layer)."""
    from chatglm import ChatGLMConfig
    from chatglm.loading import model_class
    from quantization import prepare_for_quantized_checkpoint

    config = ChatGLMConfig.from_checkpoint(config_dir)
    real_layers = config.num_layers
    config.num_layers = layers
    model = model_class(config)(config, device="meta", dtype=dtype)
    if bits:
        prepare_for_quantized_checkpoint(model, bits, output_bits=8 if output == "int8" else 0)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype == torch.int8:
                p.random_(-128, 128, generator=g)
            elif name.endswith("weight_scale"):
                p.uniform_(0.02 / (2 ** (bits - 1)), 0.04 / (2 ** (bits - 1)), generator=g)
            elif "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    model._reset_buffers()
    if output != "float":
        from quantization import set_output_layer

        set_output_layer(model, output)
    if device == "cpu":  # as the loader leaves it: the kernels' weight layout, huge pages
        from chatglm.loading import settle_on_cpu

        settle_on_cpu(model)
    return model.eval(), real_layers


def weight_bytes(model) -> tuple[int, int]:
    """(bytes in the blocks, bytes of the output layer): what one decode step reads."""
    blocks = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if ".layers." in n)
    head = model.output_head().weight
    return blocks, head.numel() * head.element_size()


def bandwidth(device: str) -> float:
    """Copy bandwidth in GB/s (bytes read + written) of a 512 MiB tensor copy, best of a few. On the CPU the
    copy is timed in ordinary memory and, when the weights go there, in huge pages too; the faster counts."""
    from chatglm import hugepages

    pairs = [(torch.ones(2**27, device=device), torch.empty(2**27, device=device))]
    if device == "cpu" and hugepages.enabled():
        pairs.append((hugepages.to_huge_pages(pairs[0][0]), hugepages.to_huge_pages(pairs[0][1])))
    best = float("inf")
    for a, b in pairs:
        for _ in range(8):
            sync(device)
            t = time.perf_counter()
            b.copy_(a)
            sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * 2**27 * 4 / best / 1e9


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reference_stream(model, ids, new: int):
    """The original's greedy decode loop: the cache handed back as the original's tuple at every step, which the
    next forward copies into a new cache, as the original's torch.cat copies the whole cache per step."""
    from chatglm.generation import FORWARD_KEYS

    state = model._init_generation(ids, None, None, None)
    for _ in range(new):
        out = model(**{k: state[k] for k in FORWARD_KEYS}, use_cache=True, return_last_logit=True)
        tokens = out.logits[:, -1].argmax(-1)
        yield tokens
        state = model._next_generation_inputs(state, tokens, out.past_key_values)  # a tuple: copied next step


def timed_stream(model, ids, new: int, ref: bool, device: str, decode: str = "eager"):
    """(seconds to the first token, seconds per token after it) of a greedy generate_stream (or the reference)."""
    from chatglm.generation import generate_stream

    sync(device)
    start = time.perf_counter()
    first = last = None
    n = 0
    steps = reference_stream(model, ids, new) if ref else generate_stream(
        model, ids, do_sample=False, max_new_tokens=new, eos_token_id=[-1], decode=decode
    )  # fmt: skip
    for _ in steps:
        sync(device)
        now = time.perf_counter()
        first = first or now
        last, n = now, n + 1
    return first - start, (last - first) / max(n - 1, 1)


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.quantized_prefill == "fused":
        from kernels.settings import settings

        settings.cpu_quantized_gemm = False  # the fused kernel at every row count
    dtype_name, bits = MODES[args.mode]
    device = args.device
    ref = args.path == "ref"
    bw = bandwidth(device)
    output = "float" if ref else args.output_layer  # the reference path keeps the original's float output layer
    model, real_layers = build(args.config, args.layers, DTYPES[dtype_name], bits, device, output)
    vocab = getattr(model.config, "padded_vocab_size", None) or model.config.vocab_size  # v1 has only the latter
    g = torch.Generator().manual_seed(1)
    kv = ref
    decode = DECODE_PATHS.get(args.path, "eager")
    with torch.inference_mode():
        small = torch.randint(100, min(vocab, 60000), (1, 8), generator=g).to(device)
        timed_stream(model, small, 3, kv, device)  # warm up (kernel load, allocator)
        gc.collect()
        reset_peak(device)
        prompt = torch.randint(100, min(vocab, 60000), (1, args.prompt), generator=g).to(device)
        ttft, _ = timed_stream(model, prompt, 1, kv, device)
        new = args.ref_new if ref else args.new
        short = torch.randint(100, min(vocab, 60000), (1, 16), generator=g).to(device)
        if decode != "eager":  # capture or compile the steps of this shape before timing them
            timed_stream(model, short, new, kv, device, decode)
        _, dec1 = timed_stream(model, short, new, kv, device, decode)
        dec_batch = None
        if args.batch > 1:
            batch = torch.randint(100, min(vocab, 60000), (args.batch, 16), generator=g).to(device)
            if decode != "eager":
                timed_stream(model, batch, max(new // 2, 4), kv, device, decode)
            _, dec_batch = timed_stream(model, batch, max(new // 2, 4), kv, device, decode)
        peak = peak_gib(device)
    blocks, head = weight_bytes(model)
    scale = real_layers / args.layers
    share = blocks / (blocks + head)
    return dict(
        mode=args.mode, threads=args.threads, path=args.path, device=device, layers=args.layers,
        real_layers=real_layers, bw=bw, ttft=ttft, prefill_tps=args.prompt / ttft, dec1=dec1,
        batch_tps=(args.batch / dec_batch) if dec_batch else None, peak=peak,
        scaled_dec1=dec1 * (share * scale + 1 - share), scaled_ttft=ttft * scale,
        floor=(blocks * scale + head) / (bw * 1e9), weights_gib=(blocks * scale + head) / 2**30,
    )  # fmt: skip


def long_context_worker(args) -> dict:
    """Decode at a long context on the full-depth model: fill the cache with random keys/values, then step."""
    from chatglm.kv_cache import KVCache

    torch.set_num_threads(args.threads)
    dtype_name, bits = MODES[args.mode]
    device = args.device
    from chatglm import ChatGLMConfig

    real_layers = ChatGLMConfig.from_checkpoint(args.config).num_layers
    model, _ = build(args.config, real_layers, DTYPES[dtype_name], bits, device)
    cfg = model.config
    groups = cfg.multi_query_group_num if getattr(cfg, "multi_query_attention", False) else cfg.num_attention_heads
    head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    from chatglm.layers import compute_dtype

    cache = KVCache.empty(real_layers, args.context + 16)
    chunk = 4096
    with torch.inference_mode():
        dtype = compute_dtype(torch.empty(0, dtype=DTYPES[dtype_name], device=device))  # what the cache holds
        for start in range(0, args.context, chunk):
            n = min(chunk, args.context - start)
            for i in range(real_layers):
                k = torch.randn(1, groups, n, head_dim, dtype=dtype, device=device)
                cache.append(i, k, torch.randn_like(k))
            cache = cache.advance(n)
        kv_gib = sum(cache[i][0].numel() * 2 * cache[i][0].element_size() for i in range(real_layers)) / 2**30
        ids = torch.randint(100, 60000, (1, 1), device=device)
        times = []
        for _step in range(args.ref_new):
            sync(device)
            t = time.perf_counter()
            out = model(ids, past_key_values=cache, return_last_logit=True)
            sync(device)
            times.append(time.perf_counter() - t)
            cache = out.past_key_values
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
        peak = peak_gib(device)
    return dict(mode=args.mode, threads=args.threads, context=args.context, layers=real_layers, kv_gib=kv_gib,
                dec1=sorted(times)[len(times) // 2], peak=peak, device=device)  # fmt: skip


# ----------------------------------------------------------------------------------------------- the driver
def run_worker(argv: list[str], ref: bool) -> dict | None:
    env = dict(os.environ)
    if ref:
        env["CHATGLM_NO_CPU_KERNEL"] = "1"
        env["CHATGLM_NO_HUGE_PAGES"] = "1"
        env["CHATGLM_NO_TRITON"] = "1"  # on CUDA: dequantize-then-matmul, the original's approach
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True,
                          env=env)  # fmt: skip
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    sys.stderr.write(proc.stderr[-3000:])
    return None


def fmt_row(r: dict, ref: dict | None) -> str:
    dec_batch = f"{r['batch_tps']:9.2f}" if r.get("batch_tps") else f"{'-':>9}"
    speed = f"{ref['dec1'] / r['dec1']:6.1f}x" if ref and r["path"] != "ref" else f"{'':>7}"
    pre = f"{ref['ttft'] / r['ttft']:6.1f}x" if ref and r["path"] != "ref" else f"{'':>7}"
    return (f"{r['mode']:<5} {r['threads']:>3} {r['path']:<7} {r['ttft']:8.2f} {r['prefill_tps']:8.1f} "
            f"{r['dec1'] * 1e3:9.1f} {1 / r['dec1']:7.2f} {dec_batch} {r['peak']:8.2f} {r['scaled_ttft']:9.1f} "
            f"{r['scaled_dec1'] * 1e3:9.1f} {1 / r['scaled_dec1']:7.2f} {r['floor'] * 1e3:8.1f} "
            f"{r['floor'] / r['scaled_dec1']:7.0%} {speed} {pre}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=LEGEND.replace("# ", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    shared = os.environ.get("CHATGLM_SHARED_MODELS") or os.path.join(REPO, "..", "shared", "models")
    parser.add_argument("--config", default=os.path.join(shared, "chatglm2-6b"),
                        help="a directory with a real config.json (default ../shared/models/chatglm2-6b)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--layers", type=int, default=4, help="blocks built at full width (default 4; figures are "
                        "also scaled to the real count)")  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=None, choices=sorted(MODES),
                        help="weight formats to run (default: bf16 int8 int4 on the CPU, all on CUDA)")  # fmt: skip
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens for ttft and prefill (default 512)")
    parser.add_argument("--new", type=int, default=128, help="new tokens timed for decode (default 128)")
    parser.add_argument("--ref-new", type=int, default=24, help="new tokens for the (slow) reference path")
    parser.add_argument("--batch", type=int, default=8, help="prompts decoded together for 'batch t/s' (default 8)")
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["ours", "ref"],
        choices=["ours", "ref", *DECODE_PATHS],
        help="ours, ref; graph, compile, static: ours with that decode step (graph: CUDA only)",
    )
    parser.add_argument("--quick", action="store_true", help="1 layer, prompt 32, 16 tokens, int8+int4+bf16, 2 threads")
    parser.add_argument(
        "--gate",
        type=float,
        default=None,
        help=f"exit 1 when ours decodes less than GATE times as fast as the reference path in a gated mode "
        f"({', '.join(GATED)}: fused kernels against dequantize-then-matmul, 20x and more; bf16 is a dispatch "
        f"choice and never gated); --quick sets {QUICK_GATE}",
    )
    parser.add_argument("--context", type=int, default=0, help="measure decode memory/speed at this context")
    parser.add_argument("--output-layer", default="float", choices=["float", "bf16", "int8"],
                        help="ours' output layer (default float, as the original keeps it; int8 is what the "
                             "loader gives a quantized CPU model; the ref path keeps float)")  # fmt: skip
    parser.add_argument("--quantized-prefill", default="auto", choices=["auto", "fused"],
                        help="INT8/INT4 layers with many rows: auto = the model's choice for this CPU (dequantize to "
                             "bf16 + torch's GEMM where bf16 matmuls are native, else the fused kernel); fused = the "
                             "fused kernel at every row count")  # fmt: skip
    parser.add_argument("--worker", choices=["gen", "long"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        result = worker(args) if args.worker == "gen" else long_context_worker(args)
        print(json.dumps(result), flush=True)
        return
    if not os.path.isfile(os.path.join(args.config, "config.json")):
        print(f"bench_generate: no config.json at {args.config}: skipped (pass --config)")
        return
    if args.quick:
        args.layers, args.prompt, args.new, args.ref_new, args.batch = 1, 32, 16, 4, 2
        args.threads, args.modes = [2], args.modes or ["int8", "int4", "bf16"]
        args.gate = QUICK_GATE if args.gate is None else args.gate
    modes = args.modes or (["bf16", "int8", "int4"] if args.device == "cpu" else ["fp16", "bf16", "int8", "int4"])
    if args.device == "cpu":
        import kernels

        cap = kernels.cpu_summary()
    else:
        cap = torch.cuda.get_device_name()
    print(f"# bench_generate: torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cpus, "
          f"device {args.device} ({cap}), config {os.path.basename(os.path.abspath(args.config))}, "
          f"{args.layers} layers at full width (scaled to the real depth), prompt {args.prompt}, "
          f"{args.new} new tokens (ref {args.ref_new}), batch {args.batch}, output layer {args.output_layer}, "
          f"quantized prefill {args.quantized_prefill}",
          flush=True)  # fmt: skip
    if args.context:
        print(f"{'mode':<5} {'thr':>3} {'context':>8} {'layers':>6} {'KV GiB':>7} {'dec ms/tok':>10} {'peak GiB':>9}")
        for mode in modes:
            for t in args.threads:
                argv = ["--worker", "long", "--mode", mode, "--threads", str(t), "--config", args.config,
                        "--device", args.device, "--context", str(args.context), "--ref-new", "8"]  # fmt: skip
                r = run_worker(argv, False)
                if r:
                    print(f"{mode:<5} {t:>3} {r['context']:>8} {r['layers']:>6} {r['kv_gib']:7.2f} "
                          f"{r['dec1'] * 1e3:10.1f} {r['peak']:9.2f}", flush=True)  # fmt: skip
        return
    print(f"{'mode':<5} {'thr':>3} {'path':<7} {'ttft s':>8} {'pre t/s':>8} {'dec ms/t':>9} {'dec t/s':>7} "
          f"{'batch t/s':>9} {'peak GiB':>8} {'sc.ttft':>9} {'sc.ms/t':>9} {'sc.t/s':>7} {'floor ms':>8} "
          f"{'of flr':>7} {'dec x':>7} {'pre x':>7}")  # fmt: skip
    slower = []

    def measure(mode, t, path):
        argv = ["--worker", "gen", "--mode", mode, "--threads", str(t), "--path", path, "--config", args.config,
                "--device", args.device, "--layers", str(args.layers), "--prompt", str(args.prompt), "--new",
                str(args.new), "--ref-new", str(args.ref_new), "--batch", str(args.batch), "--output-layer",
                args.output_layer, "--quantized-prefill", args.quantized_prefill]  # fmt: skip
        return run_worker(argv, path == "ref")

    for mode in modes:
        for t in args.threads:
            results = {}
            for path in sorted(args.paths, key=lambda p: p != "ref"):  # the reference first
                r = measure(mode, t, path)
                if r is None:
                    print(f"{mode:<5} {t:>3} {path:<7} failed", flush=True)
                    continue
                results[path] = r
                print(fmt_row(r, results.get("ref")), flush=True)
            if args.gate and mode in GATED and "ours" in results and "ref" in results:
                ratio = results["ref"]["dec1"] / results["ours"]["dec1"]
                if ratio < args.gate:  # measured once more before failing: a busy machine slows one run, not two
                    print(f"# {mode} threads {t}: {ratio:.1f}x, under the gate: measuring once more", flush=True)
                    ref, ours = measure(mode, t, "ref"), measure(mode, t, "ours")
                    if ref and ours:
                        print(fmt_row(ref, None), flush=True)
                        print(fmt_row(ours, ref), flush=True)
                        ratio = max(ratio, ref["dec1"] / ours["dec1"])
                if ratio < args.gate:
                    slower.append(f"{mode} threads {t} ({ratio:.1f}x)")
    print(LEGEND)
    if args.gate:
        print(f"# gate: ours' decode at least {args.gate:g}x the reference's in {', '.join(GATED)}")
    if slower:
        print(f"FAIL: decode under {args.gate:g}x the reference-style path for {', '.join(slower)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
