"""The training loop end to end on CPU: batching invariances (accumulation, DDP), exact resume, the logged
schedule, saved students that load with plain transformers, LoRA, gradient checkpointing, bf16, and one full
CLI run on the real offline teachers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvdistill.student import build_student
from kvdistill.train.loader import micro_batch, sample_stream
from kvdistill.train.trainer import latest_checkpoint, train

TOL = 2e-5  # float32 weights after a few Adam steps of size ~1e-3, different matmul groupings


# ------------------------------------------------------------------------------------------ batching (pure)
@pytest.mark.parametrize(("batch", "accum", "world"), [(4, 1, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2)])
def test_every_layout_of_a_step_takes_the_same_samples(tiny_config, batch, accum, world):
    cfg = tiny_config(f"train.batch_size={batch}", f"train.grad_accum={accum}")
    records = [{"id": str(i)} for i in range(10)]
    for step in range(4):  # 4 steps of 4 samples from 10 records: crosses an epoch boundary
        taken = [
            r["id"]
            for m in range(accum)
            for rank in range(world)
            for r in micro_batch(records, cfg, step, m, rank, world)
        ]
        assert taken == [str(i) for i in sample_stream(10, cfg.data.seed, 4 * step, 4)]


def test_sample_stream_is_a_fresh_permutation_each_epoch():
    stream = sample_stream(7, seed=3, start=0, count=21)
    epochs = [stream[i : i + 7] for i in (0, 7, 14)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert sample_stream(7, seed=3, start=5, count=9) == stream[5:14]  # any window of the same stream


# ------------------------------------------------------------------------------------------ invariances
@pytest.fixture(scope="module")
def baseline(tiny_config, tmp_path_factory):
    """Batch 4 × accumulation 1, 2 steps, fp32."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    train(tiny_config("train.batch_size=4", "train.grad_accum=1"), out, progress=False)
    return out


def test_the_tiny_student_has_no_dropout(tiny_config):
    """The invariance tests below compare runs exactly, which needs a deterministic forward pass."""
    model, _ = build_student(tiny_config().student)
    dropouts = {k: v for k, v in model.config.to_dict().items() if "dropout" in k and isinstance(v, float)}
    assert dropouts and all(v == 0.0 for v in dropouts.values())


def test_grad_accumulation_gives_the_same_update(tiny_config, baseline, tmp_path, files):
    """Batch 1 × accumulation 4 == batch 4 × accumulation 1: weights, losses and (clipped) gradient norms."""
    out = tmp_path / "accum"
    train(tiny_config("train.batch_size=1", "train.grad_accum=4"), out, progress=False)
    a, b = files.metrics(baseline), files.metrics(out)
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert rb["tokens"] == ra["tokens"]
        for key in ("loss", "loss/ce", "loss/kv/qwen2", "loss/kv/gemma3", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
    assert a[0]["grad_norm"] > 1.0  # max_grad_norm 1.0 clipped: the clipped update is compared too
    # whole trained state: student, projectors
    state_a = files.weights(baseline / "checkpoints/step-2/state")
    state_b = files.weights(out / "checkpoints/step-2/state")
    assert files.max_diff(state_a, state_b) < TOL
    # the runs did move the weights, by far more than they differ
    init, _ = build_student(tiny_config().student, seed=0)
    final = files.weights(baseline / "final")
    init_state = {k: v for k, v in init.state_dict().items() if k in final}
    assert files.max_diff(init_state, final) > 1e-3


def test_gradient_checkpointing_gives_the_same_run(tiny_config, baseline, tmp_path, files):
    """K/V taken from the projections under checkpointing equal the cache's (rotation undone)."""
    out = tmp_path / "gc"
    train(tiny_config("student.gradient_checkpointing=true"), out, progress=False)
    for ra, rb in zip(files.metrics(baseline), files.metrics(out), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    assert files.max_diff(files.weights(baseline / "final"), files.weights(out / "final")) < TOL


def test_bf16_mixed_precision_runs_on_cpu(tiny_config, baseline, tmp_path, files):
    out = tmp_path / "bf16"
    train(tiny_config("train.mixed_precision=bf16"), out, progress=False)
    fp32, bf16 = files.metrics(baseline), files.metrics(out)
    for ra, rb in zip(fp32, bf16, strict=True):
        assert math.isfinite(rb["loss"])
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-2)
    assert bf16[0]["loss"] != fp32[0]["loss"]  # autocast was on
    final = files.weights(out / "final")
    assert all(
        t.dtype == torch.float32 and torch.isfinite(t).all() for t in final.values()
    )  # fp32 master weights


@pytest.mark.slow
def test_ddp_two_processes_match_one(tiny_config, tiny_yaml, tmp_path, files):
    """torchrun, 2 CPU processes (gloo), batch 1 × accumulation 2 each == 1 process, batch 2 × accumulation
    2."""
    one = tmp_path / "one"
    train(tiny_config("train.batch_size=2", "train.grad_accum=2"), one, progress=False)
    ddp = tmp_path / "ddp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "kvdistill.cli",
            "train",
            str(tiny_yaml),
            "--out",
            str(ddp),
            "train.batch_size=1",
            "train.grad_accum=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = files.metrics(one), files.metrics(ddp)
    for ra, rb in zip(a, b, strict=True):  # rows are means over both processes (tokens: the sum)
        assert rb["tokens"] == ra["tokens"]
        for key in ("loss", "loss/kv/qwen2", "loss/kv/gemma3", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
    assert files.max_diff(files.weights(one / "final"), files.weights(ddp / "final")) < TOL
    state = sorted(p.name for p in (ddp / "checkpoints/step-2/state").iterdir())
    assert "random_states_0.pkl" in state and "random_states_1.pkl" in state
    assert json.loads((ddp / "summary.json").read_text())["tokens"] == sum(r["tokens"] for r in b)
    # one lock, taken by process 0 (process 1 taking it too would have been refused), given back at the end
    assert (ddp / ".train.lock").is_file() and not (ddp / ".train.holder.json").exists()


@pytest.mark.slow
def test_ddp_with_parameters_that_get_no_gradient(tiny_config, tiny_yaml, tmp_path, files):
    """Cosine loss only (keys): the value maps get no gradient (a zero one in their slots of the stacked
    maps); DDP must not wait for them, and with weight_decay 0 AdamW leaves them as they were."""
    from kvdistill.objectives import build_objective

    out = tmp_path / "ddp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    changes = ["train.batch_size=1", "losses.kv.weight=0", "losses.cosine=1"]
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "kvdistill.cli",
            "train",
            str(tiny_yaml),
            "--out",
            str(out),
            *changes,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = files.weights(out / "checkpoints/step-2/state", prefix="space.projectors.")
    initial = build_objective(tiny_config(*changes)).space.projectors.state_dict()
    stacked = [k for k in trained if k.endswith(".weight")]  # (L, 2, ...): [:, 0] key maps, [:, 1] value maps
    assert stacked and all(torch.equal(trained[k][:, 1], initial[k][:, 1]) for k in stacked)  # zero gradient
    assert all(not torch.equal(trained[k][:, 0], initial[k][:, 0]) for k in stacked)


TWO_RUNS = """
import sys
from kvdistill.config import load_config
from kvdistill.train.trainer import train

config, out = sys.argv[1], sys.argv[2]
train(load_config(config, ["train.batch_size=1"]), out + "/fp32", progress=False)
train(load_config(config, ["train.batch_size=1", "train.mixed_precision=bf16"]), out + "/bf16",
      progress=False)
"""


@pytest.mark.slow
def test_two_runs_in_one_ddp_process(tiny_yaml, tmp_path, files):
    """Curriculum phases train one after another in the same processes: the process group survives the first
    run, and the second may change mixed precision."""
    script = tmp_path / "two.py"
    script.write_text(TWO_RUNS)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tiny_yaml), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp32, bf16 = files.metrics(tmp_path / "fp32"), files.metrics(tmp_path / "bf16")
    assert [r["step"] for r in bf16] == [1, 2] and bf16[0]["tokens"] == fp32[0]["tokens"] == 2 * 32
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=1e-2) and bf16[0]["loss"] != fp32[0]["loss"]


NAN_ON_ONE_RANK = """
import json, math, sys
import torch
from accelerate import Accelerator
from kvdistill.train.divergence import NonFiniteLoss, stop_if_non_finite

acc = Accelerator(cpu=True)
rank = acc.process_index
records = [{"id": f"r{rank}a"}, {"id": f"r{rank}b"}]
stop_if_non_finite(acc, 1.0, {"loss": 1.0}, 3, 0, records, None)  # finite everywhere: returns
loss = math.nan if rank == 1 else 2.0
try:
    stop_if_non_finite(acc, loss, {"loss": loss, "loss/kv/t": loss}, 4, 1, records, None)
    problem = None
except NonFiniteLoss as err:
    problem = err.problem
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "problem": problem}, f)
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_nan_on_one_process_stops_every_process(tmp_path):
    """A NaN loss on process 1 only: both processes stop before the gradient all-reduce (none is left
    waiting), and both name process 1's samples."""
    script = tmp_path / "nan.py"
    script.write_text(NAN_ON_ONE_RANK)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected = (
        "loss is nan on process 1 at step 5, micro-batch 1 (samples ['r1a', 'r1b']); "
        "non-finite terms: ['loss/kv/t']"
    )
    assert rows == [{"rank": 0, "problem": expected}, {"rank": 1, "problem": expected}]


# ------------------------------------------------------------------------------------------ resume, schedule
RESUMABLE = [
    "train.steps=4",
    "train.batch_size=2",
    "train.grad_accum=2",
    "train.warmup_steps=2",
    "train.schedule=cosine",
    "train.save_every=2",
]


@pytest.fixture(scope="module")
def full_run(tiny_config, tmp_path_factory):
    """4 steps, warmup 2 + cosine, checkpoints at steps 2 and 4, uninterrupted."""
    out = tmp_path_factory.mktemp("full") / "run"
    train(tiny_config(*RESUMABLE), out, progress=False)
    return out


def test_warmup_cosine_schedule_is_logged(full_run, files):
    """lr of each step as used: 1e-3 · s/2 during warmup, then 1e-3 · (1 + cos(π (s - 2) / 2)) / 2."""
    lrs = [r["lr"] for r in files.metrics(full_run)]
    expected = [0.0, 0.5e-3, 1e-3, 0.5e-3]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_resume_matches_the_uninterrupted_run(tiny_config, tiny_yaml, full_run, tmp_path, cli, files):
    out = tmp_path / "resumed"
    train(tiny_config(*RESUMABLE), out, stop_after=2, progress=False)
    assert latest_checkpoint(out).name == "step-2"
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    (out / "checkpoints/step-3.tmp/state").mkdir(parents=True)  # what a crash while saving leaves behind
    assert latest_checkpoint(out).name == "step-2"
    code, err = cli("train", tiny_yaml, "--out", out, "--resume", *RESUMABLE)
    assert code == 0, err
    full, resumed = files.metrics(full_run), files.metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ra, rb in zip(full, resumed, strict=True):
        assert rb["lr"] == ra["lr"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
    for sub in ("final", "checkpoints/step-4/state"):
        assert files.max_diff(files.weights(full_run / sub), files.weights(out / sub)) < 1e-6, sub
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == sum(r["tokens"] for r in full)


@pytest.mark.parametrize("sub", ["final", "checkpoints/step-2/student"])
def test_saved_students_load_with_plain_transformers_and_generate(full_run, sub, files):
    path = full_run / sub
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == model.config.vocab_size == 50257  # GPT-2 tokenizer
    ids = tok("Question: what is 2 plus 3?", return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id
    )
    assert out.shape == (1, ids["input_ids"].shape[1] + 6)
    assert isinstance(tok.decode(out[0]), str)
    # one copy of the student per checkpoint: state/ holds the rest of the objective (the projectors)
    step = "step-4" if sub.startswith("final") else "step-2"
    state = files.weights(full_run / f"checkpoints/{step}/state")
    assert state and not any(k.startswith("student.") for k in state)
    saved = files.weights(path)
    if sub.startswith("final"):  # the final student is the last checkpoint's, the rest beside it
        assert files.max_diff(saved, files.weights(full_run / "checkpoints/step-4/student")) == 0.0
        assert files.max_diff(saved, files.weights(full_run / "checkpoints/step-2/student")) > 1e-4
        rest = load_file(str(path / "kvdistill/objective.safetensors"))
        assert files.max_diff(rest, state) == 0.0
        assert json.loads((path / "kvdistill/trainer_state.json").read_text())["step"] == 4


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_student_saves_a_merged_model_and_its_adapter(tiny_config, tmp_path, files):
    from peft import PeftModel

    cfg = tiny_config("student.lora.r=4", "student.lora.alpha=8", "train.lr=1e-2")
    out = tmp_path / "lora"
    train(cfg, out, progress=False)
    merged = files.weights(out / "final")
    assert not any("lora" in k for k in merged)
    adapter = out / "final/adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    # only the adapters (and the maps) trained: the checkpointed base weights are the initial ones
    base, _ = build_student(
        cfg.model_copy(update={"student": cfg.student.model_copy(update={"lora": None})}).student,
        seed=cfg.train.seed,
    )
    # state/ holds the adapters only: the frozen base is what the config builds (a resume rebuilds it)
    state = files.weights(out / "checkpoints/step-2/state", prefix="student.base_model.model.")
    assert state and all("lora_" in k for k in state)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}  # peft merges into `base` below
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)  # B starts at 0: it trained
    # base + adapter, merged by peft, is the saved merged student
    reloaded = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    again = {k: v for k, v in reloaded.state_dict().items() if k in merged}
    assert files.max_diff(again, merged) < 1e-6
    assert files.max_diff({k: base_state[k] for k in merged}, merged) > 1e-4
    plain = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(plain).__name__ == "LlamaForCausalLM"


def test_lora_student_resumes_exactly(tiny_config, tmp_path, files):
    """state/ holds a LoRA student's adapters only; the resume rebuilds the frozen base from the config."""
    args = (
        "student.lora.r=4",
        "student.lora.alpha=8",
        "train.lr=1e-2",
        "train.steps=4",
        "train.save_every=2",
    )
    full, out = tmp_path / "full", tmp_path / "resumed"
    train(tiny_config(*args), full, progress=False)
    train(tiny_config(*args), out, stop_after=2, progress=False)
    train(tiny_config(*args), out, resume=True, progress=False)
    assert files.max_diff(files.weights(full / "final"), files.weights(out / "final")) < 1e-6


# ------------------------------------------------------------------------------------------ checkpoint limit
def test_save_total_limit_keeps_the_newest_and_the_best(tiny_config, tmp_path):
    out = tmp_path / "limited"
    train(
        tiny_config(
            "train.steps=5",
            "train.save_every=1",
            "train.eval_every=1",
            "data.size=16",
            "data.eval_size=4",
            "train.save_total_limit=2",
            "train.lr=0.05",
        ),
        out,
        progress=False,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/ce"] for r in rows if r.get("split") == "eval"}
    assert sorted(evals) == [1, 2, 3, 4, 5]  # one evaluation per step (the last one not repeated)
    best = min(evals, key=lambda step: (evals[step], -step))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted({f"step-{s}" for s in (4, 5, best)})
    for name in kept:
        state = json.loads((out / "checkpoints" / name / "trainer_state.json").read_text())
        assert state["eval_ce"] == evals[state["step"]]


# ------------------------------------------------------------------------------------------ trackers
def test_wandb_tracker_writes_its_files_offline(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline unless the user says otherwise
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "tracked"
    train(tiny_config("train.report_to=[wandb]"), out, progress=False)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files_ = list(runs[0].glob("run-*.wandb"))
    assert len(files_) == 1
    data = files_[0].read_bytes()  # wandb's record log (protobuf): keys and JSON values are stored as text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # one prefix per teacher; the other training figures under train/
        for key, logged in (
            ("loss/kv/qwen2", b"teacher/qwen2/kv"),
            ("weight/gemma3", b"teacher/gemma3/weight"),
            ("loss", b"train/loss"),
        ):
            assert logged in data and json.dumps(row[key]).encode() in data, key
    assert b"train.steps" in data  # the run's settings, as its config
    assert not (out / "tb").exists()


def test_tensorboard_tracker_logs_every_figure_under_its_prefix(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb-run"
    train(tiny_config("train.tensorboard=true", "data.size=16", "data.eval_size=4"), out, progress=False)
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/loss/ce",
        "teacher/qwen2/kv",
        "teacher/gemma3/weight",
        "eval/ce",
        "teacher/qwen2/eval_kv_error",
    } <= tags
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("teacher/qwen2/kv")] == pytest.approx(
        [r["loss/kv/qwen2"] for r in rows if "loss/kv/qwen2" in r]
    )


def test_a_tracker_that_is_not_installed_is_refused_by_validate_and_train(tiny_yaml, tmp_path, cli):
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    for command in (["validate", tiny_yaml], ["train", tiny_yaml, "--out", tmp_path / "run"]):
        code, err = cli(*command, "train.report_to=[mlflow]")
        assert code == 2 and "pip install mlflow" in err and "train.report_to" in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ full CLI run
@pytest.mark.slow
def test_cli_run_on_the_real_teachers(tmp_path, cli, files):
    """The quickstart config (SmolLM2-135M + Gemma-3-270M) for 2 steps: every output a run promises."""
    out = tmp_path / "qs"
    code, err = cli(
        "train",
        "quickstart",
        "--out",
        out,
        "train.steps=2",
        "train.batch_size=2",
        "train.save_every=1",
        "train.warmup_steps=1",
        "data.size=10",
        "data.eval_size=2",
        "data.max_length=40",
    )
    assert code == 0, err
    rows = files.metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 1e-3])
    for row in rows:
        for name in ("smollm2", "gemma3"):
            assert 0.0 < row[f"loss/kv/{name}"] < 100.0
            assert row[f"weight/{name}"] == 0.5
        assert row["loss"] == pytest.approx(row["loss/ce"] + row["loss/kd"], rel=1e-5)
        assert row["loss/kd"] == pytest.approx((row["loss/kv/smollm2"] + row["loss/kv/gemma3"]) / 2, rel=1e-5)
        assert row["tokens"] <= 2 * 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens"] == sum(r["tokens"] for r in rows)
    assert math.isfinite(summary["eval/ce"]) and "eval/kv_error/smollm2" in summary
    plan = json.loads((out / "plan.json").read_text())
    assert [t["geometry"]["num_kv_heads"] for t in plan["teachers"]] == [3, 1]
    assert plan["student"]["num_layers"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    for step in ("step-1", "step-2"):
        assert {"student", "state", "scheduler.pt", "trainer_state.json"} <= {
            p.name for p in (out / "checkpoints" / step).iterdir()
        }
    assert json.loads((out / "checkpoints/step-2/trainer_state.json").read_text())["step"] == 2
    assert (out / "final/config.json").is_file() and (out / "final/model.safetensors").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "name: quickstart" in (out / "config.yaml").read_text()
    eval_rows = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("split") == "eval"
    ]
    assert len(eval_rows) == 1 and eval_rows[0]["step"] == 2
    sample = json.loads((out / "alignment_sample.json").read_text())
    assert sorted(sample["teachers"]) == ["gemma3", "smollm2"]
    for entry in sample["teachers"].values():  # (student tokens, teacher tokens) character-overlap matrix
        assert len(entry["alignment"]) == len(sample["student"]["tokens"])
        assert {len(r) for r in entry["alignment"]} == {len(entry["tokens"])}
