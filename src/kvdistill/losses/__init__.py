"""kvdistill.losses: THE loss library. Pure per-sample functions with shapes and masks in their docstrings;
training (kvdistill.objectives), evaluation and the tests call these and nothing else.

Every function returns one float32 value per sample, (B,) (or (..., B) for the row-wise K/V errors): the
objective of a batch is the mean over its samples, which is what makes batch size, gradient accumulation and
DDP give the same update. Inputs of any float dtype are reduced in float32. Mask semantics:
kvdistill.losses.reduce.
"""

from kvdistill.losses.attention import attention_kl, relation_loss, relation_matrix
from kvdistill.losses.ce import ce_loss, token_nll
from kvdistill.losses.codi import CODI_KINDS, codi_loss
from kvdistill.losses.cross_logits import cross_logit_kd
from kvdistill.losses.divergence import DIVERGENCES, TAIL_FLOOR
from kvdistill.losses.hidden import hidden_error
from kvdistill.losses.kv import KV_KINDS, as_rows, cosine_error, kv_error, pairs_kv_loss
from kvdistill.losses.logits import logit_kd, topk_log_probs, topk_logit_kd
from kvdistill.losses.moe import (
    expert_output_error,
    load_balance,
    routing_agreement,
    routing_kl,
    routing_log_probs,
)
from kvdistill.losses.reduce import sample_mean
from kvdistill.losses.span_logits import span_logit_kd

__all__ = [
    "CODI_KINDS",
    "DIVERGENCES",
    "codi_loss",
    "KV_KINDS",
    "as_rows",
    "attention_kl",
    "ce_loss",
    "cosine_error",
    "hidden_error",
    "kv_error",
    "logit_kd",
    "pairs_kv_loss",
    "relation_loss",
    "relation_matrix",
    "sample_mean",
    "token_nll",
]
__all__ += ["TAIL_FLOOR", "cross_logit_kd", "span_logit_kd", "topk_log_probs", "topk_logit_kd"]
__all__ += ["expert_output_error", "load_balance", "routing_agreement", "routing_kl", "routing_log_probs"]
