"""Next-token cross-entropy, per sample.

Notation: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvdistill.errors import KvdistillError
from kvdistill.losses.reduce import check_dims, check_mask, sample_mean, shape_of


def token_nll(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihood at every position: (nll (B, T), counted (B, T) bool).

    logits: (B, T, V) at positions 0..T-1; labels: (B, T) token ids (usually input_ids); mask: (B, T), 1 =
    real. logits[:, t] predicts labels[:, t + 1], counted where mask[:, t] and mask[:, t + 1] are both 1; the
    last position is never counted. The shift rolls the labels, so the (B, T, V) logits are not sliced (no (B,
    T, V) copy forward, none zero-filled in backward). Labels at uncounted positions are ignored (may be
    -100).
    """
    check_dims(logits, 3, "logits", "(B, T, V)")
    B, T, V = logits.shape
    if shape_of(labels) != (B, T):
        raise KvdistillError(
            f"labels {shape_of(labels)} do not match logits {shape_of(logits)}",
            f"pass labels as ({B}, {T}) token ids of the same batch",
        )
    real = check_mask(mask, (B, T), "logits' (B, T)")
    counted = real & real.roll(-1, dims=1)  # (B, T) a real token predicting a real token
    counted[:, -1] = False
    following = torch.where(counted, labels.roll(-1, dims=1), torch.zeros_like(labels))  # (B, T)
    bad = (following < 0) | (following >= V)
    if bool(bad.any()):
        raise KvdistillError(
            f"label id {int(following[bad][0])} is outside the vocabulary of {V} logits",
            "labels must be token ids of the model's own tokenizer",
        )
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), following.reshape(B * T), reduction="none")
    return nll.view(B, T), counted


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample next-token cross-entropy (B,): the mean of `token_nll` over the sample's counted
    predictions.

    Perplexity over a corpus is exp of the token-level mean of `token_nll` instead (long samples weigh more).
    """
    nll, counted = token_nll(logits, labels, mask)
    return sample_mean(nll, counted, 1)
