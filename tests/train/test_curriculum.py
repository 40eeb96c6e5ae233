import json

import pytest
import torch
from safetensors.torch import load_file

from kvdistill.errors import KvdistillError
from kvdistill.train.curriculum import (
    is_curriculum,
    read_curriculum,
    run_curriculum,
    run_phases,
    stage_overrides,
)


def test_read_curriculum_lists_every_problem(tmp_path):
    bad = tmp_path / "cur.yaml"
    bad.write_text("curriculum: [phase1, no_such_phase]\noverrides: train.steps=3\nextra: 1\n")
    assert is_curriculum(bad)
    with pytest.raises(KvdistillError) as err:
        read_curriculum(bad)
    text = str(err.value)
    assert "no_such_phase" in text and "'overrides' must be a list" in text and "unknown key 'extra'" in text


def test_read_curriculum_resolves_relative_paths_and_packaged_names(tmp_path):
    (tmp_path / "mine.yaml").write_text("name: mine\nstudent: {model: x}\n")
    cur = tmp_path / "cur.yaml"
    cur.write_text("curriculum: [phase1, mine.yaml]\noverrides: [train.steps=3]\n")
    stages, overrides = read_curriculum(cur)
    assert stages[0].name == "phase1.yaml" and stages[1] == tmp_path / "mine.yaml"
    assert overrides == ["train.steps=3"]
    assert not is_curriculum(stages[0])


def test_a_fusion_section_override_applies_only_to_the_stages_that_read_it(tmp_path):
    stages = {kind: tmp_path / f"{kind}.yaml" for kind in ("fixed", "router", "confidence")}
    for kind, path in stages.items():
        path.write_text(f"name: {kind}\nstudent: {{model: x}}\nfusion: {{kind: {kind}}}\n")
    overrides = ["train.steps=3", "fusion.confidence.temperature=0.5", "fusion.entropy.weight=0"]
    assert stage_overrides(stages["fixed"], overrides) == ["train.steps=3"]
    assert stage_overrides(stages["router"], overrides) == overrides
    assert stage_overrides(stages["confidence"], overrides) == overrides[:2]


@pytest.mark.slow
def test_phases_chain_students_and_phase5_trains_through_the_latent_space(tmp_path):
    """Phases 1 and 5 on the real offline teachers (1 step each): phase 5 starts from phase 1's student and
    distills SmolLM2, Gemma-3 and the MiniLM encoder through the shared space Z."""
    small = [
        "train.steps=1",
        "train.batch_size=2",
        "data.size=8",
        "data.eval_size=2",
        "data.max_length=40",
        "fusion.latent.fit_samples=4",
    ]
    results = run_phases([1, 5], tmp_path, small)
    assert [r["stage"] for r in results] == ["phase1", "phase5"]
    assert results[1]["init_student"] == str(tmp_path / "phase1" / "final")
    assert json.loads((tmp_path / "curriculum.json").read_text())[1]["stage"] == "phase5"
    row = json.loads((tmp_path / "phase5" / "metrics.jsonl").read_text().splitlines()[0])
    for name in ("smollm2", "gemma3", "minilm"):
        assert 0.0 < row[f"loss/latent/{name}"] < 10.0
        assert 0.0 < row[f"weight/{name}"] < 1.0
    assert abs(sum(row[f"weight/{n}"] for n in ("smollm2", "gemma3", "minilm")) - 1.0) < 1e-5
    # the fitted latent maps are part of the checkpointed state
    state = load_file(str(next((tmp_path / "phase5" / "checkpoints").glob("step-*/state/model.safetensors"))))
    assert bool(state["space.latent.fitted"])
    assert torch.count_nonzero(state["space.latent.minilm__0__proj"]) > 0
    # resume skips finished stages and returns the same summaries
    again = run_curriculum(
        [r for r in (tmp_path / "phase1" / "config.yaml", tmp_path / "phase5" / "config.yaml")],
        tmp_path,
        small,
        resume=True,
    )
    assert [r["eval/ce"] for r in again] == [r["eval/ce"] for r in results]
