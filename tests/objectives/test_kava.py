"""The KaVa objective: L_KV at the latent slots, its gradients, CODI and the CoT CE, config refusals, and the
CPU-sized E1-E5 spec end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kvdistill.config import load_config
from kvdistill.data import load_records
from kvdistill.errors import ConfigError, KvdistillError
from kvdistill.objectives import build_objective
from kvdistill.objectives.kava import SELF
from kvdistill.objectives.latent_batch import cot_view
from kvdistill.student.latent import latent_view

STUDENT = {
    "from_config": {
        "base": "smollm2-135m",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 256,
    },
    "tokenizer": "gpt2-tokenizer",
    "latent": {"tokens": 6, "iterations": 2},
}
QWEN_SP = {
    "name": "qwen_sp",
    "from_config": {
        "family": "qwen2",
        "num_hidden_layers": 3,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
    "tokenizer": "llama2-tokenizer",
}


def config(losses: dict, teachers=(), **student):
    raw = {
        "name": "kava",
        "student": {**copy.deepcopy(STUDENT), **student},
        "teachers": list(teachers),
        "data": {"source": "arithmetic", "size": 40, "eval_size": 4, "max_length": 96},
        "losses": losses,
        "train": {"steps": 2, "batch_size": 4},
    }
    return load_config(raw=raw)


def records(cfg, n=4):
    return load_records(cfg.data, split="train")[:n]


def cot_pass(obj, batch, *, grad=False, logits=False, hidden=False, importance=True):
    """The backbone's CoT-mode capture of a collated batch, its view and hooked queries."""
    cap, queries = obj._cot_pass(
        obj.backbone,
        obj.student_geometry,
        batch.own_cot,
        grad=grad,
        logits=logits,
        hidden=hidden,
        importance=importance,
    )
    return cap, batch.own_cot, queries


def test_latent_kv_is_zero_when_the_latent_kv_equal_the_target_and_grows_otherwise():
    cfg = config({"ce": 0.0, "latent_kv": {"weight": 1.0}})
    obj = build_objective(cfg)
    recs = records(cfg)
    batch = obj.collate(recs)
    with torch.no_grad():
        s_cap, view = obj._student_pass(batch.student, hidden=False), batch.student
        t_cap, t_view, queries = cot_pass(obj, batch)
        targets = {SELF: obj._own_target(t_cap, t_view, queries)}
    P, M = view.prefix_ids.shape[1], obj.student.tokens
    for i in range(len(s_cap.keys)):  # the self teacher's layer map is the identity
        s_cap.keys[i][:, :, P : P + M] = targets[SELF].keys[i]
        s_cap.values[i][:, :, P : P + M] = targets[SELF].values[i]
    assert float(obj.kv_terms(s_cap, P, targets)[SELF].abs().max()) < 1e-6
    s_cap.keys[0][:, :, P] += 1.0
    assert float(obj.kv_terms(s_cap, P, targets)[SELF].min()) > 1e-3


def test_latent_kv_averages_the_key_and_value_errors_over_layers():
    """kv_n = Σ_layers (err_K + err_V) / (2·L) (KaVa's L_KV), each error the library's kv_error."""
    from kvdistill import losses as L

    cfg = config({"ce": 0.0, "latent_kv": {"weight": 1.0}})
    obj = build_objective(cfg)
    recs = records(cfg)
    batch = obj.collate(recs)
    with torch.no_grad():
        s_cap, view = obj._student_pass(batch.student, hidden=False), batch.student
        t_cap, t_view, queries = cot_pass(obj, batch)
        targets = {SELF: obj._own_target(t_cap, t_view, queries)}
        got = obj.kv_terms(s_cap, view.prefix_ids.shape[1], targets)[SELF]
    P, M, lk = view.prefix_ids.shape[1], obj.student.tokens, cfg.losses.latent_kv
    tgt, want = targets[SELF], 0.0
    for i in range(len(s_cap.keys)):
        for pred, target in (
            (s_cap.keys[i][:, :, P : P + M], tgt.keys[i]),
            (s_cap.values[i][:, :, P : P + M], tgt.values[i]),
        ):
            rp, rm = L.as_rows(pred, tgt.kept[i])
            rt, _ = L.as_rows(target.to(pred.dtype), tgt.kept[i])
            want = want + L.kv_error(rp, rt, rm, kind=lk.kind, normalize=lk.normalize)
    torch.testing.assert_close(got, want / (2 * len(s_cap.keys)))


def test_latent_kv_gradient_reaches_the_latents_and_the_backbone_never_the_teachers():
    cfg = config({"ce": 0.0, "latent_kv": {"weight": 1.0}}, teachers=[QWEN_SP])
    obj = build_objective(cfg)
    loss, metrics = obj(records(cfg))
    assert metrics["loss/latent_kv/self"] > 0 and metrics["loss/latent_kv/qwen_sp"] > 0
    loss.backward()
    head = obj.student.head
    assert head.fc2.weight.grad.abs().sum() > 0  # the projection of the Jacobi passes
    assert head.init.grad[: 6 - 2].abs().sum() > 0  # e_0 reaches the first M - T slots
    backbone = obj.student.backbone.model.layers[0].self_attn
    assert backbone.k_proj.weight.grad.abs().sum() > 0 and backbone.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.projectors.parameters())
    teacher = obj.teachers[0].model
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def _per_pair_layout(obj, name: str) -> dict:
    """The objective's state dict with teacher `name`'s maps as checkpoints before the stack held them: one
    KVProjector per layer pair, ``projectors.<name>.<pair>.key_map.<part>``, each value made distinct."""
    state = {k: v.clone() for k, v in obj.state_dict().items() if not k.startswith(f"projectors.{name}.")}
    stack, lp = obj.projectors[name], obj.pairs[name]
    for p, a in enumerate(lp.at):
        for side, m in enumerate(("key_map", "value_map")):
            for part in ("mix", "weight", "bias"):
                state[f"projectors.{name}.{p}.{m}.{part}"] = getattr(stack, part)[a, side].detach() + 0.01 * (
                    p + 1
                )
    return state


def test_a_checkpoint_of_per_pair_maps_loads_into_the_stack_or_is_refused_when_pairs_share_a_layer():
    plain = {**QWEN_SP, "layer_map": {"interpolate": False}}  # one pair per student layer
    obj = build_objective(config({"ce": 0.0, "latent_kv": {"weight": 1.0}}, teachers=[plain]))
    state = _per_pair_layout(obj, "qwen_sp")
    obj.load_state_dict(state)  # strict: every old key taken, every stacked one given
    stack, lp = obj.projectors["qwen_sp"], obj.pairs["qwen_sp"]
    for p, a in enumerate(lp.at):
        torch.testing.assert_close(
            stack.weight[a, 1], state[f"projectors.qwen_sp.{p}.value_map.weight"], rtol=0, atol=0
        )
    averaged = {
        **QWEN_SP,
        "layer_map": {"strategy": "explicit", "explicit": [[0, 1], 2]},
    }  # layer 0 <- 0 and 1
    shared = build_objective(config({"ce": 0.0, "latent_kv": {"weight": 1.0}}, teachers=[averaged]))
    assert shared.pairs["qwen_sp"].i == [0, 0, 1]
    with pytest.raises(KvdistillError, match="one K/V map per layer pair") as err:
        shared.load_state_dict(_per_pair_layout(shared, "qwen_sp"))
    assert "train the run again" in err.value.fix


def test_targets_are_detached_even_when_the_cot_pass_trains():
    cfg = config({"ce": 1.0, "cot_ce": 1.0, "latent_kv": {"weight": 1.0}})
    obj = build_objective(cfg)
    recs = records(cfg)
    t_cap, t_view, queries = cot_pass(obj, obj.collate(recs), grad=True, logits=True)
    assert t_cap.keys[0].requires_grad
    targets = obj._own_target(t_cap, t_view, queries)
    assert not any(t.requires_grad for t in [*targets.keys.values(), *targets.values.values()])


def test_views_mark_cot_answer_and_pre_answer_tokens():
    cfg = config({"ce": 1.0})
    obj = build_objective(cfg)
    recs = records(cfg, 2)
    segs = obj.collate(recs).segments
    v = cot_view(obj.tokenizer, obj.student_geometry, recs, segs, 96)
    tok = obj.tokenizer
    for b, s in enumerate(segs):
        cot_text = tok.decode(v.ids[b][v.candidates[b].bool()])
        assert cot_text.strip() == s.text[s.cot_start : s.cot_end].strip()
        assert tok.decode(v.ids[b][v.answer_rows[b].bool()]).strip() == recs[b]["answer"]
        assert tok.decode(v.ids[b, v.pre_answer[b]]) == ":"
    lv = latent_view(tok, segs, 6)
    P = lv.prefix_ids.shape[1]
    for b in range(2):
        assert lv.prefix_mask[b, -1] == 1  # left-padded
        assert lv.answer_mask[b, P + 5] == 1 and lv.answer_mask[b, : P + 5].sum() == 0
        assert tok.decode(lv.suffix_ids[b, lv.pre_answer[b] - P - 6]) == ":"


def test_codi_and_cot_ce_are_the_library_terms():
    from kvdistill import losses

    cfg = config({"ce": 1.0, "cot_ce": 1.0, "codi": {"weight": 10.0}})
    obj = build_objective(cfg).eval()
    recs = records(cfg)
    with torch.no_grad():
        _, m = obj(recs)
        batch = obj.collate(recs)
        s_cap, view = obj._student_pass(batch.student, hidden=True), batch.student
        t_cap, t_view, _ = cot_pass(obj, batch, logits=True, hidden=True, importance=False)
    b = torch.arange(4)
    s_h = torch.stack([h[b, view.pre_answer] for h in s_cap.hidden_states[1:]])
    t_h = torch.stack([h[b, t_view.pre_answer] for h in t_cap.hidden_states[1:]])
    assert m["loss/codi"] == pytest.approx(float(losses.codi_loss(s_h, t_h).mean()), rel=1e-5)
    cot = losses.ce_loss(t_cap.logits, t_cap.input_ids, t_view.after_prefix)
    assert m["loss/cot_ce"] == pytest.approx(float(cot.mean()), rel=1e-5)
    ce = losses.ce_loss(s_cap.logits, s_cap.input_ids, view.answer_mask)
    assert m["loss"] == pytest.approx(float((ce + cot).mean()) + 10 * m["loss/codi"], rel=1e-5)


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"losses": {"ce": 1.0, "kv": {"weight": 2.0}}}, "losses.kv is a term of the text objective"),
        ({"losses": {"ce": 1.0, "latent_kv": {"weight": 1.0, "self_teacher": False}}}, "no K/V target"),
        (
            {"losses": {"ce": 1.0, "latent_kv": {"weight": 1.0, "target": {"kind": "full", "lam": 0.5}}}},
            "read by kind rkv only",
        ),
        (
            {"losses": {"ce": 1.0, "latent_kv": {"weight": 1.0, "target": {"window": 4}}}},
            "read by scoring rkv only",
        ),
        (
            {"losses": {"ce": 1.0, "latent_kv": {"weight": 1.0}}, "latent": {"tokens": 0}},
            "needs latent slots",
        ),
        ({"losses": {"ce": 1.0}, "teachers": [QWEN_SP]}, "losses.latent_kv.weight is 0"),
        (
            {"losses": {"ce": 1.0, "codi": {"weight": 1.0}}, "latent": None},
            "losses.codi is a term of the latent objective",
        ),
    ],
)
def test_config_refuses_what_the_latent_student_never_reads(bad, needle):
    student = {"latent": bad["latent"]} if "latent" in bad else {}
    with pytest.raises(ConfigError) as err:
        config(bad["losses"], teachers=bad.get("teachers", ()), **student)
    assert needle in str(err.value)


def test_latent_student_exact_match_during_training_is_latent_mode_only():
    """train.eval_exact_match is read for a latent student (latent mode); eval_cot (CoT decoding) is refused;
    scoring rkv needs more latent slots than R-KV's window."""
    from kvdistill.config import load_config as load

    base = config({"ce": 1.0}).model_dump(mode="json")
    base["train"].update(eval_every=1, eval_exact_match=True)
    assert load(raw=base).train.eval_exact_match
    base["train"]["eval_cot"] = True
    with pytest.raises(ConfigError, match="eval_cot"):
        load(raw=base)
    with pytest.raises(ConfigError, match="must exceed it"):
        config({"ce": 1.0, "latent_kv": {"weight": 1.0, "target": {"scoring": "rkv"}}})  # 6 latents, window 8


def test_kava_tiny_spec_runs_end_to_end(tmp_path):
    """The packaged CPU spec, shrunk to seconds: every condition trains, saves, and is scored in its mode."""
    import yaml

    from kvdistill.experiments.runner import run_experiment
    from kvdistill.experiments.spec import load_spec, spec_path

    raw = yaml.safe_load(spec_path("kava-tiny").read_text())
    raw["base"]["data"].update(size=60, eval_size=4)
    raw["base"]["train"].update(steps=2, eval_every=1)
    for t in raw["teachers"]:
        t["steps"] = 2
    raw["eval"].update(max_cot_tokens=8, max_new_tokens=3)
    results = run_experiment(load_spec(raw), tmp_path)
    assert set(results["conditions"]) == {
        "E1",
        "E2",
        "E3",
        "E4",
        "E5",
        "cot_ft",
        "nocot_ft",
        "E4_identity",
        "E4_rkv",
    }
    # every condition's held-out curves: answer CE and exact match at steps 1 and 2, as training logged them;
    # the last point is the final student's, which the runner scores the same way
    for name, curve in results["curves"].items():
        points = curve["per_seed"]["0"]
        assert [p["step"] for p in points] == [1, 2] and all(p["exact_match"] is not None for p in points), (
            name
        )
        ev = json.loads((tmp_path / "runs" / name / "seed-0" / "eval.json").read_text())
        assert points[-1]["exact_match"] == ev["exact_match"], name
        if name != "cot_ft":  # a latent student's held-out CE is the answer's, computed by the runner too
            assert points[-1]["ce"] == pytest.approx(ev["ce"], rel=1e-4), name
    assert "self" in results["curves"]["E4"]["per_seed"]["0"][-1]["latent_kv"]
    assert {(c["condition"], c["baseline"]) for c in results["comparisons"]} >= {
        ("E4", "nocot_ft"),
        ("E4_rkv", "E4"),
    }
    # `kvdistill eval` on a latent run: the runner's latent-mode figures, through the same function
    from typer.testing import CliRunner

    from kvdistill.cli import app

    # the runner's records, read before `kvdistill eval` writes its own RUN/eval.json over E4's (a later run
    # of the experiment scores that run again: runner.py skips only records it wrote itself)
    records = {
        n: json.loads((tmp_path / "runs" / n / "seed-0" / "eval.json").read_text())
        for n in results["conditions"]
    }
    ev = records["E4"]
    got = CliRunner().invoke(
        app,
        [
            "eval",
            str(tmp_path / "runs" / "E4" / "seed-0"),
            "--json",
            "--max-new-tokens",
            "3",
            "--batch-size",
            "16",
        ],
    )
    assert got.exit_code == 0, got.output
    cli = json.loads(got.output[got.output.index("{") :])
    assert cli["mode"] == "latent" and cli["samples"] == 4
    assert (
        cli["exact_match"]["per_item"] == ev["per_item"]
        and cli["exact_match"]["exact_match"] == ev["exact_match"]
    )
    assert cli["exact_match"]["gen_tokens"] == ev["gen_tokens"] and cli["exact_match"]["latent_tokens"] == 6
    assert cli["perplexity"]["ce"] == pytest.approx(ev["ce"], rel=1e-6)
    # the swap probe (answers from another question's latents): the same figures from both, and a section of
    # the results for every condition with latents (not cot_ft, a text student; not nocot_ft, 0 latents)
    assert cli["latent_swap"]["per_item"] == ev["swap_per_item"] and len(ev["swap_per_item"]) == 4
    assert cli["latent_swap"]["follows"] == ev["swap_follows"]
    assert set(results["latent_swap"]) == set(results["conditions"]) - {"cot_ft", "nocot_ft"}
    swap = results["latent_swap"]["E4"]
    assert swap["swap_exact_match"]["mean"] == ev["swap_exact_match"] == sum(ev["swap_per_item"]) / 4
    assert swap["drop"]["diff"] == pytest.approx(ev["swap_exact_match"] - ev["exact_match"])
    assert "swap probe" in (tmp_path / "results.md").read_text()
    assert "nocot_ft" not in results["latent_swap"] and "swap_per_item" not in records["nocot_ft"]
    for name in results["conditions"]:
        ev = records[name]
        assert len(ev["per_item"]) == 4 and ev["gen_tokens"] > 0
        latent = (tmp_path / "runs" / name / "seed-0" / "final" / "latent.json").is_file()
        assert latent == (name != "cot_ft")
        if latent:
            assert ev["latent_tokens"] == (0 if name == "nocot_ft" else 6)
    rows = [
        json.loads(x)
        for x in (tmp_path / "runs" / "E5" / "seed-0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert "loss/latent_kv/qwen_sp" in rows[0] and "loss/latent_kv/self" not in rows[0]
    # `kvdistill generate --latent` decodes what the evaluation decoded for the same question
    from kvdistill.data.segments import segments
    from kvdistill.eval.generate import generate

    ev = records["E4"]
    data = load_config(tmp_path / "runs" / "E4" / "seed-0" / "config.yaml").data
    seg = segments(load_records(data, split="eval")[0], data.template)
    gen = generate(str(tmp_path / "runs" / "E4" / "seed-0"), seg.prefix, max_new_tokens=3, latent=True)
    assert gen.continuation == "Answer:" + ev["samples"][0]["generated"]
    assert gen.latent_reads == ev["samples"][0]["latent_reads"] and len(gen.latent_reads) == 6


@pytest.mark.parametrize(
    "target",
    [
        {"kind": "rkv"},
        {"kind": "rkv", "scoring": "rkv", "window": 4, "lam": 0.5},
        {"kind": "rkv", "scoring": "rkv", "window": 3},  # λ: R-KV's 0.07 on both sides
        {"kind": "right_crop"},
    ],
)
def test_cached_latent_targets_equal_the_online_ones(tmp_path, teacher_dirs, target):
    """`kvdistill extract` with compression.span cot stores the latent target the objective computes
    online."""
    from kvdistill.cache.extract import extract
    from kvdistill.config import TeacherConfig

    losses = {"ce": 1.0, "latent_kv": {"weight": 1.0, "self_teacher": False, "target": target}}
    online = config(losses, teachers=[{"name": "t", "model": str(teacher_dirs["qwen2"])}])
    comp = {"budget": 6, "span": "cot", "dtype": "float32", **target}
    if target["kind"] == "rkv":
        comp.setdefault("scoring", "kava")  # the latent target's default (a cache's is minmax)
    extract(
        TeacherConfig(name="t", model=str(teacher_dirs["qwen2"]), compression=comp),
        online.data,
        tmp_path / "cache",
        batch_size=3,
        progress=False,
    )
    cached = config(
        losses,
        teachers=[
            {
                "name": "t",
                "model": str(teacher_dirs["qwen2"]),
                "source": "cache",
                "cache_dir": str(tmp_path / "cache"),
                "compression": comp,
            }
        ],
    )
    recs = records(online)
    got = {}
    for name, cfg in (("online", online), ("cached", cached)):
        obj = build_objective(cfg)
        with torch.no_grad():
            got[name] = obj.teacher_pass(obj.collate(recs))["t"]
    a, b = got["online"], got["cached"]
    assert set(a.keys) == set(b.keys)
    for j in a.keys:
        assert torch.equal(a.kept[j], b.kept[j])
        torch.testing.assert_close(b.keys[j], a.keys[j], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.values[j], a.values[j], rtol=1e-4, atol=1e-5)


def test_a_cache_without_the_latent_target_is_refused(teacher_dirs, tmp_path):
    cache = {
        "name": "t",
        "model": str(teacher_dirs["qwen2"]),
        "source": "cache",
        "cache_dir": str(tmp_path),
        "compression": {"kind": "rkv", "budget": 64},
    }
    with pytest.raises(ConfigError) as err:
        config({"ce": 1.0, "latent_kv": {"weight": 1.0}}, teachers=[cache])
    assert "budget: 6" in str(err.value) and "span: cot" in str(err.value)


def test_the_weighted_terms_add_up_to_the_loss_and_their_gradients_to_its_gradient():
    """`last_terms` (what train.grad_norms_every differentiates one by one) covers the whole latent loss: the
    weighted terms sum to it, and so do their gradients w.r.t. the student's parameters."""
    cfg = config({"ce": 1.0, "cot_ce": 0.5, "codi": {"weight": 10.0}, "latent_kv": {"weight": 2.0}})
    obj = build_objective(cfg)
    torch.manual_seed(0)
    loss, m = obj(records(cfg))
    terms = obj.last_terms
    assert set(terms) == {"ce", "cot_ce", "codi", "latent_kv"}
    assert float(sum(terms.values()).detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(terms["codi"].detach()) == pytest.approx(10.0 * m["loss/codi"], rel=1e-5)
    params = [p for p in obj.student.parameters() if p.requires_grad]
    whole = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    parts = [torch.autograd.grad(t, params, retain_graph=True, allow_unused=True) for t in terms.values()]
    for n, g in enumerate(whole):
        summed = [p[n] for p in parts if p[n] is not None]
        if g is None:
            assert not summed
            continue
        torch.testing.assert_close(sum(summed), g, rtol=1e-4, atol=1e-6)


def test_a_latent_run_logs_each_terms_gradient_norm(tmp_path):
    """train.grad_norms_every on a latent student: every term's norm, before clipping; with the answer CE
    alone its norm is the step's whole gradient norm."""
    from kvdistill.train.trainer import train

    def logged(losses: dict, out):
        raw = config(losses).model_dump(mode="json")
        raw["train"].update(steps=2, grad_norms_every=1, log_every=1, tensorboard=False)
        train(load_config(raw=raw), out, progress=False)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    rows = [r for r in logged({"ce": 1.0}, tmp_path / "ce") if "grad_norm/ce" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["grad_norm/ce"] == pytest.approx(r["grad_norm"], rel=1e-4)
    full = {"ce": 1.0, "cot_ce": 1.0, "codi": {"weight": 10.0}, "latent_kv": {"weight": 1.0}}
    names = ("ce", "cot_ce", "codi", "latent_kv")
    for r in [r for r in logged(full, tmp_path / "e4") if "grad_norm/ce" in r]:
        assert all(r[f"grad_norm/{k}"] > 0 for k in names)
        assert r["grad_norm"] <= sum(r[f"grad_norm/{k}"] for k in names) * 1.0001  # the triangle inequality
