"""The 5-phase curriculum: each phase is a packaged config, and starts from the previous phase's student.

1. two teachers, fixed 0.5 / 0.5            4. learned router with entropy regularisation
2. two architectures, fixed unequal weights  5. + an encoder teacher (MiniLM) through the relation space
3. similarity routing over all teachers
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from kvdistill.config import load_config

PHASE_NAMES = {1: "phase1", 2: "phase2", 3: "phase3", 4: "phase4", 5: "phase5"}


def phase_config(phase: int, overrides: list[str]):
    return load_config(files("kvdistill") / "configs" / f"{PHASE_NAMES[phase]}.yaml", overrides)


def run_phases(phases: list[int], out: str | Path, overrides: list[str], *, base_config: str | None = None,
               resume: bool = False) -> list[dict]:
    """Run `phases` in order under OUT/phase-N; phase k > first starts from phase k-1's final student.

    Finished phases (summary.json present) are skipped on --resume, an interrupted one is resumed.
    """
    from kvdistill.train.trainer import train

    out = Path(out)
    previous: Path | None = None
    results = []
    for phase in phases:
        cfg = phase_config(phase, overrides)
        run_dir = out / f"phase-{phase}"
        done = (run_dir / "summary.json").is_file()
        if not done:
            summary = train(cfg, run_dir, resume=resume and (run_dir / "checkpoints").is_dir(),
                            init_student=str(previous) if previous else None)
        else:
            summary = json.loads((run_dir / "summary.json").read_text())
        results.append({"phase": phase, "dir": str(run_dir), **summary})
        previous = run_dir / "final" / "student"
    out.mkdir(parents=True, exist_ok=True)
    (out / "curriculum.json").write_text(json.dumps(results, indent=1))
    return results
