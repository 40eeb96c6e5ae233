"""token_nll / ce_loss against an independent reference: a sliced log-softmax, value and gradient."""

from __future__ import annotations

import pytest
import torch

from kvdistill import losses as L
from kvdistill.errors import KvdistillError


def test_ce_equals_sliced_log_softmax_reference_with_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels[:, 1:, None]).squeeze(-1)  # (B, T-1)
    m = (mask[:, 1:] * mask[:, :-1]).float()
    ref = -(logp * m).sum(1) / m.sum(1)
    got = L.ce_loss(logits, labels, mask)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    g_ref, g_got = (torch.autograd.grad(x.sum(), logits)[0] for x in (ref, got))
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-7)
    nll, counted = L.token_nll(logits, labels, mask)
    assert counted.sum() == m.sum() and not counted[:, -1].any()
    with pytest.raises(KvdistillError, match="label id 50 is outside the vocabulary of 50"):
        L.ce_loss(logits, torch.full((3, 9), 50), mask)
