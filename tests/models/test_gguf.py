"""Local GGUF files load wherever a model name is accepted, converted once into a content-keyed cache.

The file is the real SmolLM2-135M-Instruct Q4_1 GGUF of the offline package; its zoo entry (`smollm2-135m`)
converts the same file with the same code, so both must give the very same weights. KVDISTILL_HOME points at
one temporary directory for the whole session (`gguf_home`, also used by tests/test_cli.py): the conversion
(about 30 s on 2 cores) happens once and the user's cache is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from kvdistill import capture_kv, load_model
from kvdistill.config import check_config
from kvdistill.errors import KvdistillError
from kvdistill.models import gguf, zoo
from kvdistill.models.load import load_config, load_tokenizer, resolve_path

pytestmark = pytest.mark.slow
TEXTS = ["Question: 3 apples and 4 pears, how many fruits?\nAnswer: 7", "Ünïcode ✓ 数学 🙂 ok"]


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    return zoo._gguf_source(zoo.ZOO["smollm2-135m"])


@pytest.fixture(scope="session")
def gguf_home(tmp_path_factory) -> Path:
    """The session's KVDISTILL_HOME (the same path in tests/test_cli.py, so the file converts once)."""
    return tmp_path_factory.getbasetemp() / "kvdistill_home"


@pytest.fixture(scope="session")
def gguf_model(gguf_file, gguf_home):
    """(model, tokenizer) of the GGUF file, converted here once for the session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVDISTILL_HOME", str(gguf_home))
        return load_model(str(gguf_file))


@pytest.fixture(autouse=True)
def _home(gguf_home, monkeypatch):
    monkeypatch.setenv("KVDISTILL_HOME", str(gguf_home))


@pytest.fixture
def no_conversion(monkeypatch):
    """Any call of the converter fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError(f"converted again: {args}")

    monkeypatch.setattr(gguf, "convert", fail)


def _logits(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits  # (B, T, V)


def test_gguf_file_loads_with_the_zoo_weights(gguf_model, smollm2, gguf_file, gguf_home):
    model, tokenizer = gguf_model
    assert model.config.name_or_path == str(gguf_file)
    assert torch.equal(_logits(model, tokenizer), _logits(*smollm2))
    assert tokenizer(TEXTS[1])["input_ids"] == smollm2[1](TEXTS[1])["input_ids"]
    target = Path(resolve_path(gguf_file))
    stamp = gguf.read_stamp(target)
    digest = gguf.sha256_of(gguf_file)
    assert target == gguf_home / "gguf-converted" / digest[:16]
    assert stamp == {
        "source": str(gguf_file.resolve()),
        "size": gguf_file.stat().st_size,
        "sha256": digest,
        "conversion_version": gguf.CONVERSION_VERSION,
    }


def test_second_load_neither_converts_nor_hashes(gguf_model, gguf_file, no_conversion, monkeypatch):
    target = Path(resolve_path(gguf_file))
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(gguf, "sha256_of", lambda path: pytest.fail(f"hashed {path} again"))
    start = time.perf_counter()
    assert load_config(str(gguf_file)).num_hidden_layers == 30
    assert load_tokenizer(str(gguf_file)).is_fast
    assert time.perf_counter() - start < 10  # about a second; loose for 2 shared cores
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime


def test_directory_holding_one_gguf_loads_the_same(gguf_model, gguf_file, tmp_path, no_conversion):
    # the package directory itself (GGUF next to __init__.py) and a directory with only a link to the file
    (tmp_path / gguf_file.name).symlink_to(gguf_file)
    assert resolve_path(gguf_file.parent) == resolve_path(tmp_path) == resolve_path(gguf_file)
    model, tokenizer = load_model(str(tmp_path))
    assert torch.equal(_logits(model, tokenizer), _logits(*gguf_model))


def test_changed_file_is_hashed_and_keyed_again(gguf_file, tmp_path, monkeypatch):
    copy = tmp_path / "copy.gguf"
    shutil.copy(gguf_file, copy)
    root = tmp_path / "root"
    hashed = []
    real = gguf.sha256_of
    monkeypatch.setattr(gguf, "sha256_of", lambda path: hashed.append(path) or real(path))
    first = gguf.content_hash(copy, root)
    assert gguf.content_hash(copy, root) == first and len(hashed) == 1  # remembered by size and mtime
    stat = copy.stat()
    with copy.open("r+b") as f:  # one byte of the last tensor's data changed, size kept
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = gguf.content_hash(copy, root)
    assert changed != first and len(hashed) == 2
    assert gguf.read_stamp(root / changed[:16]) is None  # a new key: converted again on the next load


def test_truncated_gguf_names_the_file_and_the_fix(gguf_file, gguf_home, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    with pytest.raises(KvdistillError, match="truncated or corrupt") as err:
        load_model(str(cut))
    assert str(cut) in err.value.problem and "not a readable GGUF file" in err.value.problem
    assert "download it again" in err.value.fix
    assert not list((gguf_home / "gguf-converted").glob(".*"))  # nothing half-written left behind
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model")
    with pytest.raises(KvdistillError, match="not the GGUF magic"):
        load_config(str(junk))
    with pytest.raises(KvdistillError, match="model path 'missing.gguf' does not exist"):
        load_config("missing.gguf")


def test_directory_with_two_gguf_files_lists_both(gguf_file, tmp_path):
    for name in ("a.Q4_1.gguf", "b.Q8_0.gguf"):
        (tmp_path / name).symlink_to(gguf_file)
    with pytest.raises(KvdistillError, match=r"holds 2 GGUF files: a\.Q4_1\.gguf, b\.Q8_0\.gguf") as err:
        load_model(str(tmp_path))
    assert "pass one of them as a file path" in err.value.fix


def test_concurrent_loads_convert_once(tmp_path, monkeypatch):
    source = tmp_path / "fake.gguf"
    source.write_bytes(gguf.MAGIC + b"\0" * 64)
    calls = []

    def slow_convert(src, target, stamp):
        calls.append(src)
        time.sleep(0.3)
        target.mkdir()
        (target / gguf.STAMP).write_text(json.dumps({**stamp, "conversion_version": gguf.CONVERSION_VERSION}))

    monkeypatch.setattr(gguf, "convert", slow_convert)
    root = tmp_path / "root"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(gguf.converted_dir(source, root))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4


def test_capture_kv_on_the_gguf_model(gguf_model, smollm2):
    cap = capture_kv(*gguf_model, TEXTS)
    ref = capture_kv(*smollm2, TEXTS)
    assert len(cap.keys) == len(ref.keys) == 30
    assert cap.keys[0].shape == ref.keys[0].shape == (2, 3, ref.input_ids.shape[1], 64)  # (B, H_kv, T, D)
    for k, k_ref, v, v_ref in zip(cap.keys, ref.keys, cap.values, ref.values, strict=True):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_run_config_with_a_gguf_teacher_validates(gguf_model, gguf_file):
    raw = {
        "name": "gguf",
        "student": {
            "from_config": {
                "base": str(gguf_file),
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 32,
            }
        },
        "teachers": [{"model": str(gguf_file)}],
        "data": {"source": "gsm_symbolic", "size": 12, "eval_size": 0, "max_length": 32},
    }
    config, problems = check_config(raw)
    assert problems == [] and config is not None
    assert config.teachers[0].name == "SmolLM2-135M-Instruct_Q4_1_gguf"
