"""The MoE terms in the objective: routing distillation raises the student's routing agreement with its
teacher above its CE-only twin's on the same steps; fitted correspondences; the maps the optimizer must see;
refusals."""

from __future__ import annotations

import pytest
import torch
from tests.moe_tiny import moe_model

from kvdistill.config import load_config
from kvdistill.config.schema import DataConfig
from kvdistill.data import load_records
from kvdistill.errors import KvdistillError
from kvdistill.eval.moe import routing_agreement_of
from kvdistill.models.load import load_tokenizer
from kvdistill.objectives.text import TextObjective
from kvdistill.teachers import OnlineTeacher

TEACHER = {"family": "mixtral", "num_hidden_layers": 2, "hidden_size": 32}


def _cfg(teachers: bool, **losses):
    raw = {
        "student": {"from_config": {"family": "mixtral"}, "tokenizer": "gpt2-tokenizer"},
        "data": {"source": "arithmetic", "size": 96, "eval_size": 16, "max_length": 48},
        "losses": {"ce": 1.0, "kv": {"weight": 0.0}, **losses},
        "train": {"steps": 40, "batch_size": 8, "lr": 3e-3, "seed": 0},
    }
    if teachers:
        raw["teachers"] = [{"name": "moe", "from_config": TEACHER, "tokenizer": "gpt2-tokenizer"}]
    return load_config(raw=raw)


@pytest.fixture(scope="module")
def setting():
    tok = load_tokenizer("gpt2-tokenizer")
    data = DataConfig(source="arithmetic", size=96, eval_size=16, max_length=48)
    train, held = load_records(data, split="train"), load_records(data, split="eval")
    teacher = moe_model("mixtral", vocab_size=len(tok), seed=7, std=0.2, experts=4)  # sharp routing
    return tok, train, held, teacher


def _train(cfg, tok, records, teacher, steps):
    student = moe_model("mixtral", vocab_size=len(tok), seed=0, std=0.02, experts=4).train()
    teachers = [OnlineTeacher("moe", teacher, tok)] if cfg.teachers else []
    obj = TextObjective(cfg, student, tok, teachers, "cpu")
    obj.prepare(records[:16])
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=cfg.train.lr)
    rows = []
    for step in range(steps):
        batch = [records[(step * 8 + i) % len(records)] for i in range(8)]
        loss, metrics = obj(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        rows.append(metrics)
    return student.eval(), rows


def test_routing_distillation_raises_routing_agreement_above_the_ce_only_twin(setting):
    tok, train, held, teacher = setting
    ce_student, ce_rows = _train(_cfg(False), tok, train, teacher, 20)
    rt_student, rt_rows = _train(_cfg(True, routing={"weight": 1.0}), tok, train, teacher, 20)
    ce = routing_agreement_of(ce_student, tok, teacher, tok, held, max_length=48)
    rt = routing_agreement_of(rt_student, tok, teacher, tok, held, max_length=48)
    # 4 experts, top-2: chance is 0.25 top-1 and 0.5 top-2 overlap
    assert rt["routing_top1"] > ce["routing_top1"] + 0.15, (rt, ce)
    assert rt["routing_topk"] > ce["routing_topk"] + 0.1, (rt, ce)
    # the training metric shows the same: routing KL falls, agreement rises
    assert rt_rows[-1]["loss/routing/moe"] < 0.8 * rt_rows[0]["loss/routing/moe"]
    assert rt_rows[-1]["routing/top1_agreement/moe"] > rt_rows[0]["routing/top1_agreement/moe"]
    # both keep the student's own load-balancing loss (Mixtral's router_aux_loss_coef)
    assert "loss/balance" in ce_rows[0] and "loss/balance" in rt_rows[0]


def test_expert_term_trains_its_width_maps_and_fits_the_correspondence(setting):
    tok, train, _, _ = setting
    wide = moe_model("mixtral", vocab_size=len(tok), seed=3, std=0.2, experts=8, hidden_size=48)
    cfg = _cfg(True, routing={"weight": 0.2}, expert={"weight": 0.4})
    student = moe_model("mixtral", vocab_size=len(tok), seed=0, experts=4).train()
    obj = TextObjective(cfg, student, tok, [OnlineTeacher("moe", wide, tok)], "cpu")
    with pytest.raises(KvdistillError, match="prepare"):
        obj(train[:4])  # 8 teacher experts onto 4: fitted, refused until fitted
    obj.prepare(train[:16])
    corr = obj.moe.corr_moe_0
    assert corr.shape == (8, 4) and torch.allclose(corr.sum(1), torch.ones(8))
    assert (corr.sum(0) > 0).all()  # no student expert left without a teacher expert
    assert "moe.corr_moe_0" in obj.state_dict() and "moe.teacher_of_moe_1" in obj.state_dict()
    names = [n for n, p in obj.named_parameters() if n.startswith("moe.proj")]
    assert names == ["moe.proj.moe.0.weight", "moe.proj.moe.1.weight"]  # 32 -> 48, seen by the optimizer
    loss, metrics = obj(train[:4])
    loss.backward()
    assert obj.moe.proj["moe"][0].weight.grad.abs().sum() > 0
    assert {
        "loss/routing/moe",
        "loss/expert/moe",
        "routing/top1_agreement/moe",
        "routing/topk_overlap/moe",
        "loss/balance",
    } <= set(metrics)


def test_routing_terms_refuse_a_dense_teacher(setting):
    tok, train, _, _ = setting
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "llama",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    student = moe_model("mixtral", vocab_size=len(tok), experts=4)
    with pytest.raises(KvdistillError, match="teacher 'moe'.*no sparse MoE block"):
        TextObjective(
            _cfg(True, routing={"weight": 1.0}), student, tok, [OnlineTeacher("moe", dense, tok)], "cpu"
        )
