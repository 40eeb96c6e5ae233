"""`kvdistill extract` on the real offline teachers: stored K/V equal the online compression, SIGKILL + rerun
and array parts + merge equal one run, the cache CLI, and training from a cache equal to training online."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kvdistill.cache import CacheReader, merge_parts, samples_from_capture, verify_cache
from kvdistill.cache.extract import extract, plan_batches, run_pipeline
from kvdistill.cache.meta import dataset_records
from kvdistill.config import DataConfig, TeacherConfig, load_config
from kvdistill.errors import CacheError, KvdistillError
from kvdistill.models.capture import capture_kv
from kvdistill.objectives import build_objective, build_teachers
from kvdistill.teachers import answer_query_mask, compress_capture

pytestmark = pytest.mark.slow

GSM = DataConfig(size=6, eval_size=2, max_length=48)
# lines of very different lengths, so batches hold padding and batch composition matters
LINES = [
    "Short.",
    "The teacher reads every record once and keeps its keys and values on disk.",
    "Two plus two is four.",
    "A cache is a directory of safetensors shards with a manifest that lists each complete shard.",
    "Resume after a kill.",
    "Length bucketing puts texts of about the same length in one batch, which wastes less padding.",
    "Hi there",
    "Each array task of a SLURM job writes its own part of the cache.",
    "Merge the parts at the end.",
    "R-KV keeps the tokens that the answer attends to and that are not redundant with the others.",
]
RKV = {"kind": "rkv", "budget": 8}


def teacher(model: str = "smollm2-135m", **compression) -> TeacherConfig:
    return TeacherConfig(model=model, compression=compression or RKV)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> DataConfig:
    path = tmp_path_factory.mktemp("data") / "lines.txt"
    path.write_text("\n".join(LINES) + "\n")
    return DataConfig(source="text", path=str(path), max_length=48)


@pytest.fixture(scope="module")
def cli_teacher():
    """smollm2 loaded as `kvdistill extract --device cpu` loads it for rkv (sdpa: its importance comes from
    hooked queries), so in-process runs compute bit for bit what the CLI does."""
    from kvdistill.cache.extract import load_teacher
    from kvdistill.cache.meta import teacher_spec

    return load_teacher(teacher(), teacher_spec(teacher()), "cpu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_teacher, text_data) -> Path:
    """One uninterrupted in-process extraction of the text data (rkv, bfloat16)."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    model, tok = cli_teacher
    result = extract(
        teacher(), text_data, out, batch_size=3, shard_size=2, progress=False, model=model, tokenizer=tok
    )
    assert result["stored"] == len(LINES) and result["skipped"] == 0
    return out


def assert_same_samples(a: Path, b: Path) -> None:
    x, y = CacheReader(a), CacheReader(b)
    assert len(x.sample_ids) == len(set(x.sample_ids)) and sorted(x.sample_ids) == sorted(y.sample_ids)
    for sid in x.sample_ids:
        s, t = x.get(sid), y.get(sid)
        assert s.keys() == t.keys()
        for name in s:
            assert s[name].dtype == t[name].dtype and torch.equal(s[name], t[name]), (sid, name)


# ------------------------------------------------------------------------------------ stored == online
@pytest.mark.parametrize(
    "model, compression",
    [
        ("smollm2-135m", {"kind": "rkv", "budget": 16, "dtype": "float32"}),
        ("gemma3-270m", {"kind": "rkv", "budget": 12, "layers": [0, 5, 17], "dtype": "bfloat16"}),
        ("smollm2-135m", {"kind": "right_crop", "budget": 20, "layers": [3, 29], "dtype": "float16"}),
    ],
)
def test_extract_then_read_equals_compress_capture(request, tmp_path, model, compression):
    loaded = request.getfixturevalue("smollm2" if model.startswith("smollm2") else "gemma3")
    tcfg = teacher(model, **compression)
    records = dataset_records(GSM)
    extract(
        tcfg, GSM, tmp_path, batch_size=len(records), progress=False, model=loaded[0], tokenizer=loaded[1]
    )
    batch = plan_batches(records, len(records))[0]  # the one batch, in the order it was run

    comp = tcfg.compression.build()
    cap = capture_kv(
        *loaded,
        [r["text"] for r in batch],
        max_length=GSM.max_length,
        padding_side="right",
        attentions=comp.kind == "rkv",
    )
    layers = comp.resolve_layers(cap.geometry.num_layers)
    online = compress_capture(cap, comp, layers, answer_query_mask(batch, cap.spans, cap.attention_mask))
    cached = CacheReader(tmp_path).teacher_kv([r["id"] for r in batch])
    assert sorted(cached.keys) == layers and comp.budget < int(cap.attention_mask.sum(1).min())
    for layer in layers:
        assert torch.equal(cached.mask[layer], online.mask[layer])
        assert torch.equal(cached.spans[layer], online.spans[layer])
        assert cached.keys[layer].dtype == comp.torch_dtype
        assert torch.equal(cached.keys[layer], online.keys[layer].to(comp.torch_dtype))
        assert torch.equal(cached.values[layer], online.values[layer].to(comp.torch_dtype))


def test_extract_derives_the_teacher_once(tmp_path, smollm2, monkeypatch):
    """Geometry, compression and layers are derived once per extraction (config.json, plus one check of the
    passed model), not once per batch: three batches here."""
    from collections import Counter

    import kvdistill.models.capture as models_capture
    import kvdistill.models.geometry as models_geometry
    import kvdistill.models.queries as models_queries
    import kvdistill.teachers.capture as teachers_capture
    from kvdistill.compress import Compression
    from kvdistill.config import CompressionConfig

    calls: Counter[str] = Counter()

    def count(owner, name):
        fn = getattr(owner, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    for owner in (models_geometry, models_capture, models_queries, teachers_capture):
        count(owner, "geometry_of")
    count(CompressionConfig, "build")
    count(Compression, "resolve_layers")
    result = extract(
        teacher(), GSM, tmp_path, batch_size=2, progress=False, model=smollm2[0], tokenizer=smollm2[1]
    )
    assert result["stored"] == 6 and len(CacheReader(tmp_path).manifest["shards"]) == 1
    assert calls == {"geometry_of": 2, "build": 1, "resolve_layers": 1}


# ------------------------------------------------------------------------------------ SIGKILL + resume
SLOW_CLI = textwrap.dedent(
    """
    import sys, time
    from kvdistill.cache import writer
    add = writer.CacheWriter.add

    def slow_add(self, *args, **kwargs):  # slow the writer down so the kill lands mid-extraction
        add(self, *args, **kwargs)
        time.sleep(0.25)

    writer.CacheWriter.add = slow_add
    from kvdistill.cli import main
    sys.argv = ["kvdistill", *sys.argv[1:]]
    main()
    """
)


def run_cli(args: list[str]) -> int:
    from kvdistill.cli import main

    argv = sys.argv
    sys.argv = ["kvdistill", *args]
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = argv
    return 0


def test_only_ids_stores_exactly_those_records_of_the_same_cache(tmp_path, reference, cli_teacher, text_data):
    """An experiment's cache budget: only the records its runs read, under the meta of the whole data (a run
    of that data opens it), and a record it lacks named when asked for."""
    model, tok = cli_teacher
    every = [r["id"] for r in dataset_records(text_data)]
    wanted = {every[1], every[4], every[8]}
    result = extract(
        teacher(),
        text_data,
        tmp_path / "part",
        batch_size=3,
        progress=False,
        model=model,
        tokenizer=tok,
        only_ids=wanted,
    )
    assert result["records"] == result["stored"] == 3
    got, ref = CacheReader(tmp_path / "part"), CacheReader(reference)
    assert set(got.sample_ids) == wanted and got.complete
    assert got.meta == ref.meta  # the cache of the same data, teacher and compression
    assert got.get(every[4])["token_ids"].tolist() == ref.get(every[4])["token_ids"].tolist()
    with pytest.raises(CacheError, match=f"sample '{every[0]}' is not in the cache"):
        got.get(every[0])
    with pytest.raises(KvdistillError, match="only_ids names 1 records the data does not hold"):
        extract(
            teacher(),
            text_data,
            tmp_path / "bad",
            progress=False,
            model=model,
            tokenizer=tok,
            only_ids={"nope"},
        )


def test_sigkill_mid_extraction_then_rerun_equals_uninterrupted(tmp_path, reference, text_data):
    out = tmp_path / "cache"
    args = [
        "extract",
        "--teacher",
        "smollm2-135m",
        "--data",
        text_data.path,
        "--max-length",
        "48",
        "--compression",
        "rkv",
        "--budget",
        "8",
        "--batch-size",
        "3",
        "--shard-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    log = tmp_path / "extract.log"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], stderr=log.open("w"))
    manifest = out / "manifest.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:  # kill once a shard is committed, more in flight
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.02)
    assert proc.poll() is None, log.read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = CacheReader(out)
    assert not partial.complete and 2 <= len(partial) < len(LINES)

    assert run_cli(args) == 0  # the same command again resumes
    assert verify_cache(out) == []
    assert_same_samples(out, reference)
    assert run_cli(args) == 0  # and a third time stores nothing new
    assert_same_samples(out, reference)


# ------------------------------------------------------------------------------------ array parts
def test_parts_merged_equal_one_run(tmp_path, reference, cli_teacher, text_data):
    model, tok = cli_teacher
    kept = []
    for i in (1, 0):
        r = extract(
            teacher(),
            text_data,
            tmp_path,
            batch_size=3,
            shard_size=2,
            shard_index=i,
            num_shards=2,
            progress=False,
            model=model,
            tokenizer=tok,
        )
        kept.append(r["records"])
        assert r["part"] == i
    assert sorted(kept) == [4, 6]  # batches of 3 (the last of 1) dealt round robin: 3+1 and 3+3
    with pytest.raises(CacheError, match="missing parts"):
        merge_parts(tmp_path, expected_parts=3)
    merge_parts(tmp_path, expected_parts=2)
    assert verify_cache(tmp_path) == []
    assert_same_samples(tmp_path, reference)


# ------------------------------------------------------------------------------------ pipeline threads
def test_pipeline_keeps_order_and_surfaces_background_errors(cli_teacher):
    """run_pipeline hands batches to `consume` in order, each equal to the capture made on the main thread; an
    error while tokenizing (an empty text) or storing (consume raising) is raised in the caller,
    naming the batch."""
    from kvdistill.compress import Compression
    from kvdistill.teachers import capture_teacher

    model, tok = cli_teacher
    comp = Compression(kind="rkv", budget=4, dtype="float32", layers=[0, 7])
    records = [{"id": str(i), "text": t} for i, t in enumerate(LINES)]
    batches = plan_batches(records, 3)
    got = []
    kw = dict(max_length=48, compression=comp, layers=[0, 7])
    with torch.no_grad():
        run_pipeline(model, tok, batches, lambda b, s: got.append((b, s)), **kw)
        assert [b for b, _ in got] == batches
        for batch, samples in got:
            cap, query = capture_teacher(model, tok, batch, **kw)
            want = samples_from_capture(cap, comp, query)
            for s, t in zip(samples, want, strict=True):
                assert s.keys() == t.keys() and all(torch.equal(s[n], t[n]) for n in s)

        bad = [*batches[:2], [{"id": "x", "text": "Hi"}, {"id": "blank", "text": ""}]]
        with pytest.raises(KvdistillError, match="special tokens"):
            run_pipeline(model, tok, bad, lambda b, s: None, **kw)

        def consume(batch, samples):
            if batch is batches[1]:
                raise OSError("disk full")

        with pytest.raises(KvdistillError, match=r"storing batch 1 .*OSError: disk full") as err:
            run_pipeline(model, tok, batches, consume, **kw)
        assert isinstance(err.value.__cause__, OSError)


def test_bad_shard_flags_are_refused(tmp_path, text_data):
    with pytest.raises(Exception, match="--shard-index 2 is outside 0..1"):
        extract(teacher(), text_data, tmp_path, shard_index=2, num_shards=2)
    with pytest.raises(Exception, match="--batch-size 0"):
        extract(teacher(), text_data, tmp_path, batch_size=0)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ cache CLI
def test_cache_info_json_and_verify_exit_codes(tmp_path, reference, capsys):
    assert run_cli(["cache", "info", str(reference), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_samples"] == len(LINES) and info["teacher"]["id"] == "smollm2-135m"
    assert info["compression"]["kind"] == "rkv" and info["complete"]
    assert run_cli(["cache", "verify", str(reference)]) == 0

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in reference.iterdir():
        damaged.joinpath(f.name).write_bytes(f.read_bytes())
    shard = sorted(damaged.glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of K/V payload
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_cli(["cache", "verify", str(damaged)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"shard {shard.name} fails its checksum" in err


# ------------------------------------------------------------------------------------ training from a cache
RUN = {
    "student": {
        "from_config": {
            "base": "smollm2-135m",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
        },
        "tokenizer": "gpt2-tokenizer",
    },
    "teachers": [
        {
            "name": "smollm2",
            "model": "smollm2-135m",
            "compression": {"kind": "rkv", "budget": 16, "dtype": "float32"},
        }
    ],
    "data": {"source": "gsm_symbolic", "size": 6, "eval_size": 2, "max_length": 48},
    "train": {"batch_size": 4, "tensorboard": False},
}


@pytest.fixture(scope="module")
def run_cache(tmp_path_factory, smollm2) -> Path:
    out = tmp_path_factory.mktemp("run_cache") / "smollm2"
    cfg = cached_run(out)  # a cached teacher's section is what `kvdistill extract` writes its cache from
    extract(
        cfg.teachers[0], cfg.data, out, batch_size=4, progress=False, model=smollm2[0], tokenizer=smollm2[1]
    )
    return out


def cached_run(cache_dir: Path, *overrides: str):
    return load_config(
        raw=json.loads(json.dumps(RUN)),
        overrides=["teachers.0.source=cache", f"teachers.0.cache_dir={cache_dir}", *overrides],
    )


def test_first_step_loss_from_cache_equals_online(run_cache, smollm2, monkeypatch):
    import kvdistill.models.load as load

    monkeypatch.setattr(load, "load_model", lambda name, **kw: smollm2)  # the online teacher, loaded once
    online_raw = json.loads(json.dumps(RUN))
    del online_raw["teachers"][0]["compression"][
        "dtype"
    ]  # a cache's storage dtype: not read online (refused)
    online = build_objective(load_config(raw=online_raw))
    cached = build_objective(cached_run(run_cache))
    assert type(cached.teachers[0]).__name__ == "CachedTeacher"
    records = dataset_records(online.cfg.data)[2:6]  # the train split: extracted in other batches
    loss_online, m_online = online(records)
    loss_cached, m_cached = cached(records)
    assert m_online["loss/kd"] > 0.1
    assert loss_cached.item() == pytest.approx(loss_online.item(), rel=1e-3)
    assert m_cached["loss/kd"] == pytest.approx(m_online["loss/kd"], rel=1e-3)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["teachers.0.compression.budget=12"], "compression differs"),
        (["teachers.0.compression.dtype=bfloat16"], "compression differs"),
        (["data.size=7"], "dataset differs"),
        (["data.max_length=40"], "dataset differs"),
        (["teachers.0.model=gemma3-270m"], "teacher.id differs"),
    ],
)
def test_cache_of_another_compression_teacher_or_dataset_is_refused(run_cache, overrides, field):
    with pytest.raises(CacheError, match=field) as err:
        build_teachers(cached_run(run_cache, *overrides), "cpu")
    assert "teacher 'smollm2'" in str(err.value) and "kvdistill extract" in str(err.value)
    if "gemma3" in overrides[0]:
        assert "tokenizer differs" in str(err.value) and "teacher.geometry differs" in str(err.value)


def test_incomplete_cache_is_refused(tmp_path, run_cache):
    for f in run_cache.iterdir():
        tmp_path.joinpath(f.name).write_bytes(f.read_bytes())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="incomplete"):
        build_teachers(cached_run(tmp_path), "cpu")


# (the same helper as in test_hostile.py: test modules here are imported in importlib mode, not as a package)
def flip_exponent_bit(shard: Path) -> None:
    """Flip the lowest exponent bit of the first value of the shard's first key tensor: the value doubles or
    halves, silently (no inf or NaN), and the file stays valid safetensors."""
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = min(k for k in header if k.endswith("/keys_l0"))
    byte, mask = {"BF16": (0, 0x80), "F16": (1, 0x04), "F32": (2, 0x80)}[
        header[name]["dtype"]
    ]  # little-endian
    data[8 + n + header[name]["data_offsets"][0] + byte] ^= mask
    shard.write_bytes(bytes(data))


def test_training_refuses_a_cache_with_a_flipped_bit_in_every_shard(tmp_path, run_cache, capsys):
    """`kvdistill train` from a cache whose shards each have one exponent bit flipped: verify fails and
    training stops at the first batch with exit 2, naming the shard and `kvdistill cache verify`."""
    import yaml

    damaged = tmp_path / "cache"
    damaged.mkdir()
    for f in run_cache.iterdir():
        damaged.joinpath(f.name).write_bytes(f.read_bytes())
    shards = sorted(damaged.glob("shard-*.safetensors"))
    for shard in shards:
        flip_exponent_bit(shard)
    assert sum("fails its checksum" in p for p in verify_cache(damaged)) == len(shards)
    raw = json.loads(json.dumps(RUN))
    raw["teachers"][0].update(source="cache", cache_dir=str(damaged))
    raw["train"].update(steps=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert run_cli(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    err = "".join(capsys.readouterr().err.split())
    assert "failsitschecksum" in err and f"kvdistillcacheverify{damaged}" in err
    assert any(f"shard{s.name}of" in err for s in shards)


# ------------------------------------------------------------------------------------ CLI configs
def test_extract_configs_from_a_run_config_and_from_flags(tmp_path):
    from kvdistill.cache.cli import extract_configs
    from kvdistill.errors import ConfigError, KvdistillError

    raw = json.loads(json.dumps(RUN))
    raw["teachers"][0].update(source="cache", cache_dir=str(tmp_path / "smollm2"))
    raw["teachers"].append(
        {"name": "gemma", "model": "gemma3-270m", "compression": {"kind": "right_crop", "budget": 9}}
    )
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(raw))  # JSON is YAML
    none = dict(kind=None, budget=None, lam=None, layers=None, dtype=None)
    flags = dict(out=None, data=None, size=None, max_length=None)

    t, d, out = extract_configs(str(config), ["data.seed=3"], teacher="smollm2", compression=none, **flags)
    assert (t.model, t.compression.kind, t.compression.budget, t.compression.dtype) == (
        "smollm2-135m",
        "rkv",
        16,
        "float32",
    )
    assert (d.size, d.max_length, d.seed) == (6, 48, 3) and out == str(
        tmp_path / "smollm2"
    )  # cache_dir by default

    t, d, out = extract_configs(
        str(config),
        [],
        teacher="gemma3-270m",
        compression=dict(none, kind="rkv", budget=5, layers="0, 17"),
        **dict(flags, out="x", data="more.csv", limit=9),
    )
    assert (t.name, t.compression.kind, t.compression.budget, t.compression.layers) == (
        "gemma",
        "rkv",
        5,
        [0, 17],
    )
    assert (d.source, d.path, d.limit, d.size, out) == ("csv", "more.csv", 9, None, "x")
    t, _, _ = extract_configs(
        str(config), [], teacher="gemma", compression=dict(none, kind="full"), **dict(flags, out="x")
    )
    assert (
        t.compression.kind == "full" and t.compression.budget is None
    )  # the config's budget went with its kind

    with pytest.raises(KvdistillError, match=r"--teacher 'qwen' is not a teacher .*\['smollm2', 'gemma'\]"):
        extract_configs(str(config), [], teacher="qwen", compression=none, **flags)
    with pytest.raises(KvdistillError, match="has 2 teachers"):
        extract_configs(str(config), [], teacher=None, compression=none, **flags)
    with pytest.raises(ConfigError) as err:  # every problem at once, each naming its flag
        extract_configs(
            None,
            [],
            teacher="smollm2-135m",
            compression=dict(none, kind="rkv", lam=2.0),
            **dict(flags, data="x.docx", size=0),
        )
    assert len(err.value.problems) == 4
    text = " ".join(err.value.problems)
    for flag in ("--data 'x.docx'", "(--lam)", "(--size)", "--out"):
        assert flag in text
    with pytest.raises(
        ConfigError, match=r"teacher.compression \(--compression/--budget\): .* needs compression.budget"
    ):
        extract_configs(
            None, [], teacher="smollm2-135m", compression=dict(none, kind="rkv"), **dict(flags, out="x")
        )
