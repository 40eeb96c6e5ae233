"""Which way a family rotates the pairs of key dims: its own modeling code's rotate function is called on a
probe vector and the result compared with the two known pairings (rotate_half, interleaved), each with either
sign.
"""

from __future__ import annotations

import importlib
import inspect
import sys

import torch

_PROBE = torch.arange(1.0, 9.0).view(1, 1, 1, 8)  # (B, H, T, D) = (1, 1, 1, 8)


def _classify(out: torch.Tensor) -> tuple[str, int] | None:
    x = _PROBE
    half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)  # rotate_half
    pairs = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)  # interleaved
    for style, ref in (("rotate_half", half), ("interleaved", pairs)):
        if out.shape == ref.shape and torch.equal(out, ref):
            return style, 1
        if out.shape == ref.shape and torch.equal(out, -ref):
            return style, -1
    return None


def rotation_of_code(module_name: str) -> tuple[str, int] | None:
    """(style, sign) of the rotation a modeling module applies, read by calling its own rotate function on a
    probe vector; None when the module defines none we recognise."""
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    for fn_name in ("rotate_half", "rotate_every_two", "rotate_pairwise"):
        fn = getattr(module, fn_name, None)
        if callable(fn):
            try:
                found = _classify(fn(_PROBE.clone()))
            except Exception:  # an unexpected signature
                found = None
            if found is not None:
                return found
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return None
    if "view_as_complex" in source:  # freqs_cis: (x0 + i x1) * e^{i theta} rotates the pairs (2i, 2i + 1)
        return "interleaved", 1
    if "def _apply_rotary_emb" in source or "def apply_rotary_pos_emb_interleave" in source:
        # gpt-oss: first/second half chunks; DeepSeek-style interleave: even/odd slices concatenated, so the
        # rotated key (the one in the cache) is laid out as halves
        return "rotate_half", 1
    return None
