import os
from pathlib import Path

import pytest

os.environ.setdefault("CHATGLM_NO_PROGRESS", "1")
# torch 2.13's inductor cache does not key its kernels on the vector ISA that ATEN_CPU_CAPABILITY picks: a run
# capped at avx2 reuses AVX-512 code built by an uncapped run and overflows its 8-lane vectors. One cache per cap.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    import tempfile

    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR",
        os.path.join(tempfile.gettempdir(), f"torchinductor-{os.getuid()}-{os.environ['ATEN_CPU_CAPABILITY']}"),
    )

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "data" / "golden"
SHARED_MODELS = Path(os.environ.get("CHATGLM_SHARED_MODELS", REPO.parent / "shared" / "models"))
REAL = {"v1": "chatglm-6b", "v2": "chatglm2-6b", "v3": "chatglm3-6b"}


def real_model_dir(version: str) -> Path:
    path = SHARED_MODELS / REAL[version]
    if not (path / "config.json").is_file():
        pytest.skip(f"real release files not found at {path} (set CHATGLM_SHARED_MODELS)")
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny random checkpoints in the original layout, one per generation (built once per session)."""
    from chatglm.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {v: Path(make_tiny_checkpoint(str(root / v), v)) for v in ("v1", "v2", "v3")}


@pytest.fixture(scope="session")
def tiny(tiny_dirs):
    """(model, tokenizer) per generation, fp32, eval mode."""
    import torch

    import chatglm

    out = {}
    for v, d in tiny_dirs.items():
        out[v] = (chatglm.load_model(str(d), dtype=torch.float32), chatglm.load_tokenizer(str(d)))
    return out


@pytest.fixture(autouse=True)
def _tiny_models_leave_without_an_engine(request):
    """The session's tiny models are shared: an engine a test's app attached (chatglm/engine.py; a Flask app has
    no shutdown hook to take it off) must not change how the next test's model generates."""
    yield
    if "tiny" in request.fixturenames:
        from chatglm.engine import detach

        for model, _ in request.getfixturevalue("tiny").values():
            detach(model)
