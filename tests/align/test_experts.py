"""Expert matching (kvdistill.align.experts): the correspondence of teacher experts to student experts, the
block pairs."""

import torch

from kvdistill.align.experts import block_pairs, fit_correspondence, teacher_of


def test_fit_correspondence_groups_co_activated_experts_and_splits_by_load():
    g = torch.Generator().manual_seed(0)
    base = torch.softmax(torch.randn(200, 3, generator=g) * 3, -1)  # 3 "true" experts
    probs = torch.cat([base, base], 1) / 2  # teacher experts 3..5 duplicate 0..2: (200, 6)
    corr = fit_correspondence(probs, 3)
    groups = corr.argmax(1)
    assert torch.equal(groups[:3], groups[3:]) and len(set(groups.tolist())) == 3
    assert torch.equal(fit_correspondence(probs, 3), corr)  # deterministic
    # fewer teacher experts: split in proportion to load, each at least one student expert
    load = torch.tensor([0.7, 0.2, 0.1]).expand(50, 3)
    split = fit_correspondence(load, 6)
    assert [int((split[e] > 0).sum()) for e in range(3)] == [3, 2, 1]
    assert torch.allclose(split.sum(1), torch.ones(3))
    assert teacher_of(split).tolist() == [0, 0, 0, 1, 1, 2]


def test_block_pairs_map_ends_to_ends():
    assert block_pairs(1, 4) == [(0, 3)]
    assert block_pairs(3, 5) == [(0, 0), (1, 2), (2, 4)]
    assert block_pairs(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]
