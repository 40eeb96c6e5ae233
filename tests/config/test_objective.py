"""The losses section as a tagged union on losses.objective: each objective's own terms, the other's refused
with the key and the fix, the tag taken from the student where it is left out, configs written before the
split still read."""

from __future__ import annotations

import pytest
import yaml

from kvdistill.config import LatentLosses, TextLosses, dump_config, load_config
from kvdistill.errors import ConfigError

TEXT = {"student": {"model": "smollm2-135m"}, "teachers": [{"model": "gemma3-270m"}]}
LATENT = {"student": {"model": "smollm2-135m", "latent": {"tokens": 4}}}


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(raw=raw)
    return err.value.problems


def test_the_objective_comes_from_the_student_where_it_is_left_out():
    assert isinstance(load_config(raw=TEXT).losses, TextLosses)
    latent = load_config(raw={**LATENT, "losses": {"cot_ce": 1.0}})
    assert isinstance(latent.losses, LatentLosses) and latent.losses.cot_ce == 1.0
    assert (
        load_config(raw={**TEXT, "losses": {"objective": "text", "kv": {"weight": 2.0}}}).losses.kv.weight
        == 2.0
    )


def test_a_term_of_the_other_objective_is_refused_with_its_key_and_the_fix_every_one_listed():
    found = problems({**TEXT, "losses": {"cot_ce": 1.0, "codi": {"weight": 1.0}, "cosinee": 1.0}})
    assert len(found) == 3
    assert found[0].startswith("losses.cot_ce is a term of the latent objective, but this run's is text")
    assert "drop losses.cot_ce, or add a student.latent section" in found[0]
    assert found[1].startswith("losses.codi is a term of the latent objective")
    assert (
        "did you mean 'losses.cosine'?" in found[2]
    )  # a typo is still a typo within the objective's own terms
    (latent,) = problems({**LATENT, "losses": {"kv": {"weight": 3.0}, "latent_kv": {"weight": 1.0}}})
    assert latent.startswith("losses.kv is a term of the text objective, but this run's is latent")
    assert "drop losses.kv, or drop the student.latent section" in latent


def test_an_objective_that_contradicts_the_student_or_is_unknown_is_refused():
    (found,) = problems({**LATENT, "losses": {"objective": "text"}})
    assert "losses.objective is text, but the student has a student.latent section" in found
    assert "set losses.objective: latent (or leave it out), or drop student.latent" in found
    (found,) = problems({**TEXT, "losses": {"objective": "latent"}})
    assert "the student has no student.latent section" in found and "add a student.latent section" in found
    (found,) = problems({**TEXT, "losses": {"objective": "latnet"}})
    assert found == "losses.objective 'latnet' is not one of 'text', 'latent': use one of them"


def test_a_config_written_before_the_split_loads_and_a_dump_reloads_to_the_same_run():
    """A run's config.yaml spelled out every term of both objectives: the other's at their defaults are
    dropped."""
    both = {
        "ce": 1.0,
        "kv": {
            "weight": 1.0,
            "kind": "mse",
            "normalize": True,
            "keys": 1.0,
            "values": 1.0,
            "schedule": {"kind": "constant", "end": None, "start": 0},
        },
        "cosine": 0.0,
        "attention_kl": 0.0,
        "relation": 0.0,
        "hidden": 0.0,
        "balance": None,
        "cot_ce": 0.0,
        "codi": {"weight": 0.0, "kind": "smooth_l1", "normalize": True},
    }
    latent = load_config(raw={**LATENT, "losses": {**both, "cot_ce": 1.0, "latent_kv": {"weight": 1.0}}})
    assert isinstance(latent.losses, LatentLosses) and latent.losses.cot_ce == 1.0
    text = load_config(raw={**TEXT, "losses": {**both, "kv": {**both["kv"], "weight": 0.5}}})
    assert isinstance(text.losses, TextLosses) and text.losses.kv.weight == 0.5
    (found,) = problems({**TEXT, "losses": {**both, "cot_ce": 0.5}})  # not a default: refused, not dropped
    assert found.startswith("losses.cot_ce is a term of the latent objective")
    for cfg in (latent, text):
        again = load_config(raw=yaml.safe_load(dump_config(cfg)))
        assert again == cfg and again.losses.objective == cfg.losses.objective
