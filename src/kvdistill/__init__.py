"""kvdistill: multi-teacher KV-cache distillation from heterogeneous teachers into one student."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model", "capture_kv", "token_alignment", "geometry_of", "KvdistillError", "__version__"]

from kvdistill.errors import KvdistillError


def __getattr__(name: str):
    # lazy so that `kvdistill --help` does not import torch/transformers
    if name == "load_model":
        from kvdistill.models.load import load_model

        return load_model
    if name == "capture_kv":
        from kvdistill.models.capture import capture_kv

        return capture_kv
    if name == "token_alignment":
        from kvdistill.align.tokens import token_alignment

        return token_alignment
    if name == "geometry_of":
        from kvdistill.models.geometry import geometry_of

        return geometry_of
    raise AttributeError(f"module 'kvdistill' has no attribute '{name}'")
