"""The toolkit's settings: read from the environment once, at import, into one object that code, tests and
benchmarks read and change (`settings.cpu_kernels = False`, or `with settings.override(cpu_kernels=False):`).

It lives in the lowest package (kernels imports nothing of the toolkit) so that every package can read it;
`chatglm.settings` is the same object. A child process reads the environment afresh, so the variables below are
also how a benchmark or a test sets them for a process it starts. `python -m kernels` prints them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os


def _home_cache(*parts: str) -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "chatglm-toolkit", *parts)


def _set(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


@dataclasses.dataclass
class Settings:
    # The C kernels (kernels/quantization_kernels.c) and every CPU fast path: the modules of chatglm/layers.py
    # with a kernel, fp32 activations over half weights. Off: the torch references, as the original computes.
    cpu_kernels: bool = dataclasses.field(default_factory=lambda: not _set("CHATGLM_NO_CPU_KERNEL"))
    # The instruction set the C kernels are built for: native, avx2 or portable (kernels/__init__.py). Read when
    # the kernel library first loads.
    cpu_isa: str = dataclasses.field(
        default_factory=lambda: (os.environ.get("CHATGLM_CPU_ISA") or "native").strip().lower()
    )
    # INT8/INT4 on the CPU with fp32 activations (exact) instead of int8-quantized ones (faster).
    cpu_float_activations: bool = dataclasses.field(default_factory=lambda: _set("CHATGLM_CPU_FLOAT_ACTIVATIONS"))
    # INT8/INT4 layers given enough rows (prefill; quantization/ops.py gemm_min_rows) take a GEMM: our INT8 GEMM
    # where the kernels are built with AVX-512 VNNI (on AMX int8 tiles where the CPU has them), else on a CPU with
    # native bf16 matmuls the weight dequantized to bf16 and torch's GEMM; 2-3x the fused kernel at 512 rows. Off: the
    # fused kernel at every row count, so that a row's result never depends on how many rows share its call (a reply
    # through the engine's chunked prefill and prefix reuse then equals the reply alone bit for bit, as on an AVX2
    # CPU; our GEMM, on AVX-512 VNNI and on AMX tiles, already gives each row the bits the row kernels give it).
    cpu_quantized_gemm: bool = dataclasses.field(default_factory=lambda: not _set("CHATGLM_NO_QUANTIZED_GEMM"))
    # AMX int8 tiles in the INT8/INT4 kernels where the CPU has them (Intel Xeon, Sapphire Rapids and later): the
    # GEMM for prefill, INT8 decode, INT4 batches. Off: the AVX-512 VNNI code (other bits, same precision).
    cpu_amx: bool = dataclasses.field(default_factory=lambda: not _set("CHATGLM_NO_AMX"))
    # INT8/INT4 weights on an AVX-512 VNNI (not AMX) or AVX2 CPU held in the kernels' lanes16 layout
    # (quantization/ops.py) from load on: decode batches 1.2-1.6x faster. state_dict() and saved checkpoints keep
    # THUDM's layout. Off: THUDM's layout in memory too (VNNI: the kernels transpose it as they read, same bits;
    # AVX2: THUDM-layout kernels, whose fp32 sums run in another order).
    cpu_packed_weights: bool = dataclasses.field(default_factory=lambda: not _set("CHATGLM_NO_PACKED_WEIGHTS"))
    # Where the compiled kernel libraries are cached.
    kernel_cache: str = dataclasses.field(
        default_factory=lambda: os.environ.get("CHATGLM_KERNEL_CACHE") or _home_cache("kernels")
    )
    # The Triton INT8/INT4 kernels on CUDA (off: dequantize, then matmul).
    triton: bool = dataclasses.field(default_factory=lambda: not _set("CHATGLM_NO_TRITON"))
    # The Triton GEMV for single-row INT8/INT4 products on CUDA (experimental).
    triton_gemv: bool = dataclasses.field(default_factory=lambda: os.environ.get("CHATGLM_TRITON_GEMV") == "1")
    # CPU weights in transparent huge pages where the kernel offers them.
    huge_pages: bool = dataclasses.field(default_factory=lambda: not _set("CHATGLM_NO_HUGE_PAGES"))
    # A progress bar while loading weights (on a terminal).
    progress: bool = dataclasses.field(default_factory=lambda: os.environ.get("CHATGLM_NO_PROGRESS") is None)
    # Where the built-in tiny models are written.
    model_cache: str = dataclasses.field(default_factory=lambda: os.environ.get("CHATGLM_CACHE") or _home_cache())
    # Force the release a checkpoint is read as (v1, v2, v3) instead of detecting it.
    version: str | None = dataclasses.field(default_factory=lambda: os.environ.get("CHATGLM_VERSION") or None)

    @contextlib.contextmanager
    def override(self, **changes):
        """Change some settings for the duration of a `with` block (tests, benchmarks)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        before = {name: getattr(self, name) for name in changes}
        for name, value in changes.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in before.items():
                setattr(self, name, value)


# Each setting's environment variable, for the documentation and `python -m kernels`.
ENVIRONMENT = {
    "cpu_kernels": "CHATGLM_NO_CPU_KERNEL=1 turns off",
    "cpu_isa": "CHATGLM_CPU_ISA",
    "cpu_float_activations": "CHATGLM_CPU_FLOAT_ACTIVATIONS=1",
    "cpu_quantized_gemm": "CHATGLM_NO_QUANTIZED_GEMM=1 turns off",
    "cpu_amx": "CHATGLM_NO_AMX=1 turns off",
    "cpu_packed_weights": "CHATGLM_NO_PACKED_WEIGHTS=1 turns off",
    "kernel_cache": "CHATGLM_KERNEL_CACHE",
    "triton": "CHATGLM_NO_TRITON=1 turns off",
    "triton_gemv": "CHATGLM_TRITON_GEMV=1",
    "huge_pages": "CHATGLM_NO_HUGE_PAGES=1 turns off",
    "progress": "CHATGLM_NO_PROGRESS (set) turns off",
    "model_cache": "CHATGLM_CACHE",
    "version": "CHATGLM_VERSION",
}

settings = Settings()


def print_settings() -> None:
    """Every setting, its value and the variable that sets it (`python -m kernels`)."""
    for field in dataclasses.fields(settings):
        print(f"{field.name:22} {getattr(settings, field.name)!r:42} {ENVIRONMENT[field.name]}")


if __name__ == "__main__":  # the older command (Python warns first that the package had imported this module)
    print_settings()
