"""Loading through transformers' Auto classes, offline, and the clear errors for bad input."""

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch

import chatglm  # noqa: F401  (registers the Auto classes)
from chatglm import ChatGLMConfig, load_model, load_tokenizer
from chatglm.tiny import make_tiny_checkpoint
from kernels.settings import settings

from .conftest import real_model_dir


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_model_card_code_runs_offline(tiny_dirs, version, monkeypatch):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tiny_dirs[version]
    before = _digest(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).float().eval()
    assert model.config.chatglm_version == version == tokenizer.chatglm_version
    response, history = model.chat(tokenizer, "你好", history=[], max_length=40)
    assert isinstance(response, str) and len(history) >= 1
    for response, history in model.stream_chat(tokenizer, "晚上睡不着应该怎么办", history=history, max_length=80):
        pass
    # trust_remote_code=True, as users copy from the original README, runs our code too
    again = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)
    assert type(again) is type(model)
    assert type(AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)) is type(tokenizer)
    assert model.quantize(0) is model  # the original chain .quantize(bits).half() keeps working
    assert _digest(path) == before  # the checkpoint directory is left untouched


def test_auto_map_pointing_at_missing_files_is_fine(tiny_dirs):
    cfg = json.loads((tiny_dirs["v2"] / "config.json").read_text())
    assert "auto_map" in cfg and not (tiny_dirs["v2"] / "modeling_chatglm.py").exists()


def test_real_configs_load(tmp_path):
    from transformers import AutoConfig

    for version in ("v1", "v2", "v3"):
        config = AutoConfig.from_pretrained(str(real_model_dir(version)), trust_remote_code=True)
        assert isinstance(config, ChatGLMConfig) and config.chatglm_version == version
        config.save_pretrained(tmp_path / version)
        saved = json.loads((tmp_path / version / "config.json").read_text())
        original = json.loads((real_model_dir(version) / "config.json").read_text())
        for key, value in original.items():  # every original field is written back, same value
            if key not in ("transformers_version", "_name_or_path"):  # transformers sets the load path
                assert saved.get(key) == value, (version, key)


def test_version_override_and_rule(tiny_dirs, monkeypatch):
    assert load_tokenizer(str(tiny_dirs["v3"]), chatglm_version="v2").chatglm_version == "v2"
    monkeypatch.setattr(settings, "version", "v2")  # CHATGLM_VERSION
    assert ChatGLMConfig.from_checkpoint(str(tiny_dirs["v3"])).chatglm_version == "v2"


def test_safetensors_single_file(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path / "st"), "v2", fmt="safetensors", shards=1)
    assert (tmp_path / "st" / "model.safetensors").is_file()
    model = load_model(path, dtype="bf16")
    assert model.dtype == torch.bfloat16


def test_tiny_tool_is_deterministic(tmp_path):
    a = make_tiny_checkpoint(str(tmp_path / "a"), "v1", seed=7)
    b = make_tiny_checkpoint(str(tmp_path / "b"), "v1", seed=7)
    ma, mb = load_model(a, dtype=torch.float32), load_model(b, dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert (tmp_path / "a" / "ice_text.model").read_bytes() == (tmp_path / "b" / "ice_text.model").read_bytes()


def test_missing_directory(tiny_dirs):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("no/such/dir")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer("no/such/dir")
    config = str(tiny_dirs["v2"] / "config.json")  # a file given where a directory belongs: said so, not "missing"
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        load_model(config)
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        load_tokenizer(config)


def test_missing_tokenizer_file(tiny_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["v2"], broken)
    (broken / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(str(broken))


def test_unknown_config(tiny_dirs, tmp_path):
    broken = tmp_path / "unknown"
    shutil.copytree(tiny_dirs["v2"], broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "chatglm", "hidden_size": 8}))
    with pytest.raises(ValueError, match="not a ChatGLM"):
        load_model(str(broken))
    with pytest.raises(ValueError, match="chatglm_version"):
        ChatGLMConfig.from_checkpoint(str(tiny_dirs["v2"]), chatglm_version="v9")


def test_no_weights_and_missing_shard(tiny_dirs, tmp_path):
    broken = tmp_path / "noweights"
    shutil.copytree(tiny_dirs["v2"], broken)
    for f in broken.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(str(broken))
    shutil.copy(tiny_dirs["v2"] / "pytorch_model.bin.index.json", broken)
    with pytest.raises(FileNotFoundError, match="missing: pytorch_model-00001-of-00002.bin, pytorch_model-00002"):
        load_model(str(broken))  # in order


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_tiny_checkpoint_has_the_shards_asked_for(tmp_path, version):
    """--shards N writes N weight files (the greedy split by a size limit of total / N could make N + 1), and the
    checkpoint loads the same whatever the count."""
    want = None
    for n in (1, 2, 3):
        path = make_tiny_checkpoint(str(tmp_path / f"{version}-{n}"), version, shards=n)
        files = sorted(p for p in os.listdir(path) if p.startswith("pytorch_model") and p.endswith(".bin"))
        assert len(files) == n, files
        state = load_model(path, dtype=torch.float32).state_dict()
        want = want or state
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in state)
    with pytest.raises(ValueError, match="num_shards"):
        make_tiny_checkpoint(str(tmp_path / "none"), version, shards=0)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_shard(tmp_path, fmt):
    path = tmp_path / fmt
    make_tiny_checkpoint(str(path), "v2", fmt=fmt, shards=2)
    shard = sorted(p for p in path.iterdir() if p.name.startswith(("pytorch_model-", "model-")))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="truncated"):
        load_model(str(path))


def test_checkpoint_not_matching_config(tiny_dirs, tmp_path):
    broken = tmp_path / "mismatch"
    shutil.copytree(tiny_dirs["v2"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="missing weights"):
        load_model(str(broken))


def test_release_free_heap_hands_freed_heap_blocks_back_to_the_system():
    """What loading frees (tensors of a few MiB, kept by glibc in its heap once its mmap threshold has grown) leaves
    the resident set when settle_on_cpu releases the free heap."""
    import ctypes.util

    from chatglm.loading import release_free_heap

    if not sys.platform.startswith("linux") or "libc.so" not in (ctypes.util.find_library("c") or ""):
        pytest.skip("glibc only")

    def resident_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    big = torch.ones(24 << 18)  # 24 MiB, mmapped; freeing it raises glibc's mmap threshold past the blocks below
    del big
    blocks = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MiB, in the heap now
    pin = torch.ones(1 << 16)  # above them in the heap: free() alone cannot trim the heap's top
    held = resident_mib()
    del blocks
    freed = resident_mib()
    assert release_free_heap()
    after = resident_mib()
    assert held - after > 128, (held, freed, after)  # most of the 256 MiB went back
    del pin
