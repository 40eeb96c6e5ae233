"""The cache budget of an experiment: which records the `cache: true` runs read, their teachers' extraction
(in a child process, so the runner holds no GPU memory), and its cost amortised over the runs that read it.

Records a run reads (`records_read`): the train records its optimizer steps draw (`kvdistill.train.loader`'s
sample stream: steps · batch · grad_accum records of its seed's order, one process), the held-out records its
evaluations run the teachers on (the validation split, else the eval split; the loss space reports per-layer
K/V errors there) and, for fusion.space latent, the first `fusion.latent.fit_samples` train records its maps
are fitted on. A teacher's cache holds the union over every (condition, seed) that reads it, nothing else.

Cost of teacher t's extraction: its measured wall seconds and FLOPs = 2 · N_t · (teacher tokens extracted).
Its readers R_t = the (condition, seed) runs whose condition reads t's cache. Each such run is charged

    amortised_s(run)     = Σ_{t in its teachers} seconds_t / R_t
    amortised_flops(run) = Σ_{t in its teachers} flops_t / R_t

so the charges of all runs add up to the extractions' whole cost.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from kvdistill.atomic import write_json_atomic
from kvdistill.config.schema import DataConfig, RunConfig, TeacherConfig
from kvdistill.errors import KvdistillError

log = logging.getLogger(__name__)


def records_read(cfg: RunConfig) -> set[str]:
    """Ids of every record the run of `cfg` (one process) asks its teachers for (module docstring)."""
    from kvdistill.data import load_records
    from kvdistill.train.loader import sample_stream

    train = load_records(cfg.data, split="train")
    t = cfg.train
    order_seed = cfg.data.seed + 1_000_003 * t.seed  # as `kvdistill.train.loader.micro_batch`
    picked = sample_stream(len(train), order_seed, 0, t.steps * t.batch_size * t.grad_accum)
    ids = {str(train[i]["id"]) for i in picked}
    held = "val" if cfg.data.val_size else "eval"
    if cfg.data.val_size or cfg.data.eval_size:
        ids |= {str(r["id"]) for r in load_records(cfg.data, split=held)}
    if cfg.fusion.space == "latent":
        ids |= {str(r["id"]) for r in train[: cfg.fusion.latent.fit_samples]}
    return ids


def extract_in_child(
    teacher: TeacherConfig,
    data: DataConfig,
    out_dir: Path,
    ids: set[str],
    record: Path,
    *,
    batch_size: int = 32,
) -> dict:
    """Extract `ids` of teacher `teacher` into `out_dir` in a child process (`python -m
    kvdistill.experiments.budget JOB`), which gives its GPU memory back when it exits; its result is written
    to `record` and returned: {seconds, tokens, records}."""
    job = record.with_suffix(".job.json")
    write_json_atomic(
        job,
        {
            "teacher": teacher.model_dump(mode="json"),
            "data": data.model_dump(mode="json"),
            "out_dir": str(out_dir),
            "ids": sorted(ids),
            "batch_size": batch_size,
            "record": str(record),
        },
    )
    logfile = record.with_suffix(".log")
    with logfile.open("a") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "kvdistill.experiments.budget", str(job)],
            stdout=f,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0 or not record.is_file():
        raise KvdistillError(
            f"extracting the cache of teacher '{teacher.name}' failed (exit {proc.returncode})",
            f"read {logfile}; rerun the same command to resume it",
        )
    return json.loads(record.read_text())


def _main(job_path: str) -> None:
    from kvdistill.cache.extract import extract

    job = json.loads(Path(job_path).read_text())
    res = extract(
        TeacherConfig.model_validate(job["teacher"]),
        DataConfig.model_validate(job["data"]),
        job["out_dir"],
        batch_size=job["batch_size"],
        progress=False,
        only_ids=set(job["ids"]),
    )
    write_json_atomic(
        Path(job["record"]), {"seconds": res["seconds"], "tokens": res["tokens"], "records": res["records"]}
    )


def amortise(extraction: dict[str, dict], readers: dict[str, list[str]], params: dict[str, int]) -> dict:
    """Fill each teacher's extraction record with flops (2 · N_t · tokens), readers (R_t) and the per-run
    shares seconds_per_reader / flops_per_reader; `readers`: teacher -> the runs ("CONDITION/seed-S") reading
    its cache."""
    out = {}
    for t, rec in extraction.items():
        n = len(readers[t])
        flops = 2 * params[t] * rec["tokens"]
        out[t] = {
            **rec,
            "flops": flops,
            "readers": n,
            "runs": sorted(readers[t]),
            "seconds_per_reader": rec["seconds"] / n,
            "flops_per_reader": flops / n,
        }
    return out


if __name__ == "__main__":  # the child process of `extract_in_child`
    logging.basicConfig(level=logging.INFO)
    _main(sys.argv[1])
