"""What the logit-KD tests share: float64 random tensors, a value with its gradient, the zoo tokenizers
(loaded once), and the divergences written from probabilities (0·log 0 = 0), the independent side of every
brute-force reference."""

from __future__ import annotations

import functools
import math

import torch


def rand64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def value_and_grad(fn, x):
    """fn(x) detached and d(sum fn(x))/dx."""
    x = x.detach().clone().requires_grad_()
    value = fn(x)
    return value.detach(), torch.autograd.grad(value.sum(), x)[0]


@functools.cache
def tokenizer(name: str):
    from kvdistill.models.load import load_tokenizer

    return load_tokenizer(name)


def kl_np(p, q):
    """KL(p || q) of two lists of probabilities, in plain Python."""
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


def kl(p, q):
    """KL(p || q) over the last dimension of probability tensors."""
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0)
    return terms.sum(-1)


def divergence(p_t, p_s, kind: str, beta: float):
    """forward KL(p_t || p_s), reverse KL(p_s || p_t), or JSD_β with the mixture β·p_t + (1 - β)·p_s."""
    if kind == "forward":
        return kl(p_t, p_s)
    if kind == "reverse":
        return kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
