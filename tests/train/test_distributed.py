"""train.distributed fsdp (FSDP2) on 2 CPU processes (gloo): the same weights as DDP, exact resume after a
killed process, a checkpoint of 2 processes resumed by 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvdistill.train.distributed import fsdp_problems, student_blocks

TOL = 1e-5  # float32: sharded and replicated AdamW differ only in summation order


def torchrun(yaml, out, *overrides, resume=False, nproc=2, wait=True):
    """`kvdistill train` under torchrun (2 gloo processes on CPU); the finished process, or the running
    one."""
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"),
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "kvdistill.cli",
        "train",
        str(yaml),
        "--out",
        str(out),
        *overrides,
    ]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if not wait:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_fsdp_refuses_what_it_does_not_shard(tiny_config):
    assert fsdp_problems(tiny_config("train.distributed=fsdp")) == []
    problems = fsdp_problems(
        tiny_config(
            "train.distributed=fsdp",
            "train.mixed_precision=fp16",
            "train.early_stopping.patience=2",
            "train.eval_every=1",
            "data.val_size=2",
        )
    )
    assert len(problems) == 2 and "fp16" in problems[0] and "train.early_stopping" in problems[1]
    assert all("train.distributed=ddp" in p for p in problems)
    assert fsdp_problems(tiny_config("train.mixed_precision=fp16")) == []  # ddp: nothing refused here


def test_student_blocks_are_the_decoder_layers_also_under_lora(tiny_config):
    from kvdistill.student import build_student

    dense, _ = build_student(tiny_config().student)
    lora, _ = build_student(tiny_config("student.lora.r=4").student)
    for model in (dense, lora):
        blocks = student_blocks(model)
        assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["dense", "lora"])
def test_fsdp_and_ddp_give_the_same_weights(lora, tiny_yaml, tmp_path, files):
    """2 processes, 3 steps of batch 1 × accumulation 2, the tiny student and both tiny online teachers: the
    student's weights, the maps' and every logged loss and gradient norm agree between ddp and fsdp; the final
    student of fsdp (gathered on process 0) loads with from_pretrained; summary.json has each process's
    memory."""
    extra = ["train.batch_size=1", "train.grad_accum=2", "train.steps=3"] + (
        ["student.lora.r=4"] if lora else []
    )
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    torchrun(tiny_yaml, ddp, *extra)
    torchrun(tiny_yaml, fsdp, *extra, "train.distributed=fsdp")
    for ra, rb in zip(files.metrics(ddp), files.metrics(fsdp), strict=True):
        for key in ("loss", "loss/kv/qwen2", "loss/kv/gemma3", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
    a, b = files.weights(ddp / "final"), files.weights(fsdp / "final")
    assert a.keys() == b.keys() and files.max_diff(a, b) < TOL
    # a ddp checkpoint keeps the student once, in student/ (state/ holds the maps); fsdp's state/ holds both
    state_a, state_b = (
        files.weights(ddp / "checkpoints/step-3/state"),
        files.weights(fsdp / "checkpoints/step-3/state"),
    )
    assert state_a.keys() <= state_b.keys()
    assert files.max_diff(state_a, {k: state_b[k] for k in state_a}) < TOL  # the maps
    student_a = files.weights(ddp / "checkpoints/step-3/student")
    student_b = files.weights(fsdp / "checkpoints/step-3/student")
    assert student_a.keys() == student_b.keys() and files.max_diff(student_a, student_b) < TOL
    opt_a = torch.load(ddp / "checkpoints/step-3/state/optimizer.bin", weights_only=True)
    opt_b = torch.load(fsdp / "checkpoints/step-3/state/optimizer.bin", weights_only=True)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, s in opt_a["state"].items():
        assert torch.allclose(s["exp_avg"], opt_b["state"][i]["exp_avg"], atol=1e-6)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(fsdp / "final")
    memory = json.loads((fsdp / "summary.json").read_text())["memory"]
    ddp_memory = json.loads((ddp / "summary.json").read_text())["memory"]
    assert [m["process"] for m in memory] == [0, 1]
    # each process holds about half of the student (sharded on dim 0 of every tensor); the student's optimizer
    # state is split between the processes, the maps' (two fp32 moments of the replicated maps) held by both
    whole = ddp_memory[0]
    assert sum(m["optimizer_state_bytes"] for m in memory) == pytest.approx(
        whole["optimizer_state_bytes"] + 2 * whole["maps_params_bytes"], rel=0.02
    )
    for m in memory:
        assert 0.4 < m["student_params_bytes"] / whole["student_params_bytes"] < 0.6
        assert m["optimizer_state_bytes"] < whole["optimizer_state_bytes"]
        assert m["teacher_params_bytes"] == ddp_memory[0]["teacher_params_bytes"] > 0  # replicated
        assert m["peak_allocated_bytes"] is None  # CPU


@pytest.mark.slow
def test_fsdp_resumes_after_a_killed_process_and_in_one_process(tiny_yaml, tmp_path, files):
    """fsdp, 2 processes, 4 steps, a checkpoint every step: process 1 is killed mid-run; `--resume` on 2
    processes ends with the weights of an uninterrupted run, and the checkpoint of step 2 resumed by 1 process
    (the full state it holds) ends there too."""
    extra = ["train.batch_size=1", "train.steps=4", "train.save_every=1", "train.distributed=fsdp"]
    whole, killed, one = tmp_path / "whole", tmp_path / "killed", tmp_path / "one"
    torchrun(tiny_yaml, whole, *extra)
    proc = torchrun(tiny_yaml, killed, *extra, wait=False)
    try:  # kill process 1 once the checkpoint of step 2 exists (before the run ends)
        deadline = time.time() + 240
        while not (killed / "checkpoints/step-2/trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, (
                proc.stderr.read()[-3000:] if proc.stderr else ""
            )
            time.sleep(0.2)
        worker = _rank_pid(proc.pid, 1)
        os.kill(worker, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and not (killed / "final").exists()
    torchrun(tiny_yaml, killed, *extra, resume=True)
    assert files.max_diff(files.weights(whole / "final"), files.weights(killed / "final")) < TOL
    # 2 -> 1: the run directory of step 2, resumed by one process with batch 2 (the same samples per step)
    import shutil

    one.mkdir()
    for name in ("data.json", "plan.json", "alignment_sample.json", "metrics.jsonl"):
        shutil.copy(killed / name, one / name)
    shutil.copytree(killed / "checkpoints/step-2", one / "checkpoints/step-2")
    from kvdistill.config import dump_config, load_config
    from kvdistill.train.trainer import train

    cfg = load_config(str(killed / "config.yaml"), ["train.batch_size=2"])
    assert cfg.train.distributed == "fsdp"
    (one / "config.yaml").write_text(dump_config(cfg))
    train(cfg, one, resume=True, progress=False)
    assert files.max_diff(files.weights(whole / "final"), files.weights(one / "final")) < TOL


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (read from /proc)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if ppid == launcher and f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


def test_one_process_with_cpu_offload_trains_as_without(tiny_config, tmp_path, files):
    """fsdp with cpu_offload on one process (a group of one; on a GPU: the shards, gradients and AdamW state
    in host memory) gives the weights of a plain run, and its final student loads with from_pretrained."""
    from kvdistill.train.trainer import train

    plain, offload = tmp_path / "plain", tmp_path / "offload"
    train(tiny_config(), plain, progress=False)
    summary = train(
        tiny_config("train.distributed=fsdp", "train.fsdp.cpu_offload=true"), offload, progress=False
    )
    a, b = files.weights(plain / "final"), files.weights(offload / "final")
    assert a.keys() == b.keys() and files.max_diff(a, b) < TOL
    assert summary["memory"][0]["optimizer_state_bytes"] > 0
