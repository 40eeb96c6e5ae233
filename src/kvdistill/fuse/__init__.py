"""kvdistill.fuse: weights over teachers (fixed, similarity to prototypes, the teachers' own confidence,
learned routers), the routers' regulariser and supervision, and target-space fusion."""

from kvdistill.fuse.confidence import byte_nll, confidence_weights, covered_end
from kvdistill.fuse.entropy import entropy, entropy_regularizer
from kvdistill.fuse.fixed import fixed_weights
from kvdistill.fuse.prototypes import PROTOTYPE_KINDS, kmeans, prototype
from kvdistill.fuse.router import Router, router_target_kl
from kvdistill.fuse.similarity import SIMILARITY_METRICS, best_match, similarity_weights
from kvdistill.fuse.targets import fuse_targets

__all__ = [
    "PROTOTYPE_KINDS",
    "SIMILARITY_METRICS",
    "Router",
    "best_match",
    "byte_nll",
    "confidence_weights",
    "covered_end",
    "entropy",
    "entropy_regularizer",
    "fixed_weights",
    "fuse_targets",
    "kmeans",
    "prototype",
    "router_target_kl",
    "similarity_weights",
]
