"""INT4 decode and prefill side by side: this project, chatglm.cpp and llama.cpp on one checkpoint, in one run.

    python benchmarks/bench_peers.py --workdir /tmp/peers                 # chatglm2-6b at full depth (28 blocks)
    python benchmarks/bench_peers.py --workdir /tmp/peers --layers 4 --reps 3

One random checkpoint at full width is written in the original layout (fp16 shards, the real config.json and
tokenizer; `--layers` cuts the depth), then each engine gets it its own way:
  ours         load_model_and_tokenizer(DIR, device="cpu", quantization_bit=4): INT4 quantized while loading,
               INT8 output layer (the loader's default on the CPU), greedy steps through generate_stream
  chatglm.cpp  chatglm-cpp (pip) q4_0 file made by its own converter classes from our in-memory fp16 model,
               steps through Pipeline.model.generate_next_token (it takes no thread count: it uses every core)
  llama.cpp    llama-cpp-python: an f16 GGUF made by llama.cpp's convert_hf_to_gguf classes from the same
               directory, quantized to Q4_0 by llama_model_quantize (it keeps the output layer at Q6_K); steps
               through Llama.eval([token]) with greedy picks from the last logits
An engine that is not installed (or whose converter source is missing) is skipped with a line that says how to
get it; `bash scripts/setup_peers.sh` installs both peers into .venv and unpacks llama.cpp's converter.

Protocol, per engine and repetition, each in a fresh process, one engine at a time (two at once would share the
cores): load; a warm-up (a 32-token prompt and 4 steps); one timed `--prompt`-token prefill of the same random
ids for every engine; `--new` greedy single-token steps, each timed (the figure is their median). Repetitions are
interleaved (ours, chatglm.cpp, llama.cpp, ours, ...) and the table shows the median over them with the spread.
Each worker also times a 512 MiB copy (the better of ordinary memory and huge pages), before loading and again
after the timed steps: the faster bandwidth and the weight bytes one decode step reads give "floor", the time to
read those bytes once; "of floor" = floor / decode of each repetition, the median over them. This VM's memory
changes speed from minute to minute (a 3.1 GB read took 49 ms at one moment and 100 at another), so the copy floor
(the faster of two moments) and the steps (a minute later) can see different machines. Ours therefore also runs
16 more steps of the same prompt, each followed by a read of its own weights where they lie (an int64 sum of
their bytes): the step against the read of the same seconds, the median of read / step per repetition.
The first greedy tokens are printed per engine, to show each ran the same model: on a tiny checkpoint all three
agree; at full width with random weights the two peers (the same q4_0 blocks) agree with each other while ours,
THUDM's INT4 with one scale per row, rounds differently and picks other tokens from nearly flat logits.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ENGINES = ("ours", "chatglm.cpp", "llama.cpp")
WARMUP_PROMPT, WARMUP_STEPS = 32, 4
PAIRED_STEPS = 16  # ours: decode steps alternated with reads of its weights, after the timed steps


# ----------------------------------------------------------------------------------------------- shared bits
def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 60000), (n,), generator=g).tolist()


def measured_bandwidth() -> float:
    """The copy bandwidth (GB/s) of bench_generate, then the peak memory reset so it counts the engine only."""
    import gc

    from benchmarks.bench_generate import bandwidth, reset_peak

    bw = bandwidth("cpu")
    gc.collect()
    reset_peak("cpu")
    return bw


class SentencePieceTokenizer:
    """What the peers' converters read from THUDM's tokenizer (`tokenizer.tokenizer.sp_model`, `special_tokens`,
    `_convert_id_to_token`, `get_vocab`), over our tokenizer: no remote code. Ids past the SentencePiece pieces
    (the special tokens and the padded rows) read as "" as the original's do."""

    def __init__(self, ours):
        self.ours = ours
        self.sp_model = ours.sp
        self.tokenizer = self
        self.special_tokens = dict(ours.commands)
        self.vocab_file = ours.vocab_file

    def get_vocab(self) -> dict:
        return self.ours.get_vocab()

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.ours.index_commands:
            return self.ours.index_commands[index]
        if index >= self.sp_model.vocab_size():
            return ""
        return self.sp_model.id_to_piece(index)


# ----------------------------------------------------------------------------------------------- preparing
def llama_cpp_source(workdir: str) -> str | None:
    """llama.cpp's source tree (its convert_hf_to_gguf.py and gguf-py), from LLAMA_CPP_SRC or unpacked by
    scripts/setup_peers.sh into .peers/ (or found under the workdir)."""
    candidates = [os.environ.get("LLAMA_CPP_SRC", "")]
    for base in (os.path.join(REPO, ".peers"), workdir):
        candidates += sorted(glob.glob(os.path.join(base, "llama_cpp_python-*", "vendor", "llama.cpp")))
    return next((c for c in candidates if c and os.path.isfile(os.path.join(c, "convert_hf_to_gguf.py"))), None)


def make_chatglm_cpp(hf_dir: str, out: str) -> None:
    """chatglm.cpp's q4_0 file, written by its own converter classes from our fp16 model and tokenizer."""
    import torch
    from chatglm_cpp import convert as cc

    from chatglm import ChatGLMTokenizer, load_model

    model = load_model(hf_dir, dtype=torch.float16)
    tokenizer = ChatGLMTokenizer.from_pretrained(hf_dir)
    version = model.config.chatglm_version
    if version == "v1":
        raise SystemExit("this benchmark builds ChatGLM2/3 checkpoints (chatglm.cpp's v1 converter is not wired)")
    converter = cc.ChatGLM3Converter if version == "v3" else cc.ChatGLM2Converter
    with open(out + ".part", "wb") as f:
        converter.convert(f, model, SentencePieceTokenizer(tokenizer), cc.GGMLType.Q4_0)
    os.replace(out + ".part", out)


def make_gguf(hf_dir: str, out: str, src: str) -> None:
    """An f16 GGUF by llama.cpp's own ChatGLM converter (the sentencepiece vocabulary path of ChatGLM3, fed by
    our tokenizer), then Q4_0 by llama_model_quantize."""
    import llama_cpp

    sys.path[:0] = [src, os.path.join(src, "gguf-py")]
    from pathlib import Path

    import gguf  # noqa: F401  (llama.cpp's own copy, first on the path)
    import transformers
    from conversion.chatglm import ChatGLMModel

    from chatglm import ChatGLMTokenizer

    ours = ChatGLMTokenizer.from_pretrained(hf_dir)
    transformers.AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: SentencePieceTokenizer(ours))

    class Model(ChatGLMModel):
        model_arch = ChatGLMModel.model_arch

        def set_vocab(self):
            self.set_vocab_chatglm3()  # what it does for THUDM/chatglm3-6b; v2's vocabulary is the same kind

    f16 = out + ".f16.part"
    model = Model(Path(hf_dir), gguf.LlamaFileType.MOSTLY_F16, Path(f16), eager=False)
    model.write()
    del model
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(f16.encode(), (out + ".part").encode(), params)
    os.remove(f16)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    os.replace(out + ".part", out)


# ----------------------------------------------------------------------------------------------- the workers
# Each loads its engine and returns (steps, bytes one decode step reads, threads, read or None); steps(prompt, n)
# runs a fresh sequence: the prompt, then greedy tokens, n in all, and returns (seconds per token, tokens);
# read(passes) times the fastest of `passes` reads of the bytes a decode step reads, where they lie, and ours' steps
# take `between`, called after each token outside the timed steps (ours only).
def load_ours(args, config):
    import torch

    from benchmarks.bench_generate import weight_bytes
    from chatglm.backends import load_model_and_tokenizer
    from chatglm.generation import generate_stream

    model, _ = load_model_and_tokenizer(args.hf_dir, device="cpu", quantization_bit=4)

    def steps(prompt, n, between=None):
        times, tokens = [], []
        with torch.inference_mode():
            start = time.perf_counter()
            for seq in generate_stream(model, torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                                       eos_token_id=[-1]):  # fmt: skip
                now = time.perf_counter()
                times.append(now - start)
                tokens.append(int(seq[0, -1]))
                if between is not None:
                    between()
                start = time.perf_counter()
        return times, tokens

    tensors = decode_tensors(model)
    return steps, sum(weight_bytes(model)), torch.get_num_threads(), lambda passes=3: read_in_place(tensors, passes)


def decode_tensors(model) -> list:
    """The tensors one decode step reads: every parameter and buffer of the blocks, and the output layer's."""
    blocks = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if ".layers." in n]
    head = model.output_head()
    return blocks + [t for t in (head.weight, getattr(head, "weight_scale", None)) if t is not None]


def read_in_place(tensors, passes: int = 3) -> float:
    """Seconds of the fastest of `passes` reads of the tensors where they lie (a sum of their bytes as int64; an
    odd tail of under 8 bytes is left out): the floor of a decode step in its own pages, which on this VM can be
    slower or faster than a fresh buffer (the memory behind them differs between processes and minutes)."""
    import torch

    views = []
    for t in tensors:
        flat = t.detach().reshape(-1).view(torch.uint8)
        if flat.numel() >= 8:
            views.append(flat[: flat.numel() // 8 * 8].view(torch.int64))
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for v in views:
            v.sum()
        best = min(best, time.perf_counter() - start)
    return best


def load_chatglm_cpp(args, config):
    import chatglm_cpp

    n_ctx = args.prompt + args.new + 16
    pipe = chatglm_cpp.Pipeline(args.cpp_file, max_length=n_ctx)
    gen = chatglm_cpp._C.GenerationConfig(max_length=n_ctx, do_sample=False)

    def steps(prompt, n):
        times, tokens, n_past, seq = [], [], 0, list(prompt)
        for _ in range(n):  # it takes the whole sequence and reads the ids past n_past (the cache holds the rest)
            start = time.perf_counter()
            token = pipe.model.generate_next_token(seq, None, gen, n_past, n_ctx)
            times.append(time.perf_counter() - start)
            n_past = len(seq)
            seq.append(token)
            tokens.append(token)
        return times, tokens

    return steps, _file_read_bytes(args.cpp_file, args.hf_dir, config), os.cpu_count(), None


def load_llama_cpp(args, config):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(args.gguf_file, n_ctx=args.prompt + args.new + 16, n_batch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)  # fmt: skip
    n_vocab = llm.n_vocab()

    def steps(prompt, n):
        llm.reset()
        times, tokens, chunk = [], [], list(prompt)
        for _ in range(n):
            start = time.perf_counter()
            llm.eval(chunk)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            chunk = [int(logits.argmax())]
            times.append(time.perf_counter() - start)
            tokens.append(chunk[0])
        return times, tokens

    return steps, _file_read_bytes(args.gguf_file, args.hf_dir, config), args.threads, None


def _file_read_bytes(path: str, hf_dir: str, config) -> int:
    """Bytes one decode step reads from a peer's file: all of it but the embedding table (one row is looked up),
    the embedding's share taken by its weight count."""
    vocab = getattr(config, "padded_vocab_size", None) or config.vocab_size
    with open(os.path.join(hf_dir, "pytorch_model.bin.index.json")) as f:
        weights = json.load(f)["metadata"]["total_size"] / 2  # fp16 elements
    return int(os.path.getsize(path) * (1 - vocab * config.hidden_size / weights))


LOADERS = {"ours": load_ours, "chatglm.cpp": load_chatglm_cpp, "llama.cpp": load_llama_cpp}


def huge_page_gib() -> float | None:
    """GiB of this process's anonymous memory in transparent huge pages (Linux), None where unknown."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return None


def worker_main(args) -> None:
    """One engine, one repetition: bandwidth, load, warm-up, the timed prompt and steps; a JSON line."""
    import torch

    from benchmarks.bench_generate import bandwidth, peak_gib
    from chatglm import ChatGLMConfig

    torch.set_num_threads(args.threads)
    config = ChatGLMConfig.from_checkpoint(args.hf_dir)
    ids = prompt_ids(args.prompt, args.seed, getattr(config, "padded_vocab_size", None) or config.vocab_size)
    bw = measured_bandwidth()
    t = time.perf_counter()
    steps, read_bytes, threads, read = LOADERS[args.worker](args, config)
    load_s = time.perf_counter() - t
    steps(ids[:WARMUP_PROMPT], WARMUP_STEPS)
    times, tokens = steps(ids, args.new + 1)
    peak = peak_gib("cpu")
    # the memory of this VM changes speed from minute to minute: the copy is timed again after the steps and the
    # faster of the two gives the floor (the stricter yardstick)
    bw = max(bw, bandwidth("cpu"))
    paired = None
    if read is not None:  # steps and reads of the same bytes alternated: the floor of the same seconds
        reads = []
        paired_steps, _ = steps(ids, PAIRED_STEPS + 1, between=lambda: reads.append(read(1)))
        paired = list(zip(paired_steps[1:], reads[1:]))  # each step, and the read right after it
    result = dict(engine=args.worker, load_s=load_s, prefill_s=times[0], step_s=times[1:], tokens=tokens[:8],
                  bw=bw, read_bytes=read_bytes, threads=threads, peak_gib=peak, huge_gib=huge_page_gib(),
                  paired=paired)  # fmt: skip
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------- the driver
def missing(engine: str, args) -> str | None:
    """Why an engine cannot run here (None: it can)."""
    if engine == "chatglm.cpp":
        try:
            import chatglm_cpp  # noqa: F401
            import tabulate  # noqa: F401  (its converter imports it)
        except ImportError as e:
            return f"not installed ({e.name}): bash scripts/setup_peers.sh"
    if engine == "llama.cpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return "not installed (llama_cpp): bash scripts/setup_peers.sh"
        if not os.path.isfile(args.gguf_file) and llama_cpp_source(args.workdir) is None:
            return "llama.cpp's converter source not found (LLAMA_CPP_SRC, or bash scripts/setup_peers.sh)"
    return None


def child(argv: list[str], timeout: float) -> tuple[dict | None, str]:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line), ""
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return None, (tail[-1] if tail else f"exit {proc.returncode}")


def prepare(args, engines: list[str]) -> list[str]:
    """Write what each engine loads (kept in the workdir for the next run); returns the engines ready."""
    from benchmarks.bench_load import build_checkpoint

    t = time.perf_counter()
    build_checkpoint(os.path.join(args.config, "config.json"), args.hf_dir, layers=args.layers)
    print(f"# checkpoint: {args.hf_dir} ({time.perf_counter() - t:.0f} s)", flush=True)
    ready = []
    for engine, path in (("ours", None), ("chatglm.cpp", args.cpp_file), ("llama.cpp", args.gguf_file)):
        if engine not in engines:
            continue
        why = missing(engine, args)
        if why:
            print(f"# {engine}: skipped, {why}", flush=True)
            continue
        if path and not os.path.isfile(path):
            t = time.perf_counter()
            _, err = child(["--make", engine, *common_argv(args)], args.timeout)
            if not os.path.isfile(path):
                print(f"# {engine}: skipped, converting failed: {err}", flush=True)
                continue
            print(f"# {engine}: converted to {path} ({time.perf_counter() - t:.0f} s)", flush=True)
        ready.append(engine)
    return ready


def common_argv(args) -> list[str]:
    return ["--workdir", args.workdir, "--config", args.config, "--layers", str(args.layers), "--prompt",
            str(args.prompt), "--new", str(args.new), "--threads", str(args.threads), "--seed", str(args.seed)]  # fmt: skip


def floor_ms(result: dict) -> float:
    """The time to read one decode step's bytes once at the copy bandwidth of the result's process."""
    return result["read_bytes"] / (result["bw"] * 1e9) * 1e3


def paired_text(pairs: list) -> str:
    """'step X ms, read Y ms (medians), Z%': Z the median over pairs of read / step."""
    step, read = (statistics.median(p[i] for p in pairs) * 1e3 for i in (0, 1))
    return f"step {step:.1f} ms, read {read:.1f} ms, {statistics.median(r / s for s, r in pairs):.0%}"


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True,
                        help="where the checkpoint and the peers' files are written and kept (28 blocks: about "
                             "12.5 GB of fp16 shards and 3.5 GB per peer file)")  # fmt: skip
    parser.add_argument(
        "--config",
        default=os.path.join(REPO, "..", "shared", "models", "chatglm2-6b"),
        help="a directory with the real config.json and tokenizer (default: chatglm2-6b)",
    )
    parser.add_argument("--layers", type=int, default=0, help="blocks (default: the config's, 28)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens of the timed prefill")
    parser.add_argument("--new", type=int, default=64, help="timed greedy decode steps")
    parser.add_argument("--threads", type=int, default=2, help="threads for ours and llama.cpp")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per engine")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--seed", type=int, default=1, help="seed of the prompt ids")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one step may take before it is dropped")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--make", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with open(os.path.join(args.config, "config.json")) as f:
        args.layers = args.layers or json.load(f)["num_layers"]
    args.workdir = os.path.abspath(args.workdir)
    args.hf_dir = os.path.join(args.workdir, f"hf-{args.layers}")
    args.cpp_file = os.path.join(args.workdir, f"chatglm-cpp-q4_0-{args.layers}.bin")
    args.gguf_file = os.path.join(args.workdir, f"llama-q4_0-{args.layers}.gguf")
    if args.make == "chatglm.cpp":
        return make_chatglm_cpp(args.hf_dir, args.cpp_file)
    if args.make == "llama.cpp":
        return make_gguf(args.hf_dir, args.gguf_file, llama_cpp_source(args.workdir))
    if args.worker:
        return worker_main(args)

    from kernels import cpu_summary

    print(f"# bench_peers: {cpu_summary()}")
    print(f"# chatglm2-6b shape from {os.path.basename(os.path.abspath(args.config))}, {args.layers} blocks, INT4, "
          f"batch 1, prompt {args.prompt}, {args.new} timed steps, threads {args.threads}, {args.reps} reps "
          f"interleaved; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)  # fmt: skip
    engines = prepare(args, args.engines)
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for rep in range(args.reps):
        for engine in engines:
            try:
                result, err = child(["--worker", engine, *common_argv(args)], args.timeout)
            except subprocess.TimeoutExpired:
                result, err = None, f"over {args.timeout:.0f} s"
            if result is None:
                print(f"# {engine} rep {rep + 1}: failed: {err}", flush=True)
                continue
            runs[engine].append(result)
            dec, floor = statistics.median(result["step_s"]) * 1e3, floor_ms(result)
            huge = "" if result.get("huge_gib") is None else f", {result['huge_gib']:.2f} GiB in huge pages"
            if result.get("paired"):
                huge += f", steps alternated with reads of its weights: {paired_text(result['paired'])}"
            print(f"# {engine} rep {rep + 1}: decode {dec:.1f} ms/token, floor {floor:.1f} ms ({floor / dec:.0%}), "
                  f"prefill {result['prefill_s']:.2f} s{huge}, first tokens {result['tokens'][:4]}", flush=True)  # fmt: skip
    print(
        "# columns: decode = median ms per greedy step (median over reps, range of the reps' medians); floor = "
        "bytes one step reads / copy bandwidth of that run (median over reps); of floor = floor / decode per rep "
        "(median over reps); ours x = this engine's decode time / ours"
    )
    print(f"{'engine':<12} {'decode ms/t':>11} {'range':>13} {'tok/s':>6} {'prefill s':>9} {'range':>11} "
          f"{'reads GB':>8} {'floor ms':>8} {'of floor':>8} {'ours x':>6} {'peak GiB':>8} {'load s':>6}")  # fmt: skip
    ours_dec = (
        statistics.median(statistics.median(r["step_s"]) * 1e3 for r in runs["ours"]) if runs.get("ours") else None
    )
    for engine in engines:
        if not runs[engine]:
            continue
        decs = [statistics.median(r["step_s"]) * 1e3 for r in runs[engine]]
        pres = [r["prefill_s"] for r in runs[engine]]
        floors = [floor_ms(r) for r in runs[engine]]
        dec, pre, floor = statistics.median(decs), statistics.median(pres), statistics.median(floors)
        of_floor = statistics.median(f / d for f, d in zip(floors, decs))
        vs = f"{dec / ours_dec:6.2f}" if ours_dec else f"{'-':>6}"
        r0 = runs[engine][0]
        print(f"{engine:<12} {dec:11.1f} {spread(decs):>13} {1e3 / dec:6.2f} {pre:9.2f} {spread(pres):>11} "
              f"{r0['read_bytes'] / 1e9:8.2f} {floor:8.1f} {of_floor:8.0%} {vs} "
              f"{max(r['peak_gib'] for r in runs[engine]):8.2f} {statistics.median(r['load_s'] for r in runs[engine]):6.1f}")  # fmt: skip
    paired = [r["paired"] for r in runs.get("ours", []) if r.get("paired")]
    if paired:
        print(f"# ours, decode steps alternated with reads of its own weights where they lie (per rep): "
              f"{' / '.join(paired_text(p) for p in paired)}; median over reps "
              f"{statistics.median(statistics.median(r / s for s, r in p) for p in paired):.0%} of that floor")  # fmt: skip
    tokens = {e: runs[e][0]["tokens"][0] for e in engines if runs[e]}
    print(f"# first greedy token after the prompt: {tokens}")


if __name__ == "__main__":
    main()
