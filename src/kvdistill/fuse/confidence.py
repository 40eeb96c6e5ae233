"""Confidence fusion: weights over teachers from each teacher's own competence on the sample.

Notation: B batch, T tokens of one teacher, N teachers.

A teacher's competence on a sample is its negative log-likelihood of the sample's scored text (the labelled
continuation after the question, or the whole text) per UTF-8 byte, in nats: the summed NLL of the tokens that
lie in the scored text, over the bytes those tokens cover. Per byte, not per token, so teachers of different
tokenizers are compared on the same text (a tokenizer with longer tokens has fewer, harder predictions). The
weights are

    w_n(b) = softmax_n( -nll_per_byte_n(b) / τ )

computed in the teachers' pass from their own logits, without gradient. Unlike a router trained on Σ
w·KV_loss, whose minimum puts all weight on the teacher whose K/V is easiest to match, nothing here depends on
the student: a sample of a skill goes to the teacher that predicts that skill's text best.
"""

from __future__ import annotations

import math

import torch

from kvdistill.errors import KvdistillError

__all__ = ["byte_nll", "confidence_weights", "covered_end"]


def byte_nll(
    nll: torch.Tensor,
    counted: torch.Tensor,
    spans: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor | None = None,
) -> torch.Tensor:
    """One teacher's NLL per byte of each sample's scored text -> float32 (B,), NaN where nothing was scored.

    nll, counted (B, T): `kvdistill.losses.token_nll` of the teacher's logits on its own tokens (nll[:, t] is
    the NLL of token t + 1, counted where both are real). spans (B, T, 2): the tokens' UTF-8 byte spans
    (special tokens and padding: start == end). start (B,): the byte offset where each sample's scored text
    begins; end (B,) or None: where it ends (`covered_end` of every teacher: truncation cuts tokenizations at
    different bytes, and teachers are compared on the same text). A token is scored when it is predicted
    (counted at the position before it), covers at least one byte, starts at or after `start` and ends at or
    before `end`; the result is Σ scored NLL / Σ scored tokens' bytes.
    """
    if nll.dim() != 2 or tuple(counted.shape) != tuple(nll.shape):
        raise KvdistillError(
            f"nll {tuple(nll.shape)} and counted {tuple(counted.shape)} must both be (B, T)",
            "pass the two outputs of kvdistill.losses.token_nll",
        )
    B, T = nll.shape
    if tuple(spans.shape) != (B, T, 2) or tuple(start.shape) != (B,):
        raise KvdistillError(
            f"spans {tuple(spans.shape)} and start {tuple(start.shape)} do not fit nll {(B, T)}",
            f"pass the teacher's ({B}, {T}, 2) byte spans and one byte offset per sample ({B},)",
        )
    nll_next = nll.float().roll(1, dims=1)  # (B, T): [:, j] the NLL of token j (j >= 1)
    predicted = counted.roll(1, dims=1)  # (B, T): token j predicted from the real token before it
    predicted[:, 0] = False
    width = (spans[..., 1] - spans[..., 0]).to(nll_next.device)  # (B, T) bytes of each token
    scored = predicted & (width > 0) & (spans[..., 0].to(start.device) >= start[:, None]).to(predicted.device)
    if end is not None:
        if tuple(end.shape) != (B,):
            raise KvdistillError(
                f"end {tuple(end.shape)} must hold one byte offset per sample ({B},)",
                "pass covered_end of the teachers' spans, or None",
            )
        scored = scored & (spans[..., 1].to(end.device) <= end[:, None]).to(predicted.device)
    total = torch.where(scored, nll_next, 0.0).sum(1)  # (B,)
    nbytes = torch.where(scored, width, 0).sum(1)  # (B,)
    return torch.where(nbytes > 0, total / nbytes.clamp(min=1).float(), float("nan"))


def covered_end(spans: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last byte offset a tokenization covers per sample: spans (B, T, 2), mask (B, T) 1 = real -> (B,)
    long."""
    return torch.where(mask.bool(), spans[..., 1], 0).amax(1)


def confidence_weights(nll_per_byte: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax over teachers of -nll_per_byte / τ: (B, N) -> float32 (B, N), rows sum to 1.

    A teacher with NaN (nothing of the sample scored, e.g. truncated before its continuation) gets weight 0; a
    row with no teacher scored gets uniform weights.
    """
    if nll_per_byte.dim() != 2 or nll_per_byte.shape[1] < 1:
        raise KvdistillError(
            f"nll_per_byte {tuple(nll_per_byte.shape)} must be (B, N) with N >= 1 teachers",
            "stack each teacher's byte_nll along the last axis",
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise KvdistillError(
            f"confidence temperature ({temperature}) must be finite and > 0",
            "set fusion.confidence.temperature, e.g. 0.1 (nats per byte)",
        )
    x = nll_per_byte.float()
    known = ~torch.isnan(x)  # (B, N)
    scores = torch.where(known, -x / temperature, float("-inf"))
    scores = torch.where(known.any(1, keepdim=True), scores, 0.0)  # nothing scored: uniform
    return torch.softmax(scores, dim=-1)
