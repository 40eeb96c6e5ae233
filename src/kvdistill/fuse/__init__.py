"""kvdistill.fuse: weights over teachers (fixed, similarity to prototypes, learned routers) and their regulariser."""

from kvdistill.fuse.entropy import entropy, entropy_regularizer
from kvdistill.fuse.router import Router
from kvdistill.fuse.weights import (
           fixed_weights,
           fuse_targets,
           kmeans_prototypes,
           prototype,
           similarity_weights,
)

__all__ = ["Router", "entropy", "entropy_regularizer", "fixed_weights", "fuse_targets", "kmeans_prototypes",
           "prototype", "similarity_weights"]
