"""Rotary position embedding: the cos/sin tables a model really applied, rotation and its exact inverse.

Notation: B batch, H heads, T time, D head dim, R rotary dim (dims [offset, offset + R) of a head are
rotated).

cos and sin are always (B, T, R) float32 with one entry per rotated dim, in the pairing of the style:
  rotate_half  pairs dim i with i + R/2, cos = [c, c]
  interleaved  pairs dim 2i with 2i + 1,  cos = [c0, c0, c1, c1, ...]
and with the family's sign folded into sin. They are not recomputed from theta: forward pre-hooks on each
attention module record the `position_embeddings` the model hands it (or the output of a rotary module the
attention owns), so every scaling variant (linear, dynamic, yarn, longrope, llama3, Gemma-3's two bases,
Granite-SWA's per-layer bases) is exactly what the model applied. Families hand the table over in different
forms, read once per model from a probe forward (`table_formats`): (cos, sin) or (sin, cos) (codegen), full
width in either pairing or half width (gpt-oss), or complex `freqs_cis` (llama4, deepseek_v2).
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvdistill.errors import KvdistillError
from kvdistill.models.kv_geometry import KVGeometry
from kvdistill.models.modules import decoder_attention_modules


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rotate(x: torch.Tensor, style: str) -> torch.Tensor:
    return rotate_half(x) if style == "rotate_half" else rotate_interleaved(x)


def apply_rope(
    k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, offset: int = 0
) -> torch.Tensor:
    """Rotate dims [offset, offset + R) of k (B, H, T, D) by cos/sin (B, T, R); the other dims pass
    through."""
    R = cos.shape[-1]
    cos, sin = cos[:, None].to(k.dtype), sin[:, None].to(k.dtype)  # (B, 1, T, R)
    head, k_rot, tail = k[..., :offset], k[..., offset : offset + R], k[..., offset + R :]
    return torch.cat((head, k_rot * cos + _rotate(k_rot, style) * sin, tail), dim=-1)


def invert_rope(
    k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, offset: int = 0
) -> torch.Tensor:
    """Exact inverse of `apply_rope`: rotation by -angle, divided by the scale cos² + sin².

    The division makes it exact for scaled rope too (yarn / longrope multiply cos and sin by a factor).
    """
    R = cos.shape[-1]
    cos, sin = cos[:, None].to(k.dtype), sin[:, None].to(k.dtype)  # (B, 1, T, R)
    head, k_rot, tail = k[..., :offset], k[..., offset : offset + R], k[..., offset + R :]
    unrotated = (k_rot * cos - _rotate(k_rot, style) * sin) / (cos * cos + sin * sin)
    return torch.cat((head, unrotated, tail), dim=-1)


# ------------------------------------------------------------------------------------------ recorded tables
def _rotary_child(attn: torch.nn.Module) -> torch.nn.Module | None:
    """A rotary module the attention owns and calls itself (moshi), None when the table is handed in."""
    for child in attn.children():
        if "rotary" in type(child).__name__.lower():
            return child
    return None


def _position_slot(attn: torch.nn.Module) -> int | None:
    """Index of `position_embeddings` among the attention forward's positional parameters, if it has one."""
    try:
        names = list(inspect.signature(attn.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("position_embeddings") if "position_embeddings" in names else None


_POINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {decoder layers: record points}


def _record_points(
    model: torch.nn.Module, geometry: KVGeometry
) -> list[tuple[int, torch.nn.Module, torch.nn.Module | None, int | None]]:
    """Per K/V layer with an attention module: (i, attention, its rotary child or None, the positional slot of
    `position_embeddings` or None), found once per model and layer list (module walks and signatures are slow
    next to a forward)."""
    per_model = _POINTS.setdefault(model, {})
    key = tuple(geometry.decoder_layers)
    if key not in per_model:
        attns = decoder_attention_modules(model)
        points = []
        for i, layer in enumerate(geometry.decoder_layers):
            attn = attns.get(layer)
            if attn is not None:
                child = _rotary_child(attn)
                points.append((i, attn, child, None if child is not None else _position_slot(attn)))
        per_model[key] = points
    return per_model[key]


@contextmanager
def record_tables(model: torch.nn.Module, geometry: KVGeometry):
    """For the forwards run inside the block, record per K/V layer the raw rotary table its attention used.

    Yields a list (one entry per K/V layer) filled during the forward with what the model produced: a (cos,
    sin) pair as the family orders it, a complex tensor, or None where the layer was handed no table.
    """
    tables: list = [None] * geometry.num_layers
    handles = []
    for i, attn, child, slot in _record_points(model, geometry):
        if child is not None:

            def out_hook(_m, _args, out, i=i):
                tables[i] = out

            handles.append(child.register_forward_hook(out_hook))
            continue

        def pre_hook(_m, args, kwargs, i=i, slot=slot):
            table = kwargs.get("position_embeddings")
            if table is None and slot is not None and len(args) > slot:  # handed positionally (qwen4_exp)
                table = args[slot]
            if table is not None:
                tables[i] = table

        handles.append(attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        yield tables
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class TableFormat:
    """How one layer's raw table reads as (cos, sin): which element is cos, and where the R/2 angles sit."""

    complex: bool
    cos_first: bool = True
    layout: str = "half"
    """half: [c, c] (R wide); pairs: [c0, c0, c1, c1, ...] (R wide); base: [c0, c1, ...] (R/2 wide)."""


def _as_btw(x: torch.Tensor) -> torch.Tensor:
    """A table as (B, T, W): (T, W) and (B, 1, T, W) are the other shapes families use."""
    if x.dim() == 2:
        return x[None]
    if x.dim() == 4:
        return x.squeeze(1) if x.shape[1] == 1 else x.squeeze(2)
    return x


def _format_of(raw, R: int, where: str) -> TableFormat:
    """Read the format of a table recorded at positions 0..T-1 (position 0: cos is constant, sin is 0)."""
    if isinstance(raw, torch.Tensor) and raw.is_complex():
        return TableFormat(complex=True, layout="base")
    if not isinstance(raw, tuple | list) or len(raw) != 2:
        raise KvdistillError(
            f"{where}: the rotary table is a {type(raw).__name__}, not a (cos, sin) pair",
            "this family hands its attention a table kvdistill cannot read; file an issue",
        )
    a, b = (_as_btw(t).float() for t in raw)
    at_zero = a[0, 0], b[0, 0]  # (W,) each, position 0
    cos_first = bool(at_zero[1].abs().max() < 1e-6 and at_zero[0].abs().min() > 1e-6)
    cos = a if cos_first else b
    W = cos.shape[-1]
    if W * 2 == R:
        return TableFormat(complex=False, cos_first=cos_first, layout="base")
    if W != R:
        raise KvdistillError(
            f"{where}: the rotary table is {W} wide, the geometry says R = {R}",
            "the rotary dims derived for this family are wrong; file an issue with the model id",
        )
    if torch.allclose(cos[..., : W // 2], cos[..., W // 2 :]):
        return TableFormat(complex=False, cos_first=cos_first, layout="half")
    if torch.allclose(cos[..., ::2], cos[..., 1::2]):
        return TableFormat(complex=False, cos_first=cos_first, layout="pairs")
    raise KvdistillError(
        f"{where}: the rotary table pairs its dims neither as halves nor as neighbours",
        "this family's rotation is not one kvdistill inverts; file an issue with the model id",
    )


def normalize_table(
    raw, fmt: TableFormat, style: str, sign: int, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) (B, T, R) float32 in the pairing of `style`, sign folded into sin, from a recorded table."""
    if fmt.complex:
        c, s = _as_btw(raw.real).float(), _as_btw(raw.imag).float()  # (B, T, R/2)
    else:
        cos, sin = (_as_btw(t).float() for t in (raw if fmt.cos_first else (raw[1], raw[0])))
        W = cos.shape[-1]
        if fmt.layout == "half":
            c, s = cos[..., : W // 2], sin[..., : W // 2]
        elif fmt.layout == "pairs":
            c, s = cos[..., ::2], sin[..., ::2]
        else:
            c, s = cos, sin  # (B, T, R/2)
    if style == "rotate_half":
        c, s = torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)
    else:
        c, s = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
    if c.shape[0] != batch:
        c, s = c.expand(batch, -1, -1), s.expand(batch, -1, -1)
    return c, s * sign


_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> list[TableFormat | None]


def probe_ids(model: torch.nn.Module, geometry: KVGeometry) -> torch.Tensor:
    """(1, T) token ids for a probe forward: T differs from every head count and head dim, so layouts read
    unambiguously from shapes."""
    taken = {geometry.num_kv_heads, geometry.num_attention_heads, geometry.head_dim}
    T = next(t for t in (11, 13, 17, 19, 23) if t not in taken)
    device = next(model.parameters()).device
    vocab = max(geometry.vocab_size, 8)
    return (torch.arange(T, device=device)[None] * 7 + 3) % vocab


@contextmanager
def probing(model: torch.nn.Module):
    """Eval mode and no grad for a probe forward; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _probe_forward(model, input_ids, position_ids, **extra):
    return model(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=position_ids, **extra
    )


def table_formats(model: torch.nn.Module, geometry: KVGeometry) -> list[TableFormat | None]:
    """Per K/V layer, the format of the table the model hands that layer (None: unrotated), read once per
    model."""
    if model in _FORMATS:
        return _FORMATS[model]
    if geometry.rope is None:
        formats: list[TableFormat | None] = [None] * geometry.num_layers
    else:
        ids = probe_ids(model, geometry)
        with probing(model), record_tables(model, geometry) as raw:
            _probe_forward(model, ids, torch.arange(ids.shape[1], device=ids.device)[None], use_cache=False)
        formats = []
        for i in range(geometry.num_layers):
            if not geometry.rope.rotates(i):
                formats.append(None)
                continue
            if raw[i] is None:
                raise KvdistillError(
                    f"{geometry.name} ({geometry.model_type}) layer {geometry.decoder_layers[i]} rotates its "
                    "keys, but its attention was handed no rotary table",
                    "this family computes its rotation where kvdistill cannot see it; file an issue",
                )
            formats.append(
                _format_of(
                    raw[i],
                    geometry.rope.rotary_dim_of(i),
                    f"{geometry.model_type} layer {geometry.decoder_layers[i]}",
                )
            )
    _FORMATS[model] = formats
    return formats


def layer_tables(model: torch.nn.Module, geometry: KVGeometry, raw: list, batch: int) -> list:
    """Per K/V layer (cos, sin) (B, T, R) from tables recorded by `record_tables`; None for unrotated layers.

    Layers handed the same table share one normalized pair."""
    formats = table_formats(model, geometry)
    out, seen = [], {}
    for i, fmt in enumerate(formats):
        if fmt is None or raw[i] is None:
            out.append(None)
            continue
        key = (id(raw[i][0]) if isinstance(raw[i], tuple | list) else id(raw[i]), fmt)
        if key not in seen:
            seen[key] = normalize_table(raw[i], fmt, geometry.rope.style, geometry.rope.sign, batch)
        out.append(seen[key])
    return out


@torch.no_grad()
def rope_cos_sin(
    model: torch.nn.Module, geometry: KVGeometry, positions: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, R) float32 that `model` uses at K/V layer `layer` for token positions (B, T).

    Runs one forward of the model at those positions to record them; a capture (`KVCapture.rotary`) already
    holds the tables of its own forward.
    """
    if geometry.rope is None or not geometry.rope.rotates(layer):
        raise ValueError(f"{geometry.name} ({geometry.model_type}) layer {layer} has no rotary embedding")
    ids = torch.zeros_like(positions) + 3 % max(geometry.vocab_size, 4)
    with probing(model), record_tables(model, geometry) as raw:
        _probe_forward(model, ids, positions, use_cache=False)
    return layer_tables(model, geometry, raw, positions.shape[0])[layer]
