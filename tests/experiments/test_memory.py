"""`concurrent: auto`: the per-run memory estimate and how many runs fit; the gate before a start."""

from __future__ import annotations

import itertools

from kvdistill.experiments.memory import (
    CONTEXT,
    GIB,
    SLACK,
    Started,
    admits,
    auto_concurrent,
    cuda_free_bytes,
    free_device_bytes,
    run_bytes,
    unallocated,
    wait_note,
)

STUDENT = {"params": 16_000_000, "hidden": 256, "layers": 4, "vocab": 50_257}
GEMMA = {"params": 73_000_000, "hidden": 256, "layers": 6, "vocab": 262_144}


def test_run_bytes_by_hand():
    ce = run_bytes(batch=32, length=96, student=STUDENT, teachers=[], ahead=False)
    acts = 32 * 96 * (34 * 256 * 4 + 12 * 50_257)
    assert ce == int(SLACK * (16 * 16_000_000 + acts) + CONTEXT)
    kd = run_bytes(batch=32, length=96, student=STUDENT, teachers=[GEMMA], ahead=True)
    teacher = 2 * 73_000_000 + 2 * (2 * 32 * 96 * (2 * 256 * 6 + 8 * 256))
    assert kd - ce == int(SLACK * (16 * 16_000_000 + acts + teacher) + CONTEXT) - ce
    # logits only where logit KD reads them: the Gemma vocabulary dominates then
    assert (
        run_bytes(batch=32, length=96, student=STUDENT, teachers=[GEMMA], ahead=True, teacher_logits=True)
        > kd + GIB
    )


def test_auto_concurrent_is_bounded_by_memory_cores_and_runs():
    est = [4 * GIB] * 30
    assert auto_concurrent(est, free=80 * GIB, cores=16) == 16  # cores
    assert auto_concurrent(est, free=20 * GIB, cores=16) == 4  # 0.9 · 20 / 4
    assert auto_concurrent(est[:3], free=80 * GIB, cores=16) == 3  # runs
    assert auto_concurrent([100 * GIB], free=80 * GIB, cores=16) == 1  # never 0
    # unequal runs: the k largest must fit together (the specialists' teachers on an 80 GB card: all three;
    # counted as copies of the largest, one)
    teachers = [int(4.5 * GIB), int(17.9 * GIB), int(35.6 * GIB)]
    assert auto_concurrent(teachers, free=78 * GIB, cores=16) == 3  # 58.0 <= 70.2
    assert auto_concurrent(teachers, free=60 * GIB, cores=16) == 2  # 53.5 <= 54 < 58.0
    assert auto_concurrent(teachers, free=50 * GIB, cores=16) == 1  # 35.6 <= 45 < 53.5
    for free in range(1, 200, 7):  # brute force: the most runs of which any subset of that size fits
        est = [int(g * GIB) for g in (3, 9, 1, 12, 5, 5, 30)]
        k = max(
            [1]
            + [
                n
                for n in range(1, len(est) + 1)
                if all(sum(c) <= 0.9 * free * GIB for c in itertools.combinations(est, n))
            ]
        )
        assert auto_concurrent(est, free=free * GIB, cores=64) == k


# ---------------------------------------------------------------------------------------------- the gate
def test_the_gate_admits_while_the_free_memory_covers_the_estimate():
    old = [Started(need=4 * GIB, at=0.0)]  # started 100 s ago: allocated by now
    assert admits(4 * GIB, free=10 * GIB, running=old, now=100.0, ramp_s=60.0)
    assert admits(10 * GIB, free=10 * GIB, running=old, now=100.0, ramp_s=60.0)
    assert not admits(10 * GIB + 1, free=10 * GIB, running=old, now=100.0, ramp_s=60.0)


def test_a_recently_started_child_still_needs_its_whole_estimate():
    running = [Started(need=4 * GIB, at=0.0), Started(need=3 * GIB, at=90.0), Started(need=None, at=95.0)]
    # at 100 s only the child of 90 s is inside the ramp; one without an estimate counts nothing
    assert unallocated(running, now=100.0, ramp_s=60.0) == 3 * GIB
    assert unallocated(running, now=100.0, ramp_s=120.0) == 7 * GIB
    assert unallocated(running, now=150.0, ramp_s=60.0) == 0
    assert not admits(4 * GIB, free=6 * GIB, running=running, now=100.0, ramp_s=60.0)  # 6 - 3 < 4
    assert admits(3 * GIB, free=6 * GIB, running=running, now=100.0, ramp_s=60.0)  # 6 - 3 = 3
    assert admits(4 * GIB, free=6 * GIB, running=running, now=150.0, ramp_s=60.0)  # ramp over
    note = wait_note(4 * GIB, 6 * GIB, running, now=100.0, ramp_s=60.0)
    assert note == (
        "waiting for 4.0 GiB of GPU memory: 6.0 GiB free, 3.0 GiB of it not yet allocated by the 2 "
        "children started in the last 60 s (3 running)"
    )


def test_the_gate_always_admits_where_nothing_runs_or_without_cuda():
    assert admits(100 * GIB, free=1 * GIB, running=[], now=0.0, ramp_s=60.0)
    assert admits(None, free=0, running=[], now=0.0, ramp_s=60.0)
    busy = [Started(need=50 * GIB, at=0.0)]
    assert admits(100 * GIB, free=None, running=busy, now=1.0, ramp_s=60.0)  # no CUDA: no gate


def test_a_job_without_an_estimate_needs_only_some_free_memory():
    running = [Started(need=None, at=0.0)]
    assert admits(None, free=1, running=running, now=1.0, ramp_s=60.0)
    assert not admits(None, free=0, running=running, now=1.0, ramp_s=60.0)
    recent = [Started(need=8 * GIB, at=0.0)]  # free, but all of it the recent child's
    assert not admits(None, free=8 * GIB, running=recent, now=1.0, ramp_s=60.0)


def test_without_cuda_the_gate_reads_nothing_and_auto_reads_the_host(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_free_bytes() is None
    assert free_device_bytes() > 0  # the host's available memory


def test_the_ledger_shows_each_pool_the_others_recent_starts_and_cleans_up(tmp_path):
    from kvdistill.experiments.memory import Ledger

    path = tmp_path / "starts.jsonl"
    a, b = Ledger(path, pid=10), Ledger(path, pid=20)
    a.record(4 * GIB, ramp_s=60.0)
    b.record(6 * GIB, ramp_s=60.0)
    assert [s.need for s in a.others(100.0, ramp_s=60.0)] == [6 * GIB]  # not its own
    assert [s.need for s in b.others(100.0, ramp_s=60.0)] == [4 * GIB]
    (seen,) = a.others(100.0, ramp_s=60.0)
    assert 99.0 < seen.at <= 100.0  # just now, on the caller's monotonic clock
    assert a.others(100.0, ramp_s=0.0) == []  # out of the ramp
    path.write_text(path.read_text() + '{"pid": 30, "ne')  # a line torn by a killed writer
    assert [s.need for s in a.others(100.0, ramp_s=60.0)] == [6 * GIB]
    a.close()
    assert [s.need for s in Ledger(path, pid=99).others(0.0, ramp_s=60.0)] == [6 * GIB]
    b.close()
    assert not path.exists()  # nothing stays behind


def test_the_kava_latent_run_is_estimated_in_its_measured_range():
    """kava's E4 (llama 6 × 384, vocabulary 49,152, B 64, T 96, 12 latents, 3 Jacobi passes): its latent runs'
    processes measured 8.4-17.4 GiB on an H100 (nvidia-smi, reserved memory included), 6.3 GiB estimated
    without the latent passes; nocot_ft (0 latents) is estimated as a text student."""
    from kvdistill.config import load_config
    from kvdistill.experiments.conditions import base_raw
    from kvdistill.experiments.memory import run_estimator
    from kvdistill.experiments.spec import load_spec
    from kvdistill.train.memory import estimate_note

    spec = load_spec("kava")

    def config(name):
        overrides = spec.budget_overrides() + list(spec.conditions[name].overrides)
        return load_config(raw=base_raw(spec), overrides=overrides)  # the base student (from_config)

    e4, nocot = config("E4"), config("nocot_ft")
    estimate = run_estimator({})
    latent, text = estimate(e4), estimate(nocot)
    # the runner's estimate at the longest training text (90 SmolLM2 tokens, below max_length 96)
    assert round(text / GIB, 2) == 5.96  # the estimate before the latent term, for E4 too
    assert 8.4 * GIB < latent < 17.4 * GIB and round(latent / GIB, 2) == 12.22
    line = estimate_note(e4, 1, None, "GPU")[
        0
    ]  # validate's bound (at max_length) has the latent geometry too
    assert line.startswith("estimated peak memory per process: 12.89 GiB") and "latent 5.10" in line


def test_the_estimate_is_at_the_longest_training_text(tiny_config, teacher_dirs):
    """A batch pads to its longest row: the runner's estimate uses the longest training text under the
    student's and the online teachers' tokenizers (brute force here), at most data.max_length; on-policy runs
    and records without a text keep max_length."""
    from transformers import AutoModelForCausalLM

    from kvdistill.data import load_records
    from kvdistill.experiments.memory import geometry, longest_text, run_estimator
    from kvdistill.models.load import load_tokenizer
    from kvdistill.student import build_student
    from kvdistill.train.memory import latent_geometry

    cfg = tiny_config("data.max_length=1024")
    model, tok = build_student(cfg.student, seed=0)
    toks = [tok, *(load_tokenizer(str(d)) for d in teacher_dirs.values())]
    records = load_records(cfg.data, split="train")
    brute = max(len(t(r["text"])["input_ids"]) for t in toks for r in records)
    assert 32 < brute < 1024
    assert brute > max(len(tok(r["text"])["input_ids"]) for r in records)  # a teacher's tokenizer is longer
    assert longest_text(records, toks, 1024) == brute
    assert longest_text(records, toks, brute - 1) == brute - 1  # capped at max_length
    assert longest_text([{"messages": []}, *records], toks, 1024) == 1024  # no text: not measured

    prepared = {
        n: {"model": str(d), "params": AutoModelForCausalLM.from_pretrained(d).num_parameters()}
        for n, d in teacher_dirs.items()
    }
    student = {"params": sum(p.numel() for p in model.parameters()), **geometry(model.config)}
    teachers = [{"params": prepared[n]["params"], **geometry(prepared[n]["model"])} for n in teacher_dirs]

    def at(c, length):
        return run_bytes(
            batch=c.train.batch_size,
            length=length,
            student=student,
            teachers=teachers,
            ahead=True,
            latent=latent_geometry(c.student),
        )

    estimate = run_estimator(prepared)
    assert estimate(cfg) == at(cfg, brute) < at(cfg, 1024)
    short = tiny_config("data.max_length=32")
    assert estimate(short) == at(short, 32)
    on_policy = tiny_config("data.max_length=1024", "train.on_policy.lambda=0.5")
    assert estimate(on_policy) == at(on_policy, 1024)  # samples replace the data's continuations
