"""The memory estimate per process by distributed mode (kvdistill.train.memory), and validate's warning."""

from __future__ import annotations

import pytest

from kvdistill.train.memory import CONTEXT, GIB, SLACK, estimate_note, run_bytes, run_parts

STUDENT = {"params": 1_000_000_000, "hidden": 2048, "layers": 16, "vocab": 50_000}
TEACHER = {"params": 3_000_000_000, "hidden": 3072, "layers": 28, "vocab": 128_000}


def test_ddp_holds_the_whole_student_and_fsdp_a_share():
    kw = dict(batch=2, length=512, student=STUDENT, teachers=[TEACHER], ahead=False)
    ddp = run_parts(**kw)
    assert (ddp["weights"], ddp["grads"], ddp["optimizer"]) == (4 * 10**9, 4 * 10**9, 8 * 10**9)
    assert run_parts(**kw, world=4) == ddp  # ddp on 4 processes: each holds it all
    fsdp = run_parts(**kw, world=4, distributed="fsdp")
    in_flight = 2 * 4 * 10**9 // 16  # two blocks gathered
    assert fsdp["weights"] == 10**9 + in_flight and fsdp["grads"] == 10**9 and fsdp["optimizer"] == 2 * 10**9
    assert fsdp["acts"] == ddp["acts"] and fsdp["teachers"] == ddp[
        "teachers"
    ] == 2 * 3 * 10**9 + 2 * 2 * 512 * (2 * 3072 * 28 + 8 * 3072)  # teachers replicated
    offload = run_parts(**kw, world=1, distributed="fsdp", cpu_offload=True)
    assert (offload["weights"], offload["grads"], offload["optimizer"]) == (in_flight, 0, 0)
    lora = run_parts(**{**kw, "student": {**STUDENT, "trainable": 10**7}})
    assert (lora["grads"], lora["optimizer"]) == (4 * 10**7, 8 * 10**7)
    assert run_bytes(**kw) == int(SLACK * sum(ddp.values()) + CONTEXT)


def test_confidence_scoring_holds_one_teachers_logits_of_a_few_samples():
    small = {**TEACHER, "vocab": 32_000}
    kw = dict(batch=16, length=320, student=STUDENT, teachers=[small, TEACHER], ahead=True)
    plain, scored = run_parts(**kw), run_parts(**kw, teacher_scoring=True)
    assert "scoring" not in plain and {k: v for k, v in scored.items() if k != "scoring"} == plain
    assert scored["scoring"] == (4 * 4 + 8) * 320 * 128_000  # the largest vocabulary, 4 samples at a time
    assert run_parts(**{**kw, "batch": 2}, teacher_scoring=True)["scoring"] == (4 * 2 + 8) * 320 * 128_000


def test_the_note_warns_when_the_run_does_not_fit(tiny_config):
    cfg = tiny_config()
    line, over = estimate_note(cfg, 1, 64 * GIB, "GPU")
    assert not over and "on 1 process(es), ddp" in line and "the GPU has 64.0 GiB" in line
    line, over = estimate_note(cfg, 1, 2**20, "GPU")
    assert over and "will not fit" in line and "train.distributed=fsdp" in line
    two = estimate_note(tiny_config("train.distributed=fsdp"), 2, None, "GPU")[0]
    assert float(two.split("GiB")[0].split()[-1]) < float(line.split("GiB")[0].split()[-1])


@pytest.mark.parametrize("lora", [False, True])
def test_the_counts_are_those_of_the_built_student(tiny_config, lora):
    from kvdistill.student import build_student
    from kvdistill.train.memory import _shape

    cfg = tiny_config(*(["student.lora.r=4"] if lora else []))
    model, _ = build_student(cfg.student)
    shape = _shape(
        None, cfg.student.from_config, "student.from_config", cfg.student.lora, cfg.student.tokenizer
    )
    assert shape["params"] == sum(p.numel() for p in model.parameters())
    assert shape["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_latent_student_adds_its_answer_and_jacobi_passes():
    tiny = {"params": 1000, "hidden": 8, "layers": 2, "vocab": 10}
    kw = dict(batch=2, length=5, student=tiny, teachers=[], ahead=False)
    text = run_parts(**kw)
    parts = run_parts(**kw, latent={"tokens": 3, "iterations": 2})
    # F_s · L_s = 16; answer pass (5 + 3) · (34 · 16 + 12 · 10) = 8 · 664 = 5312; Jacobi passes
    # (5 + 2 · 3) · 34 · 16 = 5984; their K/V 2 · (5 + 3) · 4 · 16 = 1024; times B = 2
    assert parts["latent"] == 2 * (5312 + 5984 + 1024) == 24_640
    assert {k: v for k, v in parts.items() if k != "latent"} == text  # the CoT pass is `acts`
    assert run_bytes(**kw, latent={"tokens": 3, "iterations": 2}) == int(
        SLACK * (sum(text.values()) + 24_640) + CONTEXT
    )
    # no iterations: the latents are the learned start, no Jacobi pass runs
    assert run_parts(**kw, latent={"tokens": 3, "iterations": 0})["latent"] == 2 * 5312


@pytest.mark.parametrize("latent", [None, {"tokens": 0, "iterations": 3}])
def test_a_text_student_or_zero_latents_is_estimated_as_before(latent):
    kw = dict(batch=64, length=96, student=STUDENT, teachers=[TEACHER], ahead=True)
    assert run_parts(**kw, latent=latent) == run_parts(**kw)
    assert run_bytes(**kw, latent=latent) == run_bytes(**kw)
