"""Native kernels and their loader. Nothing here imports `quantization` (the dependency is one-way).

`get_cpu_kernel()` compiles quantization_kernels.c on first use with gcc (-O3, OpenMP, and -march=native
when the compiler accepts it on this CPU), caches the shared library by a hash of the source, flags, compiler
and CPU, and loads it with ctypes. When gcc or OpenMP is missing it says so once and returns None (or a
single-threaded build), and callers use the PyTorch reference instead.

CHATGLM_CPU_ISA (read once) picks the instruction set the kernels are built for, so that every CPU path can be
run on any machine that can execute it:
  native    (default) -march=native: the AVX2/FMA/F16C intrinsics, and whatever else the compiler finds here
            (AVX-512 code generation; the AVX-512 VNNI kernels; on a CPU with AMX the int8 tile kernels, which
            CHATGLM_NO_AMX=1, settings.cpu_amx, turns off at run time);
  avx2      -march=x86-64-v3: exactly what an AVX2-only CPU runs, even on an AVX-512 one; the CPU is also
            treated as having no native bf16/fp16 GEMM (`native_half_gemm`);
  portable  -DCHATGLM_PORTABLE: the plain C path without intrinsics; no native half GEMM either.
To reproduce an AVX2-only machine whole, cap torch too (read by torch at start-up, before any of this):
  CHATGLM_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

from . import torch_ops
from .settings import settings

logger = logging.getLogger(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCE = os.path.join(HERE, "quantization_kernels.c")
_lock = threading.Lock()
_cpu_kernel = None
_cpu_tried = False


def cache_dir() -> str:
    root = settings.kernel_cache
    os.makedirs(root, exist_ok=True)
    return root


def _cpu_signature() -> str:
    """What the -march=native code depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _try_compile(cc: str, flags: list[str], out: str) -> str | None:
    cmd = [cc, *flags, CPU_SOURCE, "-o", out, "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"{cc} exited {proc.returncode}")


ISAS = ("native", "avx2", "portable")


def cpu_isa() -> str:
    """settings.cpu_isa (CHATGLM_CPU_ISA): "native" (default), "avx2" or "portable" (see the module docstring)."""
    value = settings.cpu_isa
    if value not in ISAS:
        raise ValueError(f"CHATGLM_CPU_ISA={value!r} is not one of {', '.join(ISAS)}")
    return value


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "avx512_fp16", "amx_bf16", "amx_int8", "neon", "asimd", "bf16", "i8mm", "sve")  # fmt: skip


def cpu_summary() -> str:
    """One line for benchmark headers: the CPU model, its SIMD flags that matter here, and the switches that
    change which paths run (CHATGLM_CPU_ISA, torch's ATEN_CPU_CAPABILITY, oneDNN's ONEDNN_MAX_CPU_ISA)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    caps = [
        f"CHATGLM_CPU_ISA={cpu_isa()}",
        f"torch {torch.backends.cpu.get_cpu_capability()}",
        *(f"{v}={os.environ[v]}" for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(v)),
    ]
    return f"{model}, {os.cpu_count()} cpus, flags {' '.join(f for f in SIMD_FLAGS if f in flags)}; {', '.join(caps)}"


def can_run(isa: str) -> bool:
    """Whether this CPU executes the kernels built for `isa`."""
    if isa == "avx2":
        return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma", "f16c"} <= cpu_flags()
    return isa in ISAS


def _build(cc: str, isa: str = "native") -> str | None:
    """Compile (or find in the cache) the CPU kernel library for `isa` (see ISAS); None when no build works."""
    if isa not in ISAS:
        raise ValueError(f"unknown CPU instruction set {isa!r}: use one of {', '.join(ISAS)}")
    with open(CPU_SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    base = ["-O3", "-fPIC", "-shared", "-std=c99"] + (["-DCHATGLM_PORTABLE"] if isa == "portable" else [])
    if isa == "avx2":  # x86-64-v3 is AVX2+FMA+F16C+BMI; older compilers know only the separate switches.
        archs = [["-march=x86-64-v3"], ["-mavx2", "-mfma", "-mf16c"]]  # no fallback without them: that is portable C
    else:
        archs = [["-march=native"], []]
    attempts = [[*base, *omp, *a] for omp in (["-fopenmp"], []) for a in archs]  # no OpenMP: one thread
    errors = []
    for flags in attempts:
        key = hashlib.sha256(source + " ".join(flags).encode() + version.encode() + _cpu_signature().encode())
        target = os.path.join(cache_dir(), f"quantization_kernels-{key.hexdigest()[:16]}.so")
        if os.path.isfile(target):
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
        os.close(fd)
        err = _try_compile(cc, flags, tmp)
        if err is None:
            os.replace(tmp, target)  # atomic: a half-written library is never loaded
            if "-fopenmp" not in flags:
                logger.warning("OpenMP is not available to %s: the CPU kernels run on one thread", cc)
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(flags)}: {err.splitlines()[-1] if err else ''}")
    logger.warning("could not compile the CPU quantization kernels:\n  %s", "\n  ".join(errors))
    return None


QBLOCK = 64  # columns per activation-quantization block of the w8/w4 "q" kernels (QB in the C source)

# Which INT8/INT4 kernel `CpuKernel.linear` uses by default: True quantizes the activations to int8 per
# 64-column block and sums exact integers (memory-bound, ~0.3% relative error from rounding x), False keeps
# fp32 activations (exact products, compute-bound for INT4). CHATGLM_CPU_FLOAT_ACTIVATIONS=1 makes both False.
QUANTIZE_ACTIVATIONS = {4: True, 8: True}


class CpuKernel:
    """ctypes wrapper around the compiled library. Inputs are contiguous CPU tensors."""

    def __init__(self, path: str, isa: str = "native"):
        self.path = path
        self.isa = isa
        self.lib = ctypes.CDLL(path)
        p, i = ctypes.c_void_p, ctypes.c_int
        for name in ("w8_linear", "w4_linear", "w8_linear_f"):
            getattr(self.lib, name).argtypes = [p, p, p, p, p, i, i, i]
        self.lib.w8_linear.restype = self.lib.w4_linear.restype = i
        self.lib.w4_linear_f.argtypes = [p, p, p, p, p, p, i, i, i]
        for name in ("wq_gemm", "wq_gemm_vnni", "wq_rows_packed"):
            getattr(self.lib, name).argtypes = [p, p, p, p, p, i, i, i, i]
            getattr(self.lib, name).restype = i
        self.lib.float_linear.argtypes = [p, p, p, p, i, i, i, i]
        self.lib.float_linear.restype = i
        self.lib.quantize_activations.argtypes = [p, p, p, i, i, i]
        self.lib.unpack_int4.argtypes = [p, p, i, i]
        self.lib.dequantize.argtypes = [p, p, p, i, i, i]
        self.lib.dequantize_bf16.argtypes = [p, p, p, i, i, i, i]
        self.lib.set_num_threads.argtypes = [i]
        f, lg = ctypes.c_float, ctypes.c_long
        self.lib.rms_norm_f32.argtypes = [p, p, i, p, i, i, f]
        self.lib.rotary_f32.argtypes = [p, i, lg, i, i, i, p]
        for name in ("attention_decode_f32", "attention_decode_bf16"):
            getattr(self.lib, name).argtypes = [p, lg, p, p, lg, lg, lg, p, p, i, i, i, i, i, f]
            getattr(self.lib, name).restype = i
        self.lib.silu_mul_f32.argtypes = [p, p, i, i]
        self.lib.greedy_rows.argtypes = [p, lg, i, i, i, p, p]
        self.openmp = bool(self.lib.has_openmp())
        level = self.lib.simd_level()
        self.has_gemm = level >= 5  # the INT8/INT4 GEMM for many rows (gemm) is built with AVX-512 VNNI only
        # AMX int8 tiles: built where the CPU has them (level 6) and granted by Linux (asked here, once)
        self.lib.set_amx.argtypes = [i]
        self.amx = level == 6 and bool(self.lib.gemm_tiles())
        # INT8/INT4 weights in the lanes16 layout (quantization.ops.to_lanes16): the AVX-512 VNNI and AVX2 kernels'
        # own, not AMX builds' (whose tiles read THUDM's layout) nor the portable C's
        self.packed_layout = 2 <= level <= 5
        self._amx_on = None
        self.simd = {
            0: "portable C",
            2: "AVX2+FMA",
            3: "AVX2+FMA+F16C",
            4: "AVX2+FMA+F16C, AVX-512 codegen",
            5: "AVX2+FMA+F16C, AVX-512 VNNI",
            6: "AVX2+FMA+F16C, AVX-512 VNNI, AMX int8",
        }.get(level, "?")
        self._threads = None

    @property
    def gemm_tiles(self) -> bool:
        """Whether the INT8/INT4 kernels (decode, batches, the GEMM) use AMX tiles: this build and process have them
        and settings.cpu_amx holds (CHATGLM_NO_AMX=1 turns them off)."""
        return self.amx and settings.cpu_amx

    def _sync_threads(self):
        n = torch.get_num_threads()  # follow torch's thread count (OMP_NUM_THREADS, set_num_threads)
        if n != self._threads:
            self.lib.set_num_threads(n)
            self._threads = n
        if settings.cpu_amx != self._amx_on:
            self.lib.set_amx(int(settings.cpu_amx))
            self._amx_on = settings.cpu_amx

    @staticmethod
    def _ptr(t):
        return t.data_ptr() if t is not None else None  # ctypes takes a plain int for a c_void_p argument

    def linear(self, x, weight, scale_f32, bits, bias=None, quantize_activations=None, packed=False):
        """x [m, k] float32, weight int8 [n, k] or [n, k/2], scale_f32 [n] -> [m, n] float32.
        quantize_activations: None for the default (QUANTIZE_ACTIVATIONS), True for the int8-activation
        kernel, False for the fp32-activation one. packed: the weight is in the lanes16 layout (packed_layout
        builds; int8 activations; the VNNI build's bits, which THUDM's layout gets there too but not on AVX2)."""
        self._sync_threads()
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        bias = bias.float().contiguous() if bias is not None else None
        if packed:
            rc = self.lib.wq_rows_packed(self._ptr(x), self._ptr(weight), self._ptr(scale_f32), self._ptr(bias),
                                         self._ptr(y), m, n, k, bits)  # fmt: skip
            if rc == -1:
                raise MemoryError("out of memory in the CPU quantized linear kernel")
            if rc:
                raise ValueError(f"no lanes16 kernel for this build or shape ({n} x {k})")
            return y
        if quantize_activations is None:
            quantize_activations = QUANTIZE_ACTIVATIONS[bits] and not settings.cpu_float_activations
        if quantize_activations:
            fn = self.lib.w8_linear if bits == 8 else self.lib.w4_linear
            if fn(self._ptr(x), self._ptr(weight), self._ptr(scale_f32), self._ptr(bias), self._ptr(y), m, n, k):
                raise MemoryError("out of memory in the CPU quantized linear kernel")
        elif bits == 8:
            self.lib.w8_linear_f(self._ptr(x), self._ptr(weight), self._ptr(scale_f32), self._ptr(bias),
                                 self._ptr(y), m, n, k)  # fmt: skip
        else:
            xe, xo = x[:, 0::2].contiguous(), x[:, 1::2].contiguous()
            self.lib.w4_linear_f(self._ptr(xe), self._ptr(xo), self._ptr(weight), self._ptr(scale_f32),
                                 self._ptr(bias), self._ptr(y), m, n, k)  # fmt: skip
        return y

    def gemm(self, x, weight, scale_f32, bits, bias=None, tiles=True):
        """What linear() computes with int8 activations, as a GEMM for many rows (wq_gemm: the same integer sums per
        64-column block, summed over the blocks in another order): x [m, k] float32 -> [m, n] float32, or None
        where this build has no such kernel (has_gemm) or k is not a multiple of 64. On AMX (gemm_tiles) the
        integer sums come from the tiles unless tiles=False (INT4: the same bits either way; INT8 on the tiles sums
        signed bytes, as linear() does there, so each row gets exactly what linear() gives it alone)."""
        self._sync_threads()
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        bias = bias.float().contiguous() if bias is not None else None
        fn = self.lib.wq_gemm if tiles else self.lib.wq_gemm_vnni
        rc = fn(self._ptr(x), self._ptr(weight), self._ptr(scale_f32), self._ptr(bias), self._ptr(y), m, n, k, bits)
        if rc == -1:
            raise MemoryError("out of memory in the CPU quantized GEMM kernel")
        return None if rc else y

    def float_linear(self, x, weight, bias=None):
        """x [m, k] float32, weight bf16, fp16 or fp32 [n, k] (contiguous), bias [n] or None -> [m, n] float32,
        accumulated in fp32, each row of x in one fixed order whatever m is (a row's bits do not depend on the
        rows beside it)."""
        wtype = WEIGHT_TYPES.get(weight.dtype)
        if wtype is None:
            raise TypeError(f"float_linear takes bf16, fp16 or fp32 weights, not {weight.dtype}")
        self._sync_threads()
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        bias = bias.float().contiguous() if bias is not None else None
        if self.lib.float_linear(self._ptr(x), self._ptr(weight), self._ptr(bias), self._ptr(y), m, n, k, wtype):
            raise MemoryError("out of memory in the CPU float_linear kernel")
        return y

    # --- decode helpers: fp32 activations on the CPU, one call where PyTorch runs several small ops ---------

    def rms_norm(self, x, weight, eps):
        """x [..., n] fp32 contiguous, weight [n] fp32/bf16/fp16 contiguous -> x * rsqrt(mean(x^2) + eps) * w."""
        n = x.shape[-1]
        y = torch.empty_like(x)
        wtype = WEIGHT_TYPES[weight.dtype]
        self.lib.rms_norm_f32(x.data_ptr(), weight.data_ptr(), wtype, y.data_ptr(), x.numel() // n, n, eps)
        return y

    def rotary_(self, x, rows, row_stride, heads, head_dim, cos_sin):
        """Rotate the first 2 * cos_sin.shape[-2] dims of `heads` heads of each row of x, in place: x is a
        contiguous fp32 buffer of `rows` rows `row_stride` floats apart, cos_sin [rows, rot/2, 2] contiguous."""
        rot = cos_sin.shape[-2] * 2
        self.lib.rotary_f32(x.data_ptr(), rows, row_stride, heads, head_dim, rot, cos_sin.data_ptr())
        return x

    def attention_decode(self, q, k, v, heads, scale, lengths=None):
        """One query per head: q [b, ...] whose rows hold heads * d contiguous elements (row stride q.stride(0));
        k, v [b, groups, T, d] with d contiguous and equal strides; all fp32 or all bf16 (read as they are,
        computed in fp32) -> fp32 [b, heads * d]. lengths: int32 [b], row r attending to its first lengths[r] keys
        (None: all T); each row's result is the same whatever rows share the call."""
        b, groups, t, d = k.shape
        if v.stride() != k.stride() or k.stride(-1) != 1:
            raise ValueError("attention_decode needs k and v with the same strides and contiguous rows")
        if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"attention_decode needs q, k, v all fp32 or all bf16, not {q.dtype}, {k.dtype}, "
                             f"{v.dtype}")  # fmt: skip
        if lengths is not None and (lengths.dtype != torch.int32 or lengths.shape != (b,)):
            raise ValueError(f"attention_decode needs int32 lengths of shape ({b},)")
        self._sync_threads()
        out = torch.empty(b, heads * d, dtype=torch.float32)
        sb, sg, st, _ = k.stride()
        lens = None if lengths is None else lengths.contiguous()
        fn = self.lib.attention_decode_f32 if q.dtype == torch.float32 else self.lib.attention_decode_bf16
        if fn(q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), sb, sg, st, self._ptr(lens), out.data_ptr(), b,
              heads, groups, t, d, scale):  # fmt: skip
            raise MemoryError("out of memory in the CPU decode attention kernel")
        return out

    def silu_mul(self, h):
        """h [..., 2f] fp32 contiguous ([gate | up]) -> silu(gate) * up [..., f]."""
        f = h.shape[-1] // 2
        out = torch.empty(*h.shape[:-1], f, dtype=torch.float32)
        self.lib.silu_mul_f32(h.data_ptr(), out.data_ptr(), h.numel() // (2 * f), f)
        return out

    def greedy(self, scores, limit=None):
        """scores [b, n] fp32 with contiguous rows -> (ids, finite): per row the index torch.argmax gives over its
        first `limit` columns (default all; the first maximum, or the first NaN) and whether all n are finite."""
        b, n = scores.shape
        limit = n if limit is None else min(limit, n)
        if scores.dtype != torch.float32 or (n > 1 and scores.stride(1) != 1):
            raise ValueError("greedy needs fp32 scores with contiguous rows")
        out = torch.empty(2, b, dtype=torch.int32)
        self.lib.greedy_rows(scores.data_ptr(), scores.stride(0), b, n, limit, out[0].data_ptr(), out[1].data_ptr())
        ids, finite = out.tolist()
        return ids, [bool(f) for f in finite]

    def quantize_activations(self, x, split):
        """The q kernels' activation quantization, for tests: x [m, k] float32 -> (int8 [m, nb * 64],
        fp32 scales [m, nb]); with split each 64-column block is stored as its even then its odd columns."""
        m, k = x.shape
        nb = (k + QBLOCK - 1) // QBLOCK
        q = torch.empty(m, nb * QBLOCK, dtype=torch.int8)
        d = torch.empty(m, nb, dtype=torch.float32)
        self.lib.quantize_activations(self._ptr(x), self._ptr(q), self._ptr(d), m, k, int(split))
        return q, d

    def unpack_int4(self, packed):
        n, h = packed.shape
        out = torch.empty(n, 2 * h, dtype=torch.int8)
        self.lib.unpack_int4(self._ptr(packed.contiguous()), self._ptr(out), n, 2 * h)
        return out

    def dequantize(self, weight, scale_f32, bits):
        self._sync_threads()
        n = weight.shape[0]
        k = weight.shape[1] * (2 if bits == 4 else 1)
        out = torch.empty(n, k, dtype=torch.float32)
        self.lib.dequantize(self._ptr(weight.contiguous()), self._ptr(scale_f32), self._ptr(out), n, k, bits)
        return out

    def dequantize_bf16(self, weight, scale_f32, bits, start=0, stop=None, out=None):
        """Rows [start, stop) of a quantized weight (contiguous) as bf16 [stop - start, k], rounded to nearest
        even; `out` (bf16, at least that many elements) is reused when given."""
        self._sync_threads()
        stop = weight.shape[0] if stop is None else stop
        k = weight.shape[1] * (2 if bits == 4 else 1)
        shape = (stop - start, k)
        out = torch.empty(shape, dtype=torch.bfloat16) if out is None else out.view(-1)[: shape[0] * k].view(shape)
        self.lib.dequantize_bf16(self._ptr(weight), self._ptr(scale_f32), self._ptr(out), start, stop, k, bits)
        return out


WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build_cpu_kernel(isa: str = "native") -> CpuKernel | None:
    """A fresh (uncached in-process) build for `isa` ("native", "avx2", "portable"). For tests and benchmarks;
    the model uses get_cpu_kernel(), built for cpu_isa()."""
    cc = _compiler()
    path = _build(cc, isa) if cc else None
    return CpuKernel(path, isa) if path else None


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime libraries mapped into this process (Linux): one is right; two would mean ours and
    torch's each run their own thread pool."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    names = ("libgomp", "libiomp", "libomp")
    return sorted(p for p in paths if os.path.basename(p).startswith(names))


def release_openmp_threads() -> int:
    """Hand back the calling thread's OpenMP worker threads (omp_pause_resource_all(omp_pause_soft) in each runtime
    loaded; its next parallel region starts new ones). GNU libgomp spins its idle workers only while the process
    has no more OpenMP threads than CPUs, so the worker threads left by the thread that loaded a model (the main
    thread) make every parallel region of another thread that runs the model (the engine's) wake its workers
    through the kernel instead: measured on a Zen 4 with 2 cores, torch's element-wise ops ran at one core's speed
    from the engine thread (20 silu + sum over 8 x 54784 floats: 5.5-6.3 ms, against 3.0-3.2 from the main thread)
    and at full speed once the main thread had called this (3.0-3.4 ms). Returns how many runtimes did."""
    done = 0
    for path in openmp_runtimes():
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):  # an OpenMP runtime before 5.0: nothing to do
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        done += pause(1) == 0  # omp_pause_soft
    return done


def cpu_fast_paths() -> bool:
    """settings.cpu_kernels (off with CHATGLM_NO_CPU_KERNEL=1): off, the kernels and every CPU fast path are
    off (the original's paths, for comparison)."""
    return settings.cpu_kernels


_native_half: dict = {}


def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix instructions for `dtype` (bf16: AVX512-BF16/AMX/ARM BF16; fp16: AVX512-FP16,
    AMX-FP16, ARM FP16). Without them torch's half-precision CPU GEMM is emulated and several times slower than
    fp32: prefill then goes through our kernels, and the activations are computed in fp32. Kept in a plain dict
    (not functools.cache): torch.compile then reads the answer that eager code found, not /proc/cpuinfo."""
    hit = _native_half.get(dtype)
    if hit is None:
        hit = _native_half[dtype] = _read_native_half(dtype)
    return hit


def _read_native_half(dtype: torch.dtype) -> bool:
    if cpu_isa() != "native":  # CHATGLM_CPU_ISA=avx2/portable: behave as a CPU without such instructions
        return dtype == torch.float32
    flags = cpu_flags()
    if not flags:
        return platform.machine().lower() in ("arm64", "aarch64")  # Apple silicon has bf16/fp16 units
    if dtype == torch.bfloat16:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if dtype == torch.float16:
        return bool(flags & {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"})
    return True


def get_cpu_kernel() -> CpuKernel | None:
    """The compiled CPU kernels, or None (the PyTorch reference is then used). Set CHATGLM_NO_CPU_KERNEL=1
    to force the fallback. While torch.compile traces, the same kernels as PyTorch operators
    (kernels/torch_ops.py): a ctypes call cannot be part of a compiled graph, an operator can."""
    global _cpu_kernel, _cpu_tried
    if torch.compiler.is_compiling():
        return torch_ops.COMPILED if _cpu_kernel is not None and torch_ops.registered else None
    if _cpu_tried:
        return _cpu_kernel
    with _lock:
        if _cpu_tried:
            return _cpu_kernel
        _cpu_tried = True
        if not cpu_fast_paths():
            return None
        cc = _compiler()
        if cc is None:
            logger.warning(
                "gcc was not found, so the fast CPU INT8/INT4 kernels cannot be built; using the slower PyTorch "
                "fallback (install gcc, e.g. `apt-get install gcc`, to get them)"
            )
            return None
        try:
            path = _build(cc, cpu_isa())
            _cpu_kernel = CpuKernel(path, cpu_isa()) if path else None
        except OSError as e:
            logger.warning("could not load the CPU quantization kernels (%s); using the PyTorch fallback", e)
            _cpu_kernel = None
        return _cpu_kernel
