"""Saves that cannot leave a mixed checkpoint, and inputs on disk checked before they are trusted (issue 22)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import chatglm
from chatglm.atomic import replacing_directory

from .conftest import REPO


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def two_models(tiny_dirs):
    """Two v2 models of the same shape with different weights."""
    old = chatglm.load_model(str(tiny_dirs["v2"]), dtype=torch.float32)
    new = chatglm.load_model(str(tiny_dirs["v2"]), dtype=torch.float32)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    return old, new


def _shard_limit(model, shards=4):
    return sum(v.numel() * v.element_size() for v in model.state_dict().values()) // shards + 1


def test_interrupted_save_leaves_the_old_checkpoint(two_models, tmp_path, monkeypatch):
    old, new = two_models
    target = tmp_path / "ckpt"
    old.save_pretrained(target, max_shard_size=_shard_limit(old), safe_serialization=False)
    (target / "tokenizer.model").write_bytes(b"kept")  # a file of the checkpoint that the save does not write
    assert len(list(target.glob("pytorch_model-*.bin"))) == 4
    before = _state(chatglm.load_model(str(target), dtype=torch.float32))

    real_save, calls = torch.save, []

    def dies_after_one_shard(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after the first shard")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dies_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(target, max_shard_size=_shard_limit(new), safe_serialization=False)
    monkeypatch.undo()
    assert _same(_state(chatglm.load_model(str(target), dtype=torch.float32)), before)  # the old one, whole
    assert (target / "tokenizer.model").read_bytes() == b"kept"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the half-written directory is gone

    new.save_pretrained(target, max_shard_size=_shard_limit(new), safe_serialization=False)
    assert _same(_state(chatglm.load_model(str(target), dtype=torch.float32)), _state(new))  # the new one, whole
    assert (target / "tokenizer.model").read_bytes() == b"kept"


def test_killed_save_leaves_the_old_checkpoint(two_models, tmp_path):
    """A real kill (no Python cleanup at all) in the middle of the shards."""
    old, new = two_models
    target = tmp_path / "ckpt"
    old.save_pretrained(target, max_shard_size=_shard_limit(old))
    before = _state(chatglm.load_model(str(target), dtype=torch.float32))
    torch.save(new.state_dict(), tmp_path / "new.pt")
    script = f"""
import os, sys, torch, safetensors.torch as st
sys.path.insert(0, {str(REPO)!r})
import chatglm
model = chatglm.load_model({str(target)!r}, dtype=torch.float32)
model.load_state_dict(torch.load({str(tmp_path / "new.pt")!r}))
real, n = st.save_file, []
def save_file(*a, **kw):
    n.append(1)
    if len(n) == 2:
        os._exit(9)  # as if killed: no finally blocks, no cleanup
    return real(*a, **kw)
st.save_file = save_file
model.save_pretrained({str(target)!r}, max_shard_size={_shard_limit(new)})
"""
    assert subprocess.run([sys.executable, "-c", script], timeout=300).returncode == 9
    assert _same(_state(chatglm.load_model(str(target), dtype=torch.float32)), before)


def test_saving_bin_over_safetensors_replaces_the_weights(two_models, tmp_path):
    old, new = two_models
    target = tmp_path / "ckpt"
    old.save_pretrained(target, max_shard_size=_shard_limit(old), safe_serialization=True)
    new.save_pretrained(target, max_shard_size=_shard_limit(new), safe_serialization=False)
    names = sorted(p.name for p in target.iterdir())
    assert not [n for n in names if "safetensors" in n], names  # the other format's shards and index are gone
    assert _same(_state(chatglm.load_model(str(target), dtype=torch.float32)), _state(new))


def test_two_disagreeing_weight_sets_are_an_error(two_models, tmp_path):
    old, new = two_models
    a, b = tmp_path / "a", tmp_path / "b"
    old.save_pretrained(a, max_shard_size=_shard_limit(old), safe_serialization=True)
    new.save_pretrained(b, max_shard_size=_shard_limit(new), safe_serialization=False)
    for f in b.glob("pytorch_model*"):
        shutil.copy(f, a / f.name)
    with pytest.raises(ValueError, match=r"two different weight sets, model.safetensors.index.json and "
                       r"pytorch_model.bin.index.json \('.*' differs\): remove the stale one"):  # fmt: skip
        chatglm.load_model(str(a), dtype=torch.float32)
    # the same weights in both formats (as THUDM's chatglm3-6b ships them) load
    c = tmp_path / "c"
    old.save_pretrained(c, max_shard_size=_shard_limit(old), safe_serialization=False)
    for f in c.glob("pytorch_model*"):
        shutil.copy(f, a / f.name)
    assert _same(_state(chatglm.load_model(str(a), dtype=torch.float32)), _state(old))


def test_tiny_refuses_a_non_empty_directory(tmp_path, tiny_dirs):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["v2"], out)
    before = sorted(p.name for p in out.iterdir())
    run = [sys.executable, "-m", "chatglm.tiny", "--version", "v1", "--out", str(out)]
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in out.iterdir()) == before
    proc = subprocess.run(run + ["--force"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "ice_text.model" in names and "tokenizer.model" not in names  # replaced whole: nothing of the v2 left
    assert chatglm.load_model(str(out)).config.chatglm_version == "v1"


def test_tiny_refuses_the_current_directory_a_file_and_no_shards(tmp_path):
    """--force replaces OUT whole: never the directory the user stands in (or one above it), nor a file."""
    here = tmp_path / "work"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    cases = [(["--out", ".", "--force"], "holds the current directory"),
             (["--out", str(tmp_path), "--force"], "holds the current directory"),
             (["--out", "notes.txt"], "is a file, not a directory"),
             (["--out", "new", "--shards", "0"], "--shards must be at least 1")]  # fmt: skip
    for args, says in cases:
        proc = subprocess.run([sys.executable, "-m", "chatglm.tiny", *args], cwd=here, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert says in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in here.iterdir()) == ["notes.txt"] and (here / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text, cfg: text[: len(text) // 2], r"config.json: not valid JSON \(.* at line \d+ column \d+\)"),
        (lambda text, cfg: json.dumps([cfg]), r"config.json: expected a JSON object \{\.\.\.\}, found a list"),
        (lambda text, cfg: json.dumps(dict(cfg, num_layers="two")), r"'num_layers' must be a positive integer, got 'two'"),
        (lambda text, cfg: json.dumps(dict(cfg, num_layers=1e9)), r"'num_layers' must be a positive integer, got 1000000000.0"),
        (lambda text, cfg: json.dumps(dict(cfg, num_layers=-2)), r"'num_layers' must be a positive integer"),
        (lambda text, cfg: json.dumps(dict(cfg, num_layers=10**9)), r"config.json: its sizes \(num_layers=1000000000, .* more than its weight files"),
        (lambda text, cfg: json.dumps(dict(cfg, hidden_size=2**20)), r"more than its weight files"),
        (lambda text, cfg: json.dumps(dict(cfg, quantization_bit=3)), r"'quantization_bit' must be 0, 4 or 8"),
        (lambda text, cfg: json.dumps(dict(cfg, chatglm_version="v9")), r"'chatglm_version' must be one of v1, v2, v3, got 'v9'"),
    ],
)  # fmt: skip
def test_broken_config_json_says_which_file_and_why(tiny_dirs, tmp_path, edit, message):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["v2"], d)
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(edit(text, json.loads(text)))
    with pytest.raises(ValueError, match=message) as info:
        chatglm.load_model(str(d))
    assert str(d / "config.json") in str(info.value)


def test_weight_index_pointing_outside_is_refused(tiny_dirs, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dirs["v2"], d)
    (tmp_path / "other").mkdir()
    index_file = d / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    first = next(iter(index["weight_map"]))
    shutil.copy(d / index["weight_map"][first], tmp_path / "other" / "stolen.bin")
    for bad in ("../other/stolen.bin", str(tmp_path / "other" / "stolen.bin")):
        index["weight_map"][first] = bad
        index_file.write_text(json.dumps(index))
        with pytest.raises(ValueError, match="outside the checkpoint directory"):
            chatglm.load_model(str(d))


def test_replacing_directory_keeps_or_replaces_whole(tmp_path):
    target = tmp_path / "out"
    (target / "checkpoint-1").mkdir(parents=True)
    (target / "checkpoint-1" / "state.json").write_text("1")
    (target / "weights.bin").write_text("old")
    (target / "notes.txt").write_text("kept")
    with pytest.raises(RuntimeError), replacing_directory(target) as tmp:
        (open(os.path.join(tmp, "weights.bin"), "w")).write("new")
        raise RuntimeError("the write failed")
    assert (target / "weights.bin").read_text() == "old" and (target / "checkpoint-1" / "state.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with replacing_directory(target, keep=lambda name: name != "notes.txt") as tmp:
        with open(os.path.join(tmp, "weights.bin"), "w") as f:
            f.write("new")
    assert (target / "weights.bin").read_text() == "new"
    assert (target / "checkpoint-1" / "state.json").read_text() == "1"  # subdirectories carried over
    assert not (target / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
