"""Starting a run in its directory DIR: one writer at a time, and a `--resume` that continues only the run it
finds.

One writer: `RunLock`, the lock file DIR/.train.lock (filelock) that the main process takes before the run's
first write and holds to its end (released on every exit path; the kernel drops it when the process dies), the
holder (pid, host, start) in DIR/.train.holder.json. A second `kvdistill train` into DIR is refused, naming
it.

What `--resume` continues (`plan_start`):
- the config: the resolved config equals DIR/config.yaml field by field, except `RESUMABLE` (train.steps, the
  save/eval/log intervals, train.lr), which take effect from the resumed step on;
- the data: the same train and eval records as when the run started (DIR/data.json: counts and sha256);
- the newest intact checkpoint (`checkpoint_problem`), or step 0 when the run stopped before its first one;
  `load_resumed` falls back past one that does not load, and `apply_configured_lrs` puts the configured lrs
  into the restored optimizer and schedule.

Every check only reads: a refused start leaves DIR exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvdistill.config import DataConfig, RunConfig, parse_config, resolve_paths
from kvdistill.errors import KvdistillError
from kvdistill.paths import dir_problem, escapes
from kvdistill.train.checkpoint import intact_checkpoints, list_checkpoints, load_checkpoint

__all__ = [
    "DATA",
    "RESUMABLE",
    "RunLock",
    "StartPlan",
    "apply_configured_lrs",
    "check_data",
    "config_differences",
    "data_fingerprint",
    "load_resumed",
    "note_changes",
    "plan_start",
]

log = logging.getLogger(__name__)

RESUMABLE = (
    "train.steps",
    "train.save_every",
    "train.save_total_limit",
    "train.eval_every",
    "train.log_every",
    "train.lr",
    "train.distributed",
    "train.fsdp.cpu_offload",
    "train.fsdp.reshard_after_forward",
)
"""The config fields a resume may change; every other field must equal the run's config.yaml. ddp and fsdp
write the same full-state checkpoint (`kvdistill.train.distributed`), so a run may switch between them on
resume."""

RUN_FILES = (
    "config.yaml",
    "data.json",
    "plan.json",
    "alignment_sample.json",
    "metrics.jsonl",
    "summary.json",
    "checkpoints",
    "final",
    "tb",
    "eval.json",
    "best",
    "best.tmp",
    "best.json",
)
"""What a run writes at the top of its directory (none of them may be a symlink leading out)."""
LEGACY = ("config.yaml", "plan.json")  # a run directory written before the `.kvdistill-run` marker
DATA = "data.json"  # {"train": {"records": n, "sha256": hex}, "eval": {...}}: the records the run trains on
LOCK = ".train.lock"
HOLDER = ".train.holder.json"
# data fields whose being set (not only their value) decides how a file is read (kvdistill.data.records)
_MODE_FIELDS = tuple(sorted(DataConfig.presence_fields))


# ---------------------------------------------------------------------------------------------- one writer
class RunLock:
    """DIR/.train.lock: one `kvdistill train` writes DIR at a time (taken by the main process only)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK
        self._lock = None

    def check(self) -> None:
        """Refuse a directory that another run holds; only reads (creates nothing, changes no file)."""
        if self._held_elsewhere():
            raise self._busy()

    def acquire(self) -> None:
        """Take the lock (creating DIR) and record the holder; refuse when another run holds it."""
        from filelock import FileLock, Timeout

        self.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise self._busy() from None
        self._lock = lock
        try:
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            tmp = self.dir / (HOLDER + ".tmp")
            tmp.write_text(json.dumps(holder))
            os.replace(tmp, self.dir / HOLDER)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the lock back (a no-op when not held)."""
        if self._lock is None:
            return
        try:
            (self.dir / HOLDER).unlink(missing_ok=True)
        finally:
            self._lock.release()
            self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def _held_elsewhere(self) -> bool:
        """Whether some process holds the lock: a shared flock tried on a read-only descriptor, so the probe
        never creates or truncates the file (filelock's own acquire may). Unknown (no flock): False, and
        `acquire` decides."""
        if not self.path.is_file():
            return False
        try:
            import fcntl
        except ImportError:  # not POSIX
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # also drops the shared lock, if it was taken
        return False

    def _busy(self) -> KvdistillError:
        return KvdistillError(
            f"another `kvdistill train` is writing {self.dir} ({self._holder()}; lock file {self.path})",
            "wait for that run to finish (or stop it), or choose another --out",
        )

    def _holder(self) -> str:
        try:
            h = json.loads((self.dir / HOLDER).read_text())
            return f"pid {h['pid']} on {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"


# ---------------------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class Difference:
    key: str
    stored: Any  # in DIR/config.yaml
    given: Any  # in the config of this start

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.stored)} in config.yaml, {_show(self.given)} now"


_ABSENT = object()


class _Words(str):
    """A description shown as is (whether a field is set), not as a quoted value."""


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "absent"
    return value if isinstance(value, _Words) else json.dumps(value)


def config_differences(stored: RunConfig, given: RunConfig) -> list[Difference]:
    """Every field (dotted key, list items by index) whose value differs between two configs; also data fields
    whose being set decides how a data file is read (text vs template mode)."""
    out: list[Difference] = []
    _diff(stored.model_dump(mode="json"), given.model_dump(mode="json"), "", out)
    for name in _MODE_FIELDS:
        a, b = (name in c.data.model_fields_set for c in (stored, given))
        if a != b:
            words = {True: _Words("set explicitly"), False: _Words("left to its default")}
            out.append(Difference(f"data.{name}", words[a], words[b]))
    return out


def _diff(a: Any, b: Any, key: str, out: list[Difference]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            _diff(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{key}.{k}" if key else k, out)
    elif isinstance(a, list) and isinstance(b, list) and any(isinstance(x, dict) for x in a + b):
        if len(a) != len(b):
            out.append(Difference(f"{key} (entries)", len(a), len(b)))
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _diff(x, y, f"{key}.{i}", out)
    elif a != b:
        out.append(Difference(key, a, b))


def _stored_config(path: Path) -> RunConfig:
    try:
        raw = yaml.safe_load(path.read_text())
        return resolve_paths(parse_config(raw, source=str(path)))  # older runs' relative paths: from here
    except (OSError, yaml.YAMLError, KvdistillError) as err:
        raise KvdistillError(
            f"--resume: {path} (the config the run was started with) cannot be read back: {err}",
            "start a new run with a new --out",
        ) from None


# ---------------------------------------------------------------------------------------------- the data
def data_fingerprint(train_records: list[dict], eval_records: list[dict]) -> dict:
    """Counts and sha256 of the train and eval records (what DIR/data.json holds)."""

    def digest(records: list[dict]) -> dict:
        blob = json.dumps(records, sort_keys=True, ensure_ascii=False).encode()
        return {"records": len(records), "sha256": hashlib.sha256(blob).hexdigest()}

    splits = {"train": digest(train_records), "eval": digest(eval_records)}
    return {**splits, "sha256": _self_hash(splits)}


def _self_hash(splits: dict) -> str:
    """sha256 of data.json's own content (its splits), so a damaged file is told from changed data."""
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


def check_data(out_dir: str | os.PathLike, fingerprint: dict, cfg: RunConfig) -> None:
    """On resume: refuse records other than those the run started with (DIR/data.json; absent: not
    checked)."""
    path = Path(out_dir) / DATA
    if not path.is_file():
        return
    damaged = None
    try:
        stored = json.loads(path.read_text())
        splits = {k: stored[k] for k in ("train", "eval")}
        for split in splits.values():
            split["records"], split["sha256"][:12]  # noqa: B018 (the fields the comparison reads)
    except (OSError, ValueError, KeyError, TypeError) as err:
        damaged = f"it cannot be read ({type(err).__name__}: {err})"
    else:
        if "sha256" in stored and stored["sha256"] != _self_hash(splits):
            damaged = (
                f"its content hash is {_self_hash(splits)[:16]}..., expected {str(stored['sha256'])[:16]}..."
            )
    if damaged:
        raise KvdistillError(
            f"--resume: {path}, the record of the data the run in {out_dir} started with, is damaged: "
            f"{damaged}; "
            "without it a resume cannot tell whether the data changed",
            f"restore {path} from a copy of the run, or start a new run with a new --out",
        )
    bad = [
        f"{split}: {stored[split]['records']} records (sha256 {stored[split]['sha256'][:12]}) then, "
        f"{fingerprint[split]['records']} (sha256 {fingerprint[split]['sha256'][:12]}) now"
        for split in ("train", "eval")
        if split in stored and stored[split] != fingerprint[split]
    ]
    if bad:
        source = f"data.path {cfg.data.path}" if cfg.data.path else f"data.source {cfg.data.source}"
        raise KvdistillError(
            f"--resume: the records of {source} differ from those the run in {out_dir} started with "
            f"({path}): " + "; ".join(bad),
            "restore the data the run was trained on, or start a new run with a new --out",
        )


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class StartPlan:
    """How a run starts in DIR: fresh, or resumed (config checked) from one of `checkpoints`."""

    resume: bool
    stored: RunConfig | None = None  # DIR/config.yaml when resuming
    changes: list[Difference] = field(default_factory=list)  # of RESUMABLE fields, when resuming
    checkpoints: list[Path] = field(default_factory=list)  # intact ones, newest first: the first that loads
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # complete but damaged, with why


def plan_start(out_dir: str | os.PathLike, cfg: RunConfig, resume: bool) -> StartPlan:
    """Check that `cfg` may start (resume=False) or continue (resume=True) the run in `out_dir`; only reads.

    Without resume: refuse a DIR holding a run. With resume: refuse a DIR without a run, a config that differs
    from DIR/config.yaml in a field not in RESUMABLE (naming every one), train.steps below the checkpoint's
    step and a DIR whose checkpoints are all damaged.
    """
    out_dir = Path(out_dir)
    problem = dir_problem(out_dir, "run", legacy=LEGACY)
    if problem:
        raise problem
    leading_out = escapes(out_dir, [n for n in RUN_FILES if os.path.lexists(out_dir / n)])
    leading_out += (
        [f"checkpoints/{e}" for e in escapes(out_dir / "checkpoints")]
        if (out_dir / "checkpoints").is_dir() and not (out_dir / "checkpoints").is_symlink()
        else []
    )
    if leading_out:
        raise KvdistillError(
            f"--out {out_dir} holds symlinks leading out of it ({'; '.join(leading_out)}): the run would "
            "write "
            "through them outside --out",
            "remove those symlinks (a run writes only inside its own directory), or choose another --out",
        )
    if not resume:
        held = [name for name in ("metrics.jsonl", "checkpoints", "final") if (out_dir / name).exists()]
        if held:
            raise KvdistillError(
                f"--out {out_dir} already holds a run ({', '.join(held)})",
                "pass --resume to continue it, or choose another --out",
            )
        return StartPlan(resume=False)
    complete = list_checkpoints(out_dir)
    config_file = out_dir / "config.yaml"
    if not config_file.is_file():
        if complete:
            raise KvdistillError(
                f"--resume: {out_dir} has checkpoints but no config.yaml to check this config against",
                f"restore {config_file} (the config the run was started with), or start a new run with a new "
                "--out",
            )
        raise KvdistillError(
            f"--resume: {out_dir} holds no run to resume (no config.yaml, no complete checkpoint)",
            "start without --resume, or point --out at the run to continue",
        )
    stored = _stored_config(config_file)
    changes = config_differences(stored, cfg)
    fixed = [d for d in changes if d.key not in RESUMABLE]
    if fixed:
        raise KvdistillError(
            f"--resume: this config differs from the run in {out_dir} ({config_file}) in {len(fixed)} "
            "field(s) "
            "that a resume cannot change: " + "; ".join(map(str, fixed)),
            f"start a new run with a new --out (a resume of {out_dir} may change only "
            f"{', '.join(RESUMABLE)})",
        )
    intact, damaged = intact_checkpoints(out_dir)
    if damaged and not intact:
        raise KvdistillError(
            f"--resume: no intact checkpoint in {out_dir / 'checkpoints'}: "
            + "; ".join(f"{p.name}: {why}" for p, why in damaged),
            f"start a new run with a new --out; or move {out_dir / 'checkpoints'} aside and rerun with "
            "--resume "
            "to train this run again from step 0",
        )
    if intact:
        step = int(intact[0].name.split("-", 1)[1])
        if cfg.train.steps < step:
            raise KvdistillError(
                f"--resume: train.steps = {cfg.train.steps} but the run in {out_dir} is already at step "
                f"{step} "
                f"({intact[0]})",
                f"set train.steps to {step} or more, or start a new run with a new --out",
            )
    return StartPlan(resume=True, stored=stored, changes=changes, checkpoints=intact, damaged=damaged)


# ---------------------------------------------------------------------------------------------- loading
def _first_problem(accelerator, problem: str | None) -> str | None:
    """The first process's problem (in process order) of those that have one, on every process; or None."""
    if accelerator.num_processes == 1:
        return problem
    from accelerate.utils import gather_object

    found = [p for p in gather_object([problem]) if p is not None]
    return found[0] if found else None


def load_resumed(
    plan: StartPlan, out_dir: Path, *, accelerator, scheduler
) -> tuple[Path | None, dict | None]:
    """Load the newest of plan.checkpoints that loads on every process (damaged ones skipped, logged);
    (None, None) when the run stopped before its first checkpoint."""
    for ckpt, why in plan.damaged:
        log.warning("checkpoint %s is damaged (%s): not resumed from", ckpt, why)
    for ckpt in plan.checkpoints:
        problem = None
        try:
            state = load_checkpoint(ckpt, accelerator=accelerator, scheduler=scheduler)
        except Exception as err:  # noqa: BLE001 (a damaged file, whatever the loader raises: try the next one)
            problem = f"{type(err).__name__}: {err}"
        problem = _first_problem(accelerator, problem)
        if problem is None:
            if plan.damaged or ckpt != plan.checkpoints[0]:
                log.warning("resuming %s from %s, the newest intact checkpoint", out_dir, ckpt)
            return ckpt, state
        log.warning("checkpoint %s did not load (%s): not resumed from", ckpt, problem)
        plan.damaged.append((ckpt, problem))
    if plan.damaged:
        raise KvdistillError(
            f"--resume: no intact checkpoint in {out_dir / 'checkpoints'}: "
            + "; ".join(f"{p.name}: {why}" for p, why in plan.damaged),
            f"start a new run with a new --out; or move {out_dir / 'checkpoints'} aside and rerun with "
            "--resume "
            "to train this run again from step 0",
        )
    log.warning(
        "%s has no checkpoint yet (the run stopped before its first one): training it from step 0", out_dir
    )
    return None, None


def apply_configured_lrs(optimizer, scheduler, cfg: RunConfig) -> None:
    """After a resume: every group's base lr as configured now, and its lr the schedule's value at the resumed
    step (for an unchanged config exactly the restored value; a changed train.lr or train.steps takes effect
    here, where the restored optimizer and scheduler state would keep the old ones)."""
    bases = [
        cfg.train.lr if g.get("name") == "student" else (cfg.train.projector_lr or cfg.train.lr)
        for g in optimizer.param_groups
    ]
    for group, base in zip(optimizer.param_groups, bases, strict=True):
        group["initial_lr"] = base
    scheduler.base_lrs = bases
    scheduler.last_epoch -= 1
    # recomputes every group's lr at last_epoch from the new base lrs (and the new total steps)
    scheduler.step()


def note_changes(plan: StartPlan, out_dir: Path, start: int) -> None:
    """Log the RESUMABLE fields a resume changed (train.lr as a warning: the run goes on differently)."""
    for change in plan.changes:
        if change.key == "train.lr":
            log.warning(
                "resuming %s at step %d with train.lr %g (%g in its config.yaml): the optimizer and the "
                "schedule use the new lr from this step on",
                out_dir,
                start,
                change.given,
                change.stored,
            )
        else:
            log.info("resuming %s with %s", out_dir, change)
