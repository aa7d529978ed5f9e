"""The swappable operations (chatglm/layers.py) and the settings object (kernels/settings.py).

Each kernel module against its torch reference, inside the kernel's domain (fp32 CPU inference) and outside it
(where it must run the reference itself); the swap on whole models; the settings read once from the environment
and changed by tests. The C functions themselves are tested against float64 in tests/test_kernels.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import chatglm
import kernels
from chatglm import layers
from chatglm.kv_cache import KVCache
from kernels.settings import ENVIRONMENT, Settings, settings

needs_kernel = pytest.mark.skipif(kernels.get_cpu_kernel() is None, reason="the CPU kernels could not be built here")
G = torch.Generator().manual_seed(0)


def _pair(reference_cls, *args):
    """A reference module and its kernel version with the same parameters."""
    ref = reference_cls(*args)
    for p in ref.parameters():
        torch.nn.init.normal_(p, generator=G)
    fast = reference_cls(*args)
    fast.load_state_dict(ref.state_dict())
    return ref, layers.use_kernels(fast)


def _kernel_spy(monkeypatch):
    """Records each kernel function the modules call."""
    real, calls = kernels.get_cpu_kernel(), []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(layers, "get_cpu_kernel", lambda: Spy())
    monkeypatch.setattr("quantization.ops.get_cpu_kernel", lambda: Spy())  # CpuLinear's fast_linear
    return calls


@needs_kernel
def test_each_kernel_module_equals_its_reference(monkeypatch):
    calls = _kernel_spy(monkeypatch)
    with torch.inference_mode():
        ref, fast = _pair(layers.RMSNorm, 96)
        x = torch.randn(3, 5, 96, generator=G)
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)

        ref, fast = _pair(layers.SwiGLU)
        h = torch.randn(2, 3, 2 * 40, generator=G)
        torch.testing.assert_close(fast(h), ref(h), rtol=1e-5, atol=1e-5)

        # Rotary: q's and k's heads as a view into the projection's rows (v after them), rotated in place.
        b, s, heads, d = 2, 3, 5, 16
        qkv = torch.randn(b, s, (heads + 2) * d, generator=G)
        angles = torch.rand(b, s, d // 4, generator=G) * 40
        rope = torch.stack([angles.cos(), angles.sin()], -1)
        expected = layers.Rotary()(qkv[..., : heads * d].view(b, s, heads, d), rope)
        untouched = qkv[..., heads * d :].clone()
        out = layers.use_kernels(layers.Rotary())(qkv[..., : heads * d].view(b, s, heads, d), rope)
        assert out.data_ptr() == qkv.data_ptr()  # in place
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(qkv[..., heads * d :], untouched)

        # Attention: one query per row, q a view into the projection, k and v strided views of a cache.
        b, heads, groups, t, d = 2, 6, 2, 19, 16
        cache = KVCache.empty(1, t + 7)
        k, v = cache.append(0, torch.randn(b, groups, t, d, generator=G), torch.randn(b, groups, t, d, generator=G))
        qkv = torch.randn(b, 1, (heads + 2 * groups) * d, generator=G)
        q = qkv[..., : heads * d].view(b, 1, heads, d).transpose(1, 2)
        expected = layers.Attention()(q, k, v, None)
        torch.testing.assert_close(layers.use_kernels(layers.Attention())(q, k, v, None), expected, rtol=1e-5,
                                   atol=1e-5)  # fmt: skip

        lin = layers.Linear(64, 24, bias=True).to(torch.bfloat16)
        x = torch.randn(4, 64, generator=G)
        expected = lin(x)
        torch.testing.assert_close(layers.use_kernels(lin)(x), expected, rtol=1e-4, atol=1e-4)
    assert {"rms_norm", "silu_mul", "rotary_", "attention_decode", "float_linear"} <= set(calls)


@needs_kernel
def test_kernel_modules_run_their_reference_outside_the_kernels_domain(monkeypatch):
    """Training (autograd), half-precision activations, a masked or multi-query attention: the reference itself."""
    calls = _kernel_spy(monkeypatch)
    ref, fast = _pair(layers.RMSNorm, 32)
    x = torch.randn(2, 32, generator=G, requires_grad=True)
    assert torch.equal(fast(x), ref(x))  # autograd on
    with torch.inference_mode():
        xb = torch.randn(2, 32, generator=G).bfloat16()
        assert torch.equal(fast(xb), ref(xb))
        q, k, v = (torch.randn(1, 4, n, 8, generator=G) for n in (3, 3, 3))
        attn, fast_attn = layers.Attention(), layers.use_kernels(layers.Attention())
        assert torch.equal(fast_attn(q, k, v, None), attn(q, k, v, None))  # 3 queries: a prompt
        mask = torch.ones(1, 1, 1, 3, dtype=torch.bool)
        assert torch.equal(fast_attn(q[:, :, :1], k, v, mask), attn(q[:, :, :1], k, v, mask))
    assert calls == []


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_models_are_built_with_the_kernel_modules_and_swap_back(tiny_dirs, version):
    model = chatglm.load_model(str(tiny_dirs[version]), dtype="fp32").eval()
    types = {type(m) for m in model.modules()}
    assert layers.CpuLinear in types and layers.CpuAttention in types
    assert layers.Linear not in types and layers.Attention not in types
    if version == "v2":
        assert {layers.CpuRMSNorm, layers.CpuRotary, layers.CpuSwiGLU} <= types
    keys = list(model.state_dict())
    ids = torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fast = model(ids).logits
        layers.use_kernels(model, False)
        types = {type(m) for m in model.modules()}
        assert not types & set(layers.REFERENCES)  # no kernel module is left
        assert list(model.state_dict()) == keys  # names and parameters unchanged
        slow = model(ids).logits
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_settings_off_builds_the_references(tiny_dirs):
    before = settings.cpu_kernels
    with settings.override(cpu_kernels=False):
        model = chatglm.load_model(str(tiny_dirs["v3"]), dtype="bf16").eval()
        x = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
        with torch.inference_mode():
            assert layers.compute_dtype(x) == torch.bfloat16  # no fp32 activations over bf16 weights either
    assert not {type(m) for m in model.modules()} & set(layers.REFERENCES)
    assert settings.cpu_kernels == before  # restored


def test_settings_are_read_from_the_environment_once(monkeypatch, tmp_path):
    for name in ("CHATGLM_NO_CPU_KERNEL", "CHATGLM_NO_TRITON", "CHATGLM_NO_HUGE_PAGES", "CHATGLM_VERSION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHATGLM_CPU_ISA", " AVX2 ")
    monkeypatch.setenv("CHATGLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CHATGLM_NO_HUGE_PAGES", "0")  # "0" is off for every on/off variable
    s = Settings()
    assert s.cpu_isa == "avx2" and s.model_cache == str(tmp_path) and s.huge_pages and s.cpu_kernels
    monkeypatch.setenv("CHATGLM_NO_CPU_KERNEL", "1")
    monkeypatch.setenv("CHATGLM_VERSION", "v1")
    s = Settings()
    assert not s.cpu_kernels and s.version == "v1"
    assert settings.model_cache != str(tmp_path)  # the process's object was read once, at import
    with pytest.raises(TypeError, match="unknown settings: cpu_kernel"):
        with s.override(cpu_kernel=False):
            pass
    with s.override(cpu_kernels=True, version=None):
        assert s.cpu_kernels and s.version is None
    assert not s.cpu_kernels and s.version == "v1"


def test_settings_module_prints_every_setting_and_its_variable():
    env = dict(os.environ, CHATGLM_TRITON_GEMV="1")
    proc = subprocess.run([sys.executable, "-m", "kernels"], capture_output=True, text=True, check=True, env=env)
    assert "Warning" not in proc.stderr, proc.stderr
    out = proc.stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == set(ENVIRONMENT) and "True" in lines["triton_gemv"]
    assert all(ENVIRONMENT[name].split("=")[0].split()[0] in line for name, line in lines.items())
