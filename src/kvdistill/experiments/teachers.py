"""The teachers of an experiment: which ones the chosen conditions read (`teachers_needed`), and their
preparation (`prepare_teachers`): each trained as its own CE run under DIR/teachers/NAME (or used as given,
`steps: 0`), scored on the held-out records (teacher.json) and checked against its required exact match."""

from __future__ import annotations

import json
from pathlib import Path

from kvdistill.atomic import write_json_atomic
from kvdistill.config import load_config
from kvdistill.errors import KvdistillError
from kvdistill.experiments import memory
from kvdistill.experiments.conditions import base_raw, teacher_config
from kvdistill.experiments.pool import resolve_concurrent, train_all
from kvdistill.experiments.score import evaluate_run
from kvdistill.experiments.spec import ExperimentSpec
from kvdistill.rundir import student_dir as student_of


def teachers_needed(spec: ExperimentSpec, names: list[str]) -> list[str]:
    """The teachers the conditions `names` read, and the one the student starts from, in the spec's order."""
    used = {spec.student_from, *(t for n in names for t in spec.conditions[n].teachers)}
    return [prep.name for prep in spec.teachers if prep.name in used]


def prepare_teachers(
    spec: ExperimentSpec, out: Path, held: list[dict], names: list[str] | None = None
) -> dict[str, dict]:
    """Train (or reuse) the teachers the conditions `names` need (None: every teacher of the spec),
    `spec.concurrent` at once; a teacher of `steps: 0` is used as given. {name: {model, exact_match, ppl,
    params}}. Stops when one is below its required exact match."""
    from kvdistill.models.load import resolve_path

    wanted = set(teachers_needed(spec, names) if names is not None else (p.name for p in spec.teachers))
    preps = [prep for prep in spec.teachers if prep.name in wanted]
    given = {prep.name for prep in preps if prep.steps == 0}
    dirs = {prep.name: out / "teachers" / prep.name for prep in preps}
    configs = {prep.name: teacher_config(spec, prep) for prep in preps if prep.name not in given}
    pending = [
        (dirs[n], cfg)
        for n, cfg in configs.items()
        if not (dirs[n] / "teacher.json").is_file()
        and not (dirs[n] / "final" / "config.json").is_file()
        and not (dirs[n] / "final" / "student").is_dir()
    ]
    estimate = memory.run_estimator({})  # a teacher's own run reads no teachers
    train_all(
        pending,
        resolve_concurrent(spec, [cfg for _, cfg in pending], {}, estimate) if pending else 1,
        estimate=estimate,
        ramp_s=spec.memory_ramp_s,
    )
    info = {}
    for prep in preps:
        run_dir = dirs[prep.name]
        record = run_dir / "teacher.json"
        model = prep.model if prep.name in given else str(student_of(run_dir / "final"))
        if not record.is_file():
            got = {"params": _param_count(Path(resolve_path(model)))}
            if prep.name not in given or prep.min_exact_match > 0:  # a given teacher is scored where asked
                cfg = configs.get(prep.name) or load_config(raw=base_raw(spec))
                ev = evaluate_run(model, held, cfg, spec)
                got.update(
                    {
                        "exact_match": ev.get("exact_match"),
                        "ppl": ev["ppl"],
                        **{k: v for k, v in ev.items() if k.startswith("exact_match_")},
                        "samples": ev.get("samples", []),
                    }
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(record, got)
        got = json.loads(record.read_text())
        info[prep.name] = {"model": model, **got}
        # a specialist must be competent on its own skill (its held-out exact match there), others on
        # everything
        key = f"exact_match_{prep.skill}" if prep.skill else "exact_match"
        em = got.get(key)
        if prep.min_exact_match > 0 and (em is None or em < prep.min_exact_match):
            raise KvdistillError(
                f"teacher '{prep.name}' reached held-out exact "
                f"match{f' on {prep.skill}' if prep.skill else ''} {em} "
                f"< the required {prep.min_exact_match}: "
                "without competent teachers no comparison means anything",
                f"train it longer (teachers.{prep.name}.steps, now {prep.steps}) or larger, then rerun "
                f"(delete {record} to re-evaluate), or lower min_exact_match",
            )
    return info


def _param_count(student_dir: Path) -> int:
    """Parameters of a saved model, from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(student_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= int(d)
                total += n
    return total
