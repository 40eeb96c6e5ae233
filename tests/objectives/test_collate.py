"""The collated path (`TextObjective.collator` on DataLoader workers, then `forward(batch)`) gives the losses
and gradients of the inline path, where every teacher tokenizes its records itself and the space aligns them
in the step (what the objective did before the collate existed), bit for bit: the same ops on the same
tensors."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from kvdistill.data import load_records
from kvdistill.objectives import build_objective
from kvdistill.objectives.batch import Collated

VARIANTS = {
    "fixed": [],
    "router_per_token": ["fusion.kind=router", "fusion.router.per_token=true", "fusion.entropy.weight=0"],
    "extra_terms": ["losses.cosine=0.5", "losses.hidden=0.5", "losses.kv.kind=smooth_l1"],
    "compressed": [
        "teachers.0.compression.kind=right_crop",
        "teachers.0.compression.budget=8",
        "teachers.1.compression.kind=rkv",
        "teachers.1.compression.budget=8",
    ],
    "target_space": ["fusion.space=target"],
}


def inline(collated: Collated) -> Collated:
    """The batch without its teacher side: the teachers tokenize, and the space aligns, inside the step."""
    n = len(collated.teachers)
    return Collated(collated.records, collated.ids, collated.mask, collated.spans, [None] * n, [None] * n)


def loss_and_grads(objective, batch):
    objective.zero_grad(set_to_none=True)
    loss, metrics = objective(batch)
    loss.backward()
    return (
        loss.detach(),
        metrics,
        {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None},
    )


def assert_same(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1] == b[1]
    assert a[2].keys() == b[2].keys() and len(a[2]) > 10
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_collated_equals_inline(tiny_config, variant):
    cfg = tiny_config(*VARIANTS[variant])
    records = load_records(cfg.data)[:4]
    objective = build_objective(cfg)
    if objective.fusion.router is not None:  # away from the uniform start, so token weights matter
        torch.nn.init.normal_(objective.fusion.router.head[-1].weight, std=0.5)
    collated = objective.collate(records)
    online_full = [
        t.kind == "online" and getattr(t.compression, "kind", "full") == "full" for t in objective.teachers
    ]
    assert [a is not None for a in collated.alignments] == online_full
    reference = loss_and_grads(objective, inline(collated))
    assert_same(loss_and_grads(objective, records), reference)  # records: collated inline
    assert_same(loss_and_grads(objective, collated), reference)


def test_collated_alignment_is_the_dense_one(tiny_config):
    """The collated sparse alignment of a full teacher, densified, equals `batch_token_alignment` of its
    spans."""
    from kvdistill.align.tokens import batch_token_alignment

    cfg = tiny_config()
    objective = build_objective(cfg)
    c = objective.collate(load_records(cfg.data)[:3])
    for ti, (index, weight, covered) in zip(c.teachers, c.alignments, strict=True):
        dense = batch_token_alignment(ti.spans, ti.attention_mask, c.spans, c.mask)  # (B, T_t, T_s)
        rebuilt = torch.zeros_like(dense).scatter_add_(-1, index, weight)
        torch.testing.assert_close(rebuilt, dense, rtol=0, atol=1e-7)
        assert torch.equal(covered, ((dense.sum(-1) > 0) & ti.attention_mask.bool()).long())


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_workers_give_the_same_step(tiny_config, workers):
    cfg = tiny_config("teachers.1.compression.kind=rkv", "teachers.1.compression.budget=8")
    records = load_records(cfg.data)
    objective = build_objective(cfg)
    chunks = [records[0:4], records[4:8], records[8:12]]
    pickle.dumps(objective.collator)  # what a spawned worker receives: tokenizers and settings, no model
    loader = DataLoader(chunks, batch_size=None, collate_fn=objective.collator, num_workers=workers)
    got = list(loader)
    assert [[r["id"] for r in b.records] for b in got] == [[r["id"] for r in c] for c in chunks]
    for batch, chunk in zip(got, chunks, strict=True):
        assert_same(loss_and_grads(objective, batch), loss_and_grads(objective, chunk))


def test_dense_shared_alignment_equals_the_sparse_gather(tiny_config):
    """`group_errors(dense=True)` (what runs off the CPU) == the sparse gather, in float64."""
    from kvdistill.objectives import loss_space

    cfg = tiny_config("losses.cosine=0.5")
    objective = build_objective(cfg).double()
    for t in objective.teachers:
        t.model.double()
    records = load_records(cfg.data)[:4]
    calls = []

    def dense(*args, **kwargs):
        calls.append(args[3].dim())
        return loss_space.group_errors(*args, **{**kwargs, "dense": args[3].dim() == 2})

    sparse = loss_and_grads(objective, records)
    objective.space.group_errors = dense
    got = loss_and_grads(objective, records)
    assert calls and all(d == 2 for d in calls)  # every group of these full teachers is a shared one
    torch.testing.assert_close(got[0], sparse[0], rtol=1e-12, atol=1e-12)
    for name, grad in sparse[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------ cached teachers
CACHED = [
    "teachers.0.compression.kind=rkv",
    "teachers.0.compression.budget=8",
    "teachers.0.compression.dtype=float32",
    "teachers.1.compression.dtype=float32",
]


@pytest.fixture(scope="module")
def cached_config(tiny_config, tmp_path_factory):
    """Both tiny teachers extracted to caches (teacher 0 rkv: per-head kept tokens; teacher 1 full) and the
    config that reads them."""
    from kvdistill.cache.extract import extract

    root = tmp_path_factory.mktemp("caches")
    cfg = tiny_config(
        *CACHED,
        *[
            f"teachers.{n}.{k}"
            for n, name in enumerate(("qwen2", "gemma3"))
            for k in ("source=cache", f"cache_dir={root / name}")
        ],
    )
    for t in cfg.teachers:  # a cached teacher's section is what `kvdistill extract` writes its cache from
        extract(t, cfg.data, t.cache_dir, batch_size=4, progress=False)
    return cfg


def test_cached_teachers_are_read_and_aligned_in_the_collate(cached_config):
    from kvdistill.teachers import TeacherKV

    objective = build_objective(cached_config)
    assert [t.kind for t in objective.teachers] == ["cache", "cache"]
    records = load_records(cached_config.data)[:4]
    collated = objective.collate(records)
    assert all(isinstance(t, TeacherKV) for t in collated.teachers)
    assert isinstance(collated.alignments[0], dict) and isinstance(collated.alignments[1], tuple)
    reference = loss_and_grads(objective, inline(collated))  # read and aligned in the step, as before
    assert_same(loss_and_grads(objective, collated), reference)
    assert_same(loss_and_grads(objective, records), reference)
    # a spawned worker gets the collator pickled: the readers travel as their directories and reopen
    again = pickle.loads(pickle.dumps(objective.collator))
    assert_same(loss_and_grads(objective, again(records)), reference)
    loader = DataLoader([records], batch_size=None, collate_fn=objective.collator, num_workers=2)
    assert_same(loss_and_grads(objective, next(iter(loader))), reference)
