"""Head/dim maps between KV geometries: student → teacher projectors and frozen teacher → student maps.

Notation: B batch, T time, H_s/H_t student/teacher KV heads (num_kv_heads, never query heads: GQA/MQA share a
KV head between query heads), D_s/D_t student/teacher head dims. K/V tensors are (B, H, T, D).
A geometry is anything with `num_kv_heads` and `head_dim` (e.g. `kvdistill.models.geometry.KVGeometry`).

Two directions, two roles:

- `KVProjector` (student → teacher, learnable) is the default. The loss is computed in the TEACHER space
against
  the teacher's K/V as a fixed target: ``kvdistill.losses.kv_error(P(K_s), K_t)``. Collapse is impossible: a
  student whose K/V carry no information (constant over tokens) is mapped by any P to something constant over
  tokens, and no constant is closer to a varying target than its mean; after normalising by the target's
  spread the loss stays at the fraction of variance a constant cannot explain (≈ 1). tests/align/test_heads.py
  proves it by training.

- `TeacherToStudentMap` (teacher → student, FROZEN) serves target-space fusion, where the teachers' K/V are
fused
  into the student's geometry, KV_fused = Σ_n w_n A_n(KV_n), and compared with the student there. A_n must not
  be trainable by that loss: with a learnable A_n the loss ||K_s - A_n(K_t)||² is zero at A_n = 0 and K_s = 0
  (or any constant A_n maps to), so student and map meet at a point that carries no teacher information — the
  collapse. The map is therefore held in buffers (no parameters at all, requires_grad False) and set once:
  fixed from the geometries (head group pseudo-inverse, dims by PCA of teacher samples or truncation), or
  fitted by ridge regression from aligned samples (`fit_teacher_to_student`), never by the distillation loss.
"""

from __future__ import annotations

import torch
from torch import nn

from kvdistill.errors import KvdistillError

PROJECTOR_KINDS = ("per_head", "linear", "identity", "auto")
_WHICH = ("keys", "values")


# -------------------------------------------------------------------------------------------------- helpers
def _heads_dims(geometry) -> tuple[int, int]:
    return int(geometry.num_kv_heads), int(geometry.head_dim)


def resolve_kind(student, teacher, kind: str) -> str:
    """`auto` → identity when (H_kv, D) match, per_head otherwise; other kinds are checked and returned."""
    if kind not in PROJECTOR_KINDS:
        raise KvdistillError(
            f"projector kind '{kind}' is unknown", f"use one of {', '.join(PROJECTOR_KINDS)}"
        )
    same = _heads_dims(student) == _heads_dims(teacher)
    if kind == "auto":
        return "identity" if same else "per_head"
    if kind == "identity" and not same:
        (H_s, D_s), (H_t, D_t) = _heads_dims(student), _heads_dims(teacher)
        raise KvdistillError(
            f"identity projector needs equal KV geometries, but the student has {H_s} KV heads x {D_s} dims "
            f"and the teacher {H_t} x {D_t}",
            "use projector 'per_head' (or 'auto', 'linear')",
        )
    return kind


def group_average_matrix(H_t: int, H_s: int) -> torch.Tensor:
    """(H_t, H_s) head-mixing matrix: teacher KV head t ← the mean of the student heads that correspond to it.

    Heads are laid on [0, 1) in order: student head s covers [s/H_s, (s+1)/H_s), teacher head t covers
    [t/H_t, (t+1)/H_t); the weight of s in t is their overlap, rows normalised to sum 1.
    Examples: H_s=9 → H_t=3 (GQA 9/3 groups): t0 = mean(s0, s1, s2), ...; H_s=4 → H_t=1 (MQA): mean of all;
    H_s=1 → H_t=3: every teacher head ← s0; H_s=2 → H_t=3: t0 ← s0, t1 ← (s0 + s1)/2, t2 ← s1;
    H_s=3 → H_t=2: t0 ← (2·s0 + s1)/3, t1 ← (s1 + 2·s2)/3.
    """
    # overlap in units of 1/(H_s·H_t): student s = [s·H_t, (s+1)·H_t), teacher t = [t·H_s, (t+1)·H_s)
    s = torch.arange(H_s, dtype=torch.float64)
    t = torch.arange(H_t, dtype=torch.float64)
    lo = torch.maximum(s[None, :] * H_t, t[:, None] * H_s)  # (H_t, H_s)
    hi = torch.minimum((s[None, :] + 1) * H_t, (t[:, None] + 1) * H_s)
    overlap = (hi - lo).clamp(min=0)
    return (overlap / overlap.sum(dim=1, keepdim=True)).float()


def _dim_init(D_t: int, D_s: int) -> torch.Tensor:
    """(D_t, D_s) initial dim map: identity when D_s == D_t, else a random semi-orthogonal matrix
    (orthonormal columns when D_t > D_s, so norms are kept; orthonormal rows when D_t < D_s)."""
    if D_t == D_s:
        return torch.eye(D_t)
    w = torch.empty(D_t, D_s)
    nn.init.orthogonal_(w)
    return w


def projector_param_count(student, teacher, kind: str = "auto") -> int:
    """Trainable parameters of ONE map (keys or values) of a `KVProjector`; the projector holds two (keys and
    values), so ``sum(p.numel() for p in KVProjector(...).parameters()) == 2 * projector_param_count(...)``.

    per_head: H_t·H_s (head mix) + H_t·D_t·D_s (per-teacher-head dim map) + H_t·D_t (bias).
    linear:   (H_s·D_s)·(H_t·D_t) + H_t·D_t.      identity: 0.
    Example: SmolLM2-135M (3 x 64) → Gemma-3-270M (1 x 256), per_head: 3 + 16384 + 256 = 16643.
    """
    kind = resolve_kind(student, teacher, kind)
    (H_s, D_s), (H_t, D_t) = _heads_dims(student), _heads_dims(teacher)
    if kind == "identity":
        return 0
    if kind == "per_head":
        return H_t * H_s + H_t * D_t * D_s + H_t * D_t
    return (H_s * D_s) * (H_t * D_t) + H_t * D_t


# ------------------------------------------------------------------------------------- student → teacher
class PerHeadMap(nn.Module):
    """GQA/MQA-aware map (B, H_s, T, D_s) → (B, H_t, T, D_t): mix heads, then a dim map per teacher head.

    y[:, t] = W_t · (Σ_s mix[t, s] · x[:, s]) + b_t. mix starts as `group_average_matrix` (works for H_s >
    H_t, H_s < H_t and non-divisible counts); W_t starts as the identity when D_s == D_t, else
    semi-orthogonal.
    """

    def __init__(self, H_s: int, D_s: int, H_t: int, D_t: int):
        super().__init__()
        self.mix = nn.Parameter(group_average_matrix(H_t, H_s))  # (H_t, H_s)
        self.weight = nn.Parameter(torch.stack([_dim_init(D_t, D_s) for _ in range(H_t)]))  # (H_t, D_t, D_s)
        self.bias = nn.Parameter(torch.zeros(H_t, D_t))  # (H_t, D_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix, weight, bias = self.mix.to(x.dtype), self.weight.to(x.dtype), self.bias.to(x.dtype)
        x = torch.einsum("ts,bsnd->btnd", mix, x)  # (B, H_t, T, D_s)
        y = torch.einsum("btnd,ted->btne", x, weight)  # (B, H_t, T, D_t)
        return y + bias[None, :, None, :]


class FlatLinearMap(nn.Module):
    """One Linear over all heads: (B, H_s, T, D_s) → flatten (B, T, H_s·D_s) → (B, T, H_t·D_t) → (B, H_t, T,
    D_t).

    Initialised to the same function as `PerHeadMap` (kron(group average, dim init)), then free to mix
    anything.
    """

    def __init__(self, H_s: int, D_s: int, H_t: int, D_t: int):
        super().__init__()
        self.H_t, self.D_t = H_t, D_t
        dims = torch.stack(
            [_dim_init(D_t, D_s) for _ in range(H_t)]
        )  # (H_t, D_t, D_s), same draws as PerHeadMap
        mix = group_average_matrix(H_t, H_s)  # (H_t, H_s)
        self.linear = nn.Linear(H_s * D_s, H_t * D_t)
        with torch.no_grad():
            # weight[(t, e), (s, d)] = mix[t, s] · dims[t, e, d]
            w = torch.einsum("ts,ted->tesd", mix, dims).reshape(H_t * D_t, H_s * D_s)
            self.linear.weight.copy_(w)
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H_s, T, D_s = x.shape
        flat = x.transpose(1, 2).reshape(B, T, H_s * D_s)  # (B, T, H_s·D_s)
        weight, bias = self.linear.weight.to(x.dtype), self.linear.bias.to(x.dtype)
        y = torch.nn.functional.linear(flat, weight, bias).view(B, T, self.H_t, self.D_t)  # (B, T, H_t, D_t)
        return y.transpose(1, 2)  # (B, H_t, T, D_t)


class KVProjector(nn.Module):
    """Learnable map of student K or V (B, H_s, T, D_s) into the teacher's geometry (B, H_t, T, D_t).

    kind: "per_head" (`PerHeadMap`), "linear" (`FlatLinearMap`), "identity" (no parameters; needs equal
    (H_kv, D)), or "auto" (identity when the geometries match, per_head otherwise). Keys and values get
    separate maps (`key_map`, `value_map`): ``forward(x, which="keys" | "values")``. Float32 and float64
    inputs are computed in the parameters' dtype (float32 by default); bfloat16 / float16 inputs in their own
    dtype (the parameters are cast, their gradients stay in the parameters' dtype), as mixed precision does;
    identity returns x unchanged.
    """

    def __init__(self, student, teacher, kind: str = "auto"):
        super().__init__()
        self.kind = resolve_kind(student, teacher, kind)
        (self.H_s, self.D_s), (self.H_t, self.D_t) = _heads_dims(student), _heads_dims(teacher)
        cls = {"per_head": PerHeadMap, "linear": FlatLinearMap}.get(self.kind)
        self.key_map = cls(self.H_s, self.D_s, self.H_t, self.D_t) if cls else None
        self.value_map = cls(self.H_s, self.D_s, self.H_t, self.D_t) if cls else None

    def forward(self, x: torch.Tensor, which: str = "keys") -> torch.Tensor:
        if which not in _WHICH:
            raise KvdistillError(
                f"KVProjector which='{which}' is unknown", "use which='keys' or which='values'"
            )
        if x.dim() != 4 or x.shape[1] != self.H_s or x.shape[3] != self.D_s:
            raise KvdistillError(
                f"KVProjector expects student {which} (B, {self.H_s}, T, {self.D_s}), got {tuple(x.shape)}",
                "pass K/V laid out (B, H_kv, T, D) from the student",
            )
        if self.kind == "identity":
            return x
        proj = self.key_map if which == "keys" else self.value_map
        if x.dtype not in (torch.bfloat16, torch.float16):
            x = x.to(proj.linear.weight.dtype if isinstance(proj, FlatLinearMap) else proj.weight.dtype)
        return proj(x)

    def project_pair(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Keys and values (B, H_s, T, D_s) mapped in one batched matmul -> (2, B, T, H_t·D_t), token-major.

        The same function as `forward` for each (up to float rounding): the per-head map is folded into one
        (H_t·D_t, H_s·D_s) matrix per side. Computed in the inputs' dtype for bf16 / fp16, else the
        parameters'.
        """
        return project_layers([self], [keys], [values])[0]

    def extra_repr(self) -> str:
        return f"kind={self.kind}, ({self.H_s} x {self.D_s}) -> ({self.H_t} x {self.D_t})"


def fold_per_head(
    mix: torch.Tensor, dims: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """G per-head maps as dense matrices: mix (G, H_t, H_s), dims (G, H_t, D_t, D_s), bias (G, H_t, D_t) ->
    weight (G, H_t·D_t, H_s·D_s) with weight[g, (t, e), (s, d)] = mix[g, t, s] · dims[g, t, e, d], bias (G,
    H_t·D_t)."""
    G, H_t, H_s = mix.shape
    D_t, D_s = dims.shape[-2:]
    weight = (mix[:, :, None, :, None] * dims[:, :, :, None, :]).reshape(G, H_t * D_t, H_s * D_s)
    return weight, bias.reshape(G, H_t * D_t)


def _stacked_matrices(projectors) -> tuple[torch.Tensor, torch.Tensor]:
    """(2L, H_t·D_t, H_s·D_s) weights and (2L, H_t·D_t) biases of L projectors' key and value maps, in the
    order keys of projector 0, values of projector 0, keys of projector 1, ..."""
    maps = [m for p in projectors for m in (p.key_map, p.value_map)]
    if projectors[0].kind == "linear":
        return torch.stack([m.linear.weight for m in maps]), torch.stack([m.linear.bias for m in maps])
    return fold_per_head(
        torch.stack([m.mix for m in maps]),
        torch.stack([m.weight for m in maps]),
        torch.stack([m.bias for m in maps]),
    )


def project_layers(projectors, keys, values) -> torch.Tensor:
    """K and V of L student layers, each mapped by its own `KVProjector`, in one batched matmul.

    projectors: L projectors of one (student, teacher) geometry pair and kind; keys, values: L tensors
    (B, H_s, T, D_s) -> (L, 2, B, T, H_t·D_t), token-major; [l] equals ``projectors[l].project_pair(keys[l],
    values[l])``. The per-layer parameters are stacked on every call (they stay separate parameters, so
    checkpoints keep their layout). Computed in the inputs' dtype for bf16 / fp16, else the parameters'.
    """
    p0 = projectors[0]
    if not (len(projectors) == len(keys) == len(values)) or any(
        (p.kind, p.H_s, p.D_s, p.H_t, p.D_t) != (p0.kind, p0.H_s, p0.D_s, p0.H_t, p0.D_t) for p in projectors
    ):
        raise KvdistillError(
            "project_layers needs one projector per layer, all of one kind and geometry; got "
            f"{len(projectors)} "
            f"projectors ({sorted({p.extra_repr() for p in projectors})}) for {len(keys)} keys and "
            f"{len(values)} values",
            "group the layers by teacher",
        )
    weight, bias = (None, None) if p0.kind == "identity" else _stacked_matrices(projectors)
    return project_stacked(keys, values, weight, bias, p0)


def project_stacked(
    keys, values, weight: torch.Tensor | None, bias: torch.Tensor | None, geometry
) -> torch.Tensor:
    """L layers' K and V (B, H_s, T, D_s) through stacked matrices weight (2L, F_t, F_s), bias (2L, F_t) (keys
    of layer 0, values of layer 0, ...; None: identity) in one batched matmul -> (L, 2, B, T, F_t),
    token-major. `geometry` names H_s, D_s, H_t, D_t (a projector or a stack of them). Computed in the inputs'
    dtype for bf16 / fp16, else the matrices'."""
    g = geometry
    B, H_s, T, D_s = keys[0].shape
    for k, v in zip(keys, values, strict=True):
        if k.shape != keys[0].shape or v.shape != keys[0].shape or H_s != g.H_s or D_s != g.D_s:
            raise KvdistillError(
                f"KVProjector expects student keys and values (B, {g.H_s}, T, {g.D_s}), got "
                f"{tuple(k.shape)} and {tuple(v.shape)}",
                "pass K/V laid out (B, H_kv, T, D) from the student",
            )
    L, F_s = len(keys), H_s * D_s
    # (B, H_s, T, D_s) -> (B, T, H_s, D_s): views when the K/V are transposed projection outputs; one copy
    flat = torch.stack([x.transpose(1, 2) for k, v in zip(keys, values, strict=True) for x in (k, v)])
    flat = flat.view(2 * L, B * T, F_s)  # (2L, B·T, H_s·D_s)
    if weight is None:
        return flat.view(L, 2, B, T, F_s)
    dtype = flat.dtype if flat.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    out = torch.baddbmm(bias.to(dtype)[:, None], flat.to(dtype), weight.to(dtype).transpose(1, 2))
    return out.view(L, 2, B, T, g.H_t * g.D_t)  # (L, 2, B, T, H_t·D_t)


# ---------------------------------------------------------------------------- teacher → student (frozen)
def fixed_teacher_to_student(
    H_t: int, D_t: int, H_s: int, D_s: int, teacher_kv: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A map from teacher to student geometry chosen without student data: (weight (H_s·D_s, H_t·D_t), bias).

    Heads: the pseudo-inverse of `group_average_matrix(H_t, H_s)`, so student head s ← the teacher head(s)
    that its group averages into (H_s > H_t: each teacher head copied to its group; H_s < H_t: teacher heads
    averaged). Dims: D_s == D_t → identity; D_s > D_t → the teacher's D_t dims then zeros; D_s < D_t → the
    top-D_s principal directions of `teacher_kv` samples (N, H_t, D_t) pooled over heads (SVD of the centred
    samples), or the first D_s dims when no samples are given. Bias is zero.
    """
    heads = torch.linalg.pinv(group_average_matrix(H_t, H_s).double())  # (H_s, H_t)
    if D_s < D_t and teacher_kv is not None:
        _check_samples(teacher_kv, H_t, D_t, "teacher_kv")
        x = teacher_kv.double().reshape(-1, D_t)  # (N·H_t, D_t)
        _, _, Vh = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)
        dims = Vh[:D_s]  # (D_s, D_t)
    else:
        dims = torch.eye(D_s, D_t, dtype=torch.float64)  # identity, truncation or zero padding
    weight = torch.kron(heads, dims)  # (H_s·D_s, H_t·D_t): [(s, e), (t, d)] = heads[s, t] · dims[e, d]
    return weight.float(), torch.zeros(H_s * D_s)


def fit_teacher_to_student(
    teacher_kv: torch.Tensor, student_kv: torch.Tensor, ridge: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression of student K or V on teacher K or V at aligned tokens.

    teacher_kv: (N, H_t, D_t), student_kv: (N, H_s, D_s): N paired samples (the same tokens, e.g. pooled
    through
        the token alignment). Returns (weight (H_s·D_s, H_t·D_t), bias (H_s·D_s)) minimising
        Σ ||y - W x - b||² + λ ||W||² over flattened x = teacher, y = student, with an unpenalised intercept
        and λ = ridge · mean feature variance · N (so `ridge` is scale-free). Solved in float64 with
        torch.linalg.
    """
    if teacher_kv.dim() != 3 or student_kv.dim() != 3 or teacher_kv.shape[0] != student_kv.shape[0]:
        raise KvdistillError(
            f"fit_teacher_to_student needs paired samples teacher (N, H_t, D_t) and student "
            f"(N, H_s, D_s), got {tuple(teacher_kv.shape)} and {tuple(student_kv.shape)}",
            "pass K or V of the same N aligned tokens from both models",
        )
    N = teacher_kv.shape[0]
    x = teacher_kv.double().reshape(N, -1)  # (N, H_t·D_t)
    y = student_kv.double().reshape(N, -1)  # (N, H_s·D_s)
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc  # (H_t·D_t, H_t·D_t)
    lam = ridge * float(gram.diagonal().mean()) if float(gram.diagonal().mean()) > 0 else ridge
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    w_t = torch.linalg.solve(gram + lam * eye, xc.T @ yc)  # (H_t·D_t, H_s·D_s)
    bias = y_mean - x_mean @ w_t
    return w_t.T.contiguous().float(), bias.float()


def _check_samples(x: torch.Tensor, H: int, D: int, name: str) -> None:
    if x.dim() != 3 or tuple(x.shape[1:]) != (H, D):
        raise KvdistillError(
            f"{name} must be (N, {H}, {D}) samples, got {tuple(x.shape)}",
            "pass K or V of N tokens laid out (N, H_kv, D)",
        )


class TeacherToStudentMap(nn.Module):
    """Frozen map of teacher K or V (B, H_t, T, D_t) into the student's geometry (B, H_s, T, D_s).

    Weights live in buffers (`key_weight`, `key_bias`, `value_weight`, `value_bias`; weight (H_s·D_s,
    H_t·D_t)): the module has no parameters, so no optimizer or loss can move it (see the module docstring for
    why). Starts as `fixed_teacher_to_student`; `fit(which, teacher_kv, student_kv=None)` resets one side from
    samples: ridge regression with student samples, else the fixed map with PCA of the teacher samples.
    """

    def __init__(self, teacher, student):
        super().__init__()
        (self.H_t, self.D_t), (self.H_s, self.D_s) = _heads_dims(teacher), _heads_dims(student)
        weight, bias = fixed_teacher_to_student(self.H_t, self.D_t, self.H_s, self.D_s)
        for which in ("key", "value"):
            self.register_buffer(f"{which}_weight", weight.clone())
            self.register_buffer(f"{which}_bias", bias.clone())

    @torch.no_grad()
    def fit(
        self,
        which: str,
        teacher_kv: torch.Tensor,
        student_kv: torch.Tensor | None = None,
        ridge: float = 1e-3,
    ) -> TeacherToStudentMap:
        """Set the keys or values map from samples teacher (N, H_t, D_t) [and student (N, H_s, D_s)]."""
        if which not in _WHICH:
            raise KvdistillError(
                f"TeacherToStudentMap which='{which}' is unknown", "use which='keys' or which='values'"
            )
        _check_samples(teacher_kv, self.H_t, self.D_t, "teacher_kv")
        if student_kv is None:
            weight, bias = fixed_teacher_to_student(self.H_t, self.D_t, self.H_s, self.D_s, teacher_kv)
        else:
            _check_samples(student_kv, self.H_s, self.D_s, "student_kv")
            weight, bias = fit_teacher_to_student(teacher_kv, student_kv, ridge)
        prefix = which[:-1]  # keys -> key, values -> value
        getattr(self, f"{prefix}_weight").copy_(weight)
        getattr(self, f"{prefix}_bias").copy_(bias)
        return self

    def forward(self, x: torch.Tensor, which: str = "keys") -> torch.Tensor:
        if which not in _WHICH:
            raise KvdistillError(
                f"TeacherToStudentMap which='{which}' is unknown", "use which='keys' or which='values'"
            )
        if x.dim() != 4 or x.shape[1] != self.H_t or x.shape[3] != self.D_t:
            raise KvdistillError(
                f"TeacherToStudentMap expects teacher {which} (B, {self.H_t}, T, {self.D_t}), "
                f"got {tuple(x.shape)}",
                "pass K/V laid out (B, H_kv, T, D) from the teacher",
            )
        prefix = which[:-1]
        weight, bias = getattr(self, f"{prefix}_weight"), getattr(self, f"{prefix}_bias")
        B, H_t, T, D_t = x.shape
        flat = x.detach().to(weight.dtype).transpose(1, 2).reshape(B, T, H_t * D_t)  # (B, T, H_t·D_t)
        y = flat @ weight.T + bias  # (B, T, H_s·D_s)
        return y.view(B, T, self.H_s, self.D_s).transpose(1, 2)  # (B, H_s, T, D_s)

    def extra_repr(self) -> str:
        return f"frozen, ({self.H_t} x {self.D_t}) -> ({self.H_s} x {self.D_s})"
