"""The packaged MoE specs load; routing metrics need the teacher they agree with; conditions add term by
term."""

from __future__ import annotations

import pytest

from kvdistill.errors import ConfigError
from kvdistill.experiments.conditions import condition_config
from kvdistill.experiments.spec import load_spec


@pytest.mark.parametrize("name", ["moe-tiny", "moe"])
def test_moe_specs_load_and_add_one_term_per_condition(name):
    spec = load_spec(name)
    assert list(spec.conditions) == ["ce_only", "logit_kd", "routing", "expert", "kv"]
    assert spec.eval.routing_teacher == spec.teachers[0].name
    teachers = {t.name: {"model": "t"} for t in spec.teachers}
    cfgs = {n: condition_config(spec, n, spec.seeds[0], teachers) for n in spec.conditions}
    assert len({c.train.steps for c in cfgs.values()}) == 1  # equal budgets
    assert not cfgs["ce_only"].teachers and cfgs["ce_only"].losses.logit_kd.weight == 0
    assert cfgs["logit_kd"].losses.logit_kd.weight == 0.7 and cfgs["logit_kd"].losses.routing.weight == 0
    assert cfgs["routing"].losses.routing.weight == 0.2 and cfgs["routing"].losses.expert.weight == 0
    assert cfgs["expert"].losses.expert.weight == 0.4 and cfgs["expert"].losses.kv.weight == 0
    assert cfgs["kv"].losses.kv.weight == 0.3


def test_routing_metrics_need_a_routing_teacher():
    raw = load_spec("moe-tiny").model_dump(mode="json")
    raw["eval"]["routing_teacher"] = None
    with pytest.raises(ConfigError, match="need eval.routing_teacher"):
        load_spec(raw)
    raw["eval"]["routing_teacher"] = "nobody"
    with pytest.raises(ConfigError, match="not among the teachers"):
        load_spec(raw)
