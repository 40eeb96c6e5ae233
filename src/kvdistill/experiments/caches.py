"""The teacher caches of an experiment's `cache: true` conditions (`prepare_caches`): each teacher's records
that the cached runs read, extracted once in a child process (`kvdistill.experiments.budget`) under
DIR/caches/NAME, its cost in DIR/caches/NAME.json and amortised over the runs that read it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kvdistill.atomic import write_json_atomic
from kvdistill.config.schema import RunConfig
from kvdistill.errors import KvdistillError
from kvdistill.experiments.spec import ExperimentSpec

log = logging.getLogger(__name__)


def prepare_caches(
    spec: ExperimentSpec, out: Path, configs: dict[tuple[str, int], RunConfig], teachers: dict[str, dict]
) -> dict[str, dict]:
    """Extract (or reuse) the cache of every teacher a `cache: true` run of `configs` reads, holding exactly
    the records those runs read (`budget.records_read`), each in a child process: DIR/caches/NAME, its cost in
    DIR/caches/NAME.json; sets teachers[NAME]["cache_dir"]. Returns {NAME: {seconds, tokens, records, flops,
    readers, runs, seconds_per_reader, flops_per_reader}} (`budget.amortise`)."""
    from kvdistill.config.schema import TeacherConfig
    from kvdistill.experiments.budget import amortise, extract_in_child, records_read

    readers: dict[str, list[str]] = {}
    ids: dict[str, set[str]] = {}
    data_cfg = {}
    for (n, s), cfg in configs.items():
        if not spec.conditions[n].cache:
            continue
        read = records_read(cfg)
        for t in spec.conditions[n].teachers:
            readers.setdefault(t, []).append(f"{n}/seed-{s}")
            ids.setdefault(t, set()).update(read)
            pool = cfg.data.model_copy(update={"eval_size": 0, "val_size": 0, "train_size": None})
            if data_cfg.setdefault(t, pool) != pool:
                raise KvdistillError(
                    f"the cached runs of teacher '{t}' read different data pools ({n}: {pool})",
                    "give the cached conditions one data pool (they may differ in "
                    "data.train_size / eval_size / val_size only)",
                )
    costs = {}
    for t in sorted(readers):
        d = out / "caches" / t
        record = out / "caches" / f"{t}.json"
        if record.is_file() and json.loads(record.read_text()).get("ids") != _digest(ids[t]):
            raise KvdistillError(
                f"the cache of teacher '{t}' in {d} holds other records than these runs read",
                f"delete {d} and {record} (the runs changed), then rerun",
            )
        if not record.is_file():
            log.info("extracting the %d records of teacher %s the cached runs read", len(ids[t]), t)
            d.parent.mkdir(parents=True, exist_ok=True)
            res = extract_in_child(
                TeacherConfig(name=t, model=teachers[t]["model"]),
                data_cfg[t],
                d,
                ids[t],
                record.with_suffix(".part.json"),
            )
            write_json_atomic(record, {**res, "ids": _digest(ids[t])})
        teachers[t]["cache_dir"] = str(d)
        costs[t] = {k: v for k, v in json.loads(record.read_text()).items() if k != "ids"}
    return amortise(costs, readers, {t: teachers[t]["params"] for t in costs})


def _digest(ids: set[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
