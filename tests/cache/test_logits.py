"""Top-k logits in the cache: `kvdistill extract` stores them beside the K/V equal to the online teacher's
within their storage precision, `cache info` reports bytes per token for K/V and logits apart, a flipped bit
is refused, and a reader gets them only where the temperatures it needs are stored."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from kvdistill.cache import CacheReader, verify_cache
from kvdistill.cache.extract import extract
from kvdistill.cache.meta import dataset_records, expected_meta
from kvdistill.config import DataConfig, LogitKDConfig, TeacherConfig
from kvdistill.errors import CacheError
from kvdistill.models.capture import capture_kv

DATA = DataConfig(size=6, eval_size=2, max_length=32)
K, TEMPS = 16, [1.0, 2.0]


def teacher(path: Path, **logits) -> TeacherConfig:
    return TeacherConfig(
        model=str(path),
        compression={"kind": "full", "dtype": "float32"},
        logits={"top_k": K, "dtype": "float16", "temperatures": TEMPS, **logits},
    )


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, teacher_dirs) -> Path:
    """The tiny qwen2 teacher with its (tied) embeddings × 20: peaked next-token distributions, as a trained
    teacher's are (the random one's are nearly uniform, so every KL would be ~0)."""
    from kvdistill.models.load import load_model

    model, tok = load_model(str(teacher_dirs["qwen2"]))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20.0)
    out = tmp_path_factory.mktemp("sharp") / "qwen2"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def logit_cache(tmp_path_factory, sharp) -> Path:
    out = tmp_path_factory.mktemp("logits") / "qwen2"
    result = extract(teacher(sharp), DATA, out, batch_size=4, shard_size=3, device="cpu", progress=False)
    assert result["stored"] == 6
    return out


def test_cached_logits_equal_the_online_teachers_within_storage_precision(logit_cache, sharp):
    from kvdistill.models.load import load_model

    model, tok = load_model(str(sharp))
    records = dataset_records(DATA)
    cap = capture_kv(
        model,
        tok,
        [r["text"] for r in records],
        max_length=DATA.max_length,
        padding_side="right",
        logits=True,
    )
    cached = CacheReader(logit_cache).teacher_kv([r["id"] for r in records], logits=True).logits
    real = cap.attention_mask.bool()
    assert torch.equal(cached.mask.bool(), real) and cached.values.dtype == torch.float16
    assert torch.equal(cached.spans[real], cap.spans[real])  # every token's byte span (cross-tokenizer KD)
    logp = torch.log_softmax(cap.logits.float(), -1)  # (B, T, V) the online teacher's, batched differently
    top = logp.topk(K, -1)
    assert torch.equal(cached.index[real], top.indices[real])  # the same tokens, in the same order
    eps = 2**-11 * float(top.values[real].abs().max())  # float16 (11 significant bits): half a unit, rounding
    assert float((cached.values.float() - top.values)[real].abs().max()) <= eps
    for tau in TEMPS:
        ref = torch.log_softmax(cap.logits.float() / tau, -1).gather(-1, top.indices)  # (B, T, k)
        ids, logp = cached.at(tau)
        # values/τ + shift_τ (float32): each value's rounding, divided by τ
        assert torch.equal(ids[real], top.indices[real])
        assert float((logp - ref)[real].abs().max()) <= eps / tau + 1e-5


def test_cache_info_reports_bytes_per_token_for_kv_and_logits(logit_cache):
    from kvdistill.cache import cache_info, format_info

    info = cache_info(str(logit_cache))
    # qwen2 tiny: 3 layers, 2 KV heads, head dim 16, float32: 3 · 2 (K, V) · 2 · 16 · 4 bytes = 768 per token
    assert info["kv_bytes_per_token"] == 768.0
    # k = 16 float16 values + 16 uint16 ids (vocabulary 49,152) + 2 float32 shifts = 32 + 32 + 8 bytes per
    # token
    assert info["logits"]["index_dtype"] == "uint16" and info["logit_bytes_per_token"] == 72.0
    assert info["bytes_per_token"] > 768 + 72  # plus ids, positions, spans and headers
    assert "(K/V 768.0, logits 72.0)" in format_info(info)
    assert verify_cache(logit_cache) == []


def flip_logit_bit(shard: Path) -> None:
    """Flip one exponent bit of the first stored float16 log-probability of the shard: a silently wrong
    value."""
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = min(k for k in header if k.endswith("/logit_values"))
    data[8 + n + header[name]["data_offsets"][0] + 1] ^= 0x04
    shard.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_logits_is_refused(tmp_path, logit_cache):
    for f in logit_cache.iterdir():
        tmp_path.joinpath(f.name).write_bytes(f.read_bytes())
    shard = sorted(tmp_path.glob("shard-*.safetensors"))[0]
    flip_logit_bit(shard)
    assert any(f"shard {shard.name} fails its checksum" in p for p in verify_cache(tmp_path))
    reader = CacheReader(tmp_path)
    sid = next(s for s, (k, _) in reader.index.items() if k == 0)
    with pytest.raises(CacheError, match=f"shard {shard.name} of .* fails its checksum"):
        reader.teacher_kv([sid], logits=True)


def test_a_reader_takes_the_logits_it_needs_and_no_more(logit_cache, sharp):
    reader = CacheReader(logit_cache)
    path = sharp
    kv_only = TeacherConfig(model=str(path), compression={"kind": "full", "dtype": "float32"})
    assert reader.check_compatible(expected_meta(kv_only, DATA)) == []  # K/V readers ignore the logits
    needs_2 = teacher(path, temperatures=None)  # the run's losses.logit_kd: τ = 2, stored
    assert reader.check_compatible(expected_meta(needs_2, DATA, logit_kd=LogitKDConfig(weight=1.0))) == []
    steps = LogitKDConfig(weight=1.0, schedule={"kind": "step", "values": [4.0, 2.0]})
    bad = reader.check_compatible(expected_meta(needs_2, DATA, logit_kd=steps))
    assert bad == [
        "logits.temperatures: the cache's log-probabilities are normalised at [1.0, 2.0], not at [4.0]"
    ]
    assert (
        reader.check_compatible(expected_meta(teacher(path, top_k=8), DATA)) == []
    )  # its first 8: the top 8
    bad = reader.check_compatible(expected_meta(teacher(path, top_k=32, dtype="bfloat16"), DATA))
    assert bad == [
        "logits.dtype differs: cache has 'float16', expected 'bfloat16'",
        "logits.top_k differs: cache has 16, expected at least 32",
    ]
    kv_cache = CacheReader(logit_cache).meta | {"logits": None}
    from kvdistill.cache.manifest import meta_mismatches

    assert meta_mismatches(kv_cache, expected_meta(needs_2, DATA), reading=True)[0].startswith(
        "logits differs: the cache holds no logits"
    )
    # a writer resuming must agree exactly: K/V-only samples are never added to a cache that promises logits
    assert meta_mismatches(reader.meta, expected_meta(kv_only, DATA)) != []


def run_config(teacher: Path, cache: Path | None = None, student_tokenizer: str | None = None):
    """Logit KD (top 16, τ 2) plus K/V from the tiny qwen2 teacher: online, or from `cache`; the student
    shares the teacher's tokenizer unless `student_tokenizer` is given (then across tokenizers,
    cross_tokenizer project)."""
    from kvdistill.config import load_config

    t = {"name": "qwen2", "model": str(teacher), "compression": {"kind": "full"}}
    if cache is not None:  # the cache's storage dtype (not read online)
        t.update(
            source="cache",
            cache_dir=str(cache),
            compression={"kind": "full", "dtype": "float32"},
            logits={"dtype": "float16", "temperatures": TEMPS},
        )
    student = {
        "from_config": {
            "base": "smollm2-135m",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
        }
    }  # smollm2's tokenizer, the teacher's
    if student_tokenizer is not None:
        student["tokenizer"] = student_tokenizer
    return load_config(
        raw={
            "student": student,
            "teachers": [t],
            "data": DATA.model_dump(exclude_unset=True),
            "losses": {"logit_kd": {"weight": 1.0, "top_k": K}},
            "train": {"batch_size": 4, "tensorboard": False},
        }
    )


@pytest.mark.parametrize("student_tokenizer", [None, "gpt2-tokenizer"])
def test_logit_kd_from_the_cache_trains_a_step_equal_to_the_online_teachers(
    logit_cache, sharp, student_tokenizer
):
    """One tokenizer (topk_logit_kd), and a GPT-2 student (cross_logit_kd's projection at prefix partners, the
    cache's every-token spans)."""
    from kvdistill.objectives import build_objective

    online = build_objective(run_config(sharp, student_tokenizer=student_tokenizer))
    cached = build_objective(run_config(sharp, logit_cache, student_tokenizer))
    assert (student_tokenizer is None) == (cached.terms.cross == {})
    assert type(cached.teachers[0]).__name__ == "CachedTeacher"
    records = dataset_records(DATA)[2:6]  # the train split, extracted in other batches than these
    out = []
    for objective in (online, cached):
        objective.zero_grad(set_to_none=True)
        loss, metrics = objective(records)
        loss.backward()
        out.append(
            (float(loss), metrics, {n: p.grad for n, p in objective.named_parameters() if p.grad is not None})
        )
    (l_on, m_on, g_on), (l_ca, m_ca, g_ca) = out
    assert m_on["loss/logit_kd/qwen2"] > 0.5
    # float16 log-probabilities (half a unit ≈ 0.004 at |log p| ≈ 10) move the term by far less than that
    assert m_ca["loss/logit_kd/qwen2"] == pytest.approx(m_on["loss/logit_kd/qwen2"], rel=1e-3)
    assert m_ca["loss/kv/qwen2"] == pytest.approx(m_on["loss/kv/qwen2"], rel=1e-5)  # float32 K/V: the same
    assert l_ca == pytest.approx(l_on, rel=1e-4)
    assert g_on.keys() == g_ca.keys()
    for name, g in g_on.items():
        assert float((g_ca[name] - g).abs().max()) <= 1e-3 * float(g.abs().max()) + 1e-8, name


def test_extract_takes_the_logits_section_from_flags_or_the_run_config(tmp_path):
    from kvdistill.cache.cli import extract_configs
    from kvdistill.errors import ConfigError

    none = dict(kind=None, budget=None, lam=None, layers=None, dtype=None)
    flags = dict(out="x", data=None, size=None, max_length=None)
    t, _, _ = extract_configs(
        None,
        [],
        teacher="smollm2-135m",
        compression=none,
        logits={"top_k": 8, "dtype": None, "temperatures": "1, 2"},
        **flags,
    )
    assert (t.logits.top_k, t.logits.dtype, t.logits.temperatures) == (8, "float16", [1.0, 2.0])
    t, _, _ = extract_configs(None, [], teacher="smollm2-135m", compression=none, **flags)
    assert t.logits is None  # no flag, no section: K/V only
    raw = {
        "teachers": [{"name": "s", "model": "smollm2-135m", "logits": {"top_k": 4}}],
        "losses": {"logit_kd": {"weight": 1.0, "schedule": {"kind": "step", "values": [4.0, 2.0]}}},
    }
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(raw))
    t, _, _ = extract_configs(str(config), [], teacher="s", compression=none, **flags)
    assert t.logits.temperatures == [2.0, 4.0]  # every τ of the run's schedule
    raw["losses"]["logit_kd"]["schedule"] = {"kind": "linear", "start": 4.0, "end": 1.0}
    config.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="--logits-temperatures: losses.logit_kd has a linear τ schedule"):
        extract_configs(str(config), [], teacher="s", compression=none, **flags)


def test_validate_names_what_logit_kd_from_a_cache_needs():
    from kvdistill.config import load_config
    from kvdistill.errors import ConfigError

    def problems(teacher: dict, logit_kd: dict) -> str:
        raw = {
            "student": {"model": "smollm2-135m"},
            "teachers": [{"name": "t", "model": "smollm2-135m", **teacher}],
            "losses": {"logit_kd": logit_kd},
        }
        with pytest.raises(ConfigError) as err:
            load_config(raw=raw)
        return " | ".join(err.value.problems)

    cached = {"source": "cache", "cache_dir": "c"}
    text = problems(cached, {"weight": 1.0})
    assert (
        "which holds its top-k log-probabilities, not its whole distribution: set losses.logit_kd.top_k"
        in text
    )
    assert "add teachers.0.logits" in text
    assert "teachers.0.logits describes what a cache holds" in problems(
        {"logits": {}}, {"weight": 1.0, "top_k": 8}
    )
    assert "whose weight is 0" in problems({**cached, "logits": {}}, {"weight": 0.0})
    assert "below losses.logit_kd.top_k (8)" in problems(
        {**cached, "logits": {"top_k": 4}}, {"weight": 1.0, "top_k": 8}
    )
    assert "schedule kind linear" in problems(
        {**cached, "logits": {}},
        {"weight": 1.0, "top_k": 8, "schedule": {"kind": "linear", "start": 4.0, "end": 1.0}},
    )
    assert "lacks τ [4.0]" in problems(
        {**cached, "logits": {"temperatures": [2.0]}},
        {"weight": 1.0, "top_k": 8, "schedule": {"kind": "step", "values": [4.0, 2.0]}},
    )
    ok = load_config(
        raw={
            "student": {"model": "smollm2-135m"},
            "teachers": [{**cached, "name": "t", "model": "smollm2-135m", "logits": {}}],
            "losses": {"logit_kd": {"weight": 1.0, "top_k": 8}},
        }
    )
    assert ok.teachers[0].logits.resolved(ok.losses.logit_kd) == [2.0]
