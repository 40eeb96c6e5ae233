"""Head/dim maps: shapes across GQA/MQA geometries, exact parameter counts, the frozen teacher→student map,
and THE COLLAPSE TEST (a constant student cannot make the teacher-space KV loss small; an informative one
can)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from kvdistill.align.heads import (
    FlatLinearMap,
    KVProjector,
    PerHeadMap,
    TeacherToStudentMap,
    fit_teacher_to_student,
    fixed_teacher_to_student,
    group_average_matrix,
    projector_param_count,
)
from kvdistill.errors import KvdistillError
from kvdistill.losses import as_rows, kv_error


@dataclass(frozen=True)
class Geom:
    """The attributes of a KV geometry that head maps read (duck-typed like models.geometry.KVGeometry)."""

    num_kv_heads: int
    head_dim: int
    num_attention_heads: int = 0
    num_layers: int = 2
    hidden_size: int = 64


GQA_9_3 = Geom(num_kv_heads=3, head_dim=64, num_attention_heads=9, num_layers=30, hidden_size=576)  # SmolLM2
MQA_4_1 = Geom(num_kv_heads=1, head_dim=256, num_attention_heads=4, num_layers=18, hidden_size=640)  # Gemma-3


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------ head grouping
def test_group_average_matrix_examples():
    torch.testing.assert_close(
        group_average_matrix(3, 9), torch.kron(torch.eye(3), torch.full((1, 3), 1 / 3))
    )
    torch.testing.assert_close(group_average_matrix(1, 4), torch.full((1, 4), 0.25))
    torch.testing.assert_close(group_average_matrix(3, 1), torch.ones(3, 1))
    torch.testing.assert_close(group_average_matrix(3, 2), torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
    torch.testing.assert_close(
        group_average_matrix(2, 3), torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]])
    )
    torch.testing.assert_close(group_average_matrix(4, 4), torch.eye(4))


# ------------------------------------------------------------------------------------------ projector shapes
@pytest.mark.parametrize("kind", ["per_head", "linear", "auto"])
@pytest.mark.parametrize(
    "student, teacher",
    [
        (GQA_9_3, MQA_4_1),  # H_s > H_t, D 64 -> 256
        (MQA_4_1, GQA_9_3),  # H_s < H_t, D 256 -> 64
        (Geom(3, 16), Geom(2, 16)),  # non-divisible heads
        (Geom(2, 8), Geom(5, 12)),
    ],
)
def test_projector_shapes_and_param_counts(student, teacher, kind):
    proj = KVProjector(student, teacher, kind=kind)
    x = torch.randn(2, student.num_kv_heads, 7, student.head_dim)  # (B, H_s, T, D_s)
    for which in ("keys", "values"):
        assert proj(x, which=which).shape == (2, teacher.num_kv_heads, 7, teacher.head_dim)
    count = projector_param_count(student, teacher, kind)
    assert n_params(proj.key_map) == n_params(proj.value_map) == count
    assert n_params(proj) == 2 * count


def test_param_count_formulas_for_real_geometries():
    # per_head: H_t·H_s + H_t·D_t·D_s + H_t·D_t ; linear: H_s·D_s·H_t·D_t + H_t·D_t
    assert projector_param_count(GQA_9_3, MQA_4_1, "per_head") == 3 + 256 * 64 + 256
    assert projector_param_count(GQA_9_3, MQA_4_1, "linear") == 192 * 256 + 256
    assert projector_param_count(MQA_4_1, GQA_9_3, "per_head") == 3 + 3 * 64 * 256 + 3 * 64
    assert projector_param_count(GQA_9_3, GQA_9_3, "auto") == 0
    assert projector_param_count(GQA_9_3, MQA_4_1, "auto") == projector_param_count(
        GQA_9_3, MQA_4_1, "per_head"
    )


def test_keys_and_values_maps_are_separate():
    proj = KVProjector(Geom(2, 8), Geom(1, 8), kind="per_head")
    with torch.no_grad():
        proj.value_map.bias.fill_(1.0)
    x = torch.randn(1, 2, 3, 8)
    torch.testing.assert_close(proj(x, which="values") - proj(x, which="keys"), torch.ones(1, 1, 3, 8))


def test_identity_projector_is_exact_and_free():
    proj = KVProjector(GQA_9_3, GQA_9_3, kind="identity")
    x = torch.randn(2, 3, 5, 64)
    assert proj(x, which="keys") is x and proj(x, which="values") is x
    assert n_params(proj) == 0 and projector_param_count(GQA_9_3, GQA_9_3, "identity") == 0
    assert KVProjector(GQA_9_3, GQA_9_3).kind == "identity"  # auto
    assert KVProjector(GQA_9_3, MQA_4_1).kind == "per_head"


def test_identity_projector_refuses_different_geometries():
    with pytest.raises(KvdistillError, match="student has 3 KV heads x 64 dims and the teacher 1 x 256"):
        KVProjector(GQA_9_3, MQA_4_1, kind="identity")
    with pytest.raises(KvdistillError, match="projector kind 'conv' is unknown"):
        KVProjector(GQA_9_3, MQA_4_1, kind="conv")


def test_projector_rejects_wrong_inputs():
    proj = KVProjector(GQA_9_3, MQA_4_1)
    with pytest.raises(KvdistillError, match=r"expects student keys \(B, 3, T, 64\), got \(2, 5, 64\)"):
        proj(torch.randn(2, 5, 64))
    with pytest.raises(KvdistillError, match="which='queries' is unknown"):
        proj(torch.randn(1, 3, 5, 64), which="queries")


def test_per_head_init_is_group_averaging():
    """Same head dim: each teacher head starts as the mean of its student group (the GQA correspondence)."""
    proj = KVProjector(Geom(6, 8), Geom(2, 8), kind="per_head")
    x = torch.randn(2, 6, 5, 8)  # (B, H_s, T, D)
    expected = x.view(2, 2, 3, 5, 8).mean(dim=2)  # (B, H_t, T, D)
    torch.testing.assert_close(proj(x, which="keys"), expected)
    # fewer student heads: every teacher head starts as a copy of the student head it covers
    proj = KVProjector(Geom(1, 8), Geom(3, 8), kind="per_head")
    x = torch.randn(2, 1, 5, 8)
    torch.testing.assert_close(proj(x, which="values"), x.expand(2, 3, 5, 8))


def test_linear_init_computes_the_per_head_init():
    torch.manual_seed(3)
    per_head = PerHeadMap(3, 16, 2, 24)
    torch.manual_seed(3)
    linear = FlatLinearMap(3, 16, 2, 24)
    x = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(linear(x), per_head(x))


def test_dim_init_keeps_norms_when_widening():
    proj = KVProjector(Geom(1, 64), Geom(1, 256), kind="per_head")
    x = torch.randn(1, 1, 10, 64)
    torch.testing.assert_close(proj(x).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("kind", ["per_head", "linear"])
def test_projector_runs_bf16_in_bf16_and_gets_float32_gradients(kind):
    """A bf16 student is projected in bf16 (mixed precision: no float32 gemms), the parameters stay
    float32."""
    proj = KVProjector(GQA_9_3, MQA_4_1, kind=kind)
    x = torch.randn(2, 3, 4, 64)
    y = proj(x.bfloat16(), which="keys")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), proj(x, which="keys"), atol=0.05, rtol=0.02)
    y.float().square().mean().backward()
    assert all(
        p.dtype == torch.float32
        and p.grad is not None
        and p.grad.dtype == torch.float32
        and p.grad.abs().sum() > 0
        for p in proj.key_map.parameters()
    )


# ------------------------------------------------------------------------------------ teacher → student
def test_teacher_to_student_map_is_frozen():
    mapper = TeacherToStudentMap(MQA_4_1, GQA_9_3)
    assert list(mapper.parameters()) == []
    assert all(not b.requires_grad for b in mapper.buffers())
    assert set(mapper.state_dict()) == {"key_weight", "key_bias", "value_weight", "value_bias"}
    t = torch.randn(2, 1, 5, 256, requires_grad=True)
    assert not mapper(t, which="keys").requires_grad  # the fused target is a stop-gradient
    assert mapper(t, which="values").shape == (2, 3, 5, 64)


def test_fixed_map_inverts_group_averaging():
    """Teacher → student (pinv of the grouping) then student → teacher (grouping) gives the teacher back."""
    for H_t, H_s in [(3, 9), (1, 4), (3, 1), (3, 2), (2, 3)]:
        mapper = TeacherToStudentMap(Geom(H_t, 8), Geom(H_s, 8))
        teacher = torch.randn(2, H_t, 5, 8)  # (B, H_t, T, D)
        student = mapper(teacher)  # (B, H_s, T, D)
        back = torch.einsum("ts,bsnd->btnd", group_average_matrix(H_t, H_s), student)
        if H_s >= H_t:  # the grouping loses nothing: exact round trip
            torch.testing.assert_close(back, teacher, atol=1e-5, rtol=1e-5)
    # MQA teacher → 3 student heads: every student head is a copy of the one teacher head
    teacher = torch.randn(1, 1, 4, 8)
    torch.testing.assert_close(
        TeacherToStudentMap(Geom(1, 8), Geom(3, 8))(teacher), teacher.expand(1, 3, 4, 8)
    )


def test_fixed_map_narrows_dims_by_pca_of_teacher_samples():
    """Teacher values in a 4-dim subspace of 16 dims: PCA to D_s = 4 keeps every vector's norm, truncation
    (no samples) does not."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 4))[0].T  # (4, 16) orthonormal rows
    samples = torch.randn(500, 1, 4) @ basis  # (N, H_t=1, D_t=16)
    mapper = TeacherToStudentMap(Geom(1, 16), Geom(1, 4)).fit("values", samples)
    x = samples[:50].permute(1, 0, 2)[None]  # (1, 1, 50, 16)
    torch.testing.assert_close(mapper(x, which="values").norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-4)
    truncated = mapper(x, which="keys")  # keys untouched: first 4 dims
    torch.testing.assert_close(truncated, x[..., :4])
    weight, bias = fixed_teacher_to_student(1, 16, 1, 32)  # widening: teacher dims then zeros
    assert torch.equal(weight, torch.eye(32, 16)) and torch.equal(bias, torch.zeros(32))


def test_fit_teacher_to_student_recovers_known_linear_map():
    torch.manual_seed(0)
    N, H_t, D_t, H_s, D_s = 4000, 3, 8, 2, 6
    W = torch.randn(H_s * D_s, H_t * D_t) / 4  # (H_s·D_s, H_t·D_t)
    b = torch.randn(H_s * D_s)
    teacher = torch.randn(N, H_t, D_t) * 2 + 0.5
    student = (teacher.reshape(N, -1) @ W.T + b + 1e-3 * torch.randn(N, H_s * D_s)).reshape(N, H_s, D_s)
    weight, bias = fit_teacher_to_student(teacher, student, ridge=1e-6)
    torch.testing.assert_close(weight, W, atol=2e-3, rtol=0)
    torch.testing.assert_close(bias, b, atol=2e-3, rtol=0)
    # through the module: the fitted side maps teacher tokens onto the student's, the other side is untouched
    mapper = TeacherToStudentMap(Geom(H_t, D_t), Geom(H_s, D_s)).fit("keys", teacher, student, ridge=1e-6)
    pred = mapper(teacher[:20].permute(1, 0, 2)[None], which="keys")  # (1, H_s, 20, D_s)
    torch.testing.assert_close(pred, student[:20].permute(1, 0, 2)[None], atol=1e-2, rtol=0)
    assert torch.equal(mapper.value_weight, fixed_teacher_to_student(H_t, D_t, H_s, D_s)[0])


def test_fit_errors_quote_shapes():
    with pytest.raises(KvdistillError, match=r"got \(10, 2, 4\) and \(9, 1, 4\)"):
        fit_teacher_to_student(torch.randn(10, 2, 4), torch.randn(9, 1, 4))
    with pytest.raises(KvdistillError, match=r"student_kv must be \(N, 3, 64\) samples, got \(10, 1, 64\)"):
        TeacherToStudentMap(MQA_4_1, GQA_9_3).fit("keys", torch.randn(10, 1, 256), torch.randn(10, 1, 64))


# ------------------------------------------------------------------------------------------ THE COLLAPSE TEST
N_TOKENS = 512


def structured_teacher(H_t: int, D_t: int, seed: int = 0) -> torch.Tensor:
    """Teacher K/V (1, H_t, N, D_t) with structure: a low-rank signal over tokens, per-channel scales and
    small per-channel offsets, plus noise — varied over tokens, as real keys are."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(N_TOKENS, 6, generator=g)  # (N, r)
    mixing = torch.randn(6, H_t * D_t, generator=g) / 6**0.5
    scales = torch.rand(H_t * D_t, generator=g) * 1.5 + 0.5
    offsets = 0.2 * torch.randn(H_t * D_t, generator=g)
    flat = (latent @ mixing + 0.1 * torch.randn(N_TOKENS, H_t * D_t, generator=g)) * scales + offsets
    return flat.view(1, N_TOKENS, H_t, D_t).transpose(1, 2).contiguous()  # (1, H_t, N, D_t)


def kv_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """The training KV error of one sample (B = 1) laid out (1, H, N, D): `kvdistill.losses.kv_error` on its
    rows."""
    (p, m), (t, _) = as_rows(pred, mask), as_rows(target, mask)
    return kv_error(p, t, m, normalize=normalize)[0]


def constant_floor(teacher: torch.Tensor) -> float:
    """The lowest normalised kv_loss any token-constant prediction can reach: predict each channel's mean.
    kv_loss divides by the target's overall variance, so the floor is (mean per-channel variance) / (overall
    variance)."""
    per_channel = teacher.var(dim=2, unbiased=False).mean()
    return float(per_channel / teacher.var(unbiased=False))


def train_projector(
    student: torch.Tensor | nn.Parameter,
    teacher: torch.Tensor,
    proj: KVProjector,
    steps: int = 400,
    lr: float = 1e-2,
) -> float:
    """Adam on the projector (and on `student` when it is a Parameter) against the teacher-space loss:
    MSE normalised by the teacher's std, teacher K/V fixed (the default, loss-space objective)."""
    params = list(proj.parameters()) + ([student] if isinstance(student, nn.Parameter) else [])
    opt = torch.optim.Adam(params, lr=lr)
    mask = torch.ones(1, N_TOKENS)
    for _ in range(steps):
        loss = kv_loss(proj(student.expand(1, -1, N_TOKENS, -1), which="keys"), teacher, mask, normalize=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(
            kv_loss(proj(student.expand(1, -1, N_TOKENS, -1), which="keys"), teacher, mask, normalize=True)
        )


@pytest.mark.parametrize("kind", ["per_head", "linear"])
@pytest.mark.parametrize("student_kind", ["zeros", "learned_constant"])
def test_constant_student_cannot_collapse_the_teacher_space_loss(kind, student_kind):
    torch.manual_seed(0)
    student_geom, teacher_geom = Geom(4, 8), Geom(2, 16)
    teacher = structured_teacher(2, 16)
    floor = constant_floor(teacher)
    assert floor > 0.9  # the targets vary over tokens: a constant explains < 10% of their variance
    # the same K vector (zero) at every token; or a constant the student may choose, still the same at every
    # token
    zeros = student_kind == "zeros"
    student = torch.zeros(1, 4, 1, 8) if zeros else nn.Parameter(torch.randn(1, 4, 1, 8))
    final = train_projector(student, teacher, KVProjector(student_geom, teacher_geom, kind=kind))
    assert final >= floor - 1e-4  # no map turns a constant into a varying signal ...
    assert final > 0.9  # ... so the normalised loss stays near 1, far from ~0


@pytest.mark.parametrize("kind", ["per_head", "linear"])
def test_informative_student_drives_the_teacher_space_loss_near_zero(kind):
    """The same training reaches ~0 when the student carries the teacher's information (an invertible linear
    function of it): the projector is able to fit, so the constant student's high loss is not a failure to
    train."""
    torch.manual_seed(0)
    H_t, D_t = 2, 16
    teacher = structured_teacher(H_t, D_t)  # (1, H_t, N, D_t)
    g = torch.Generator().manual_seed(1)
    if kind == "per_head":  # student head s is an invertible function of teacher head s // 2 (GQA-like split)
        H_s, D_s = 4, 16
        maps = [
            torch.linalg.qr(torch.randn(D_t, D_t, generator=g))[0] * (0.5 + torch.rand(D_t, generator=g))
            for _ in range(H_s)
        ]
        student = torch.stack([teacher[0, s // 2] @ maps[s] for s in range(H_s)])[None]  # (1, H_s, N, D_s)
    else:  # any invertible mixing of all teacher channels, into a different (H, D) split
        H_s, D_s = 4, 8
        mixing = torch.linalg.qr(torch.randn(H_t * D_t, H_t * D_t, generator=g))[0]
        mixing = mixing * (0.5 + torch.rand(H_t * D_t, generator=g))
        flat = teacher.transpose(1, 2).reshape(N_TOKENS, H_t * D_t) @ mixing  # (N, H_s·D_s)
        student = flat.view(1, N_TOKENS, H_s, D_s).transpose(1, 2)  # (1, H_s, N, D_s)
    final = train_projector(student, teacher, KVProjector(Geom(H_s, D_s), Geom(H_t, D_t), kind=kind))
    assert final < 0.05


def test_student_space_loss_with_a_trainable_teacher_map_collapses():
    """Why TeacherToStudentMap is frozen: compare in the STUDENT space with a learnable teacher → student map
    A and the loss ||K_s - A(K_t)||² reaches ~0 with a constant student — A learns to output that constant
    (weights → 0), erasing the teacher. With A frozen, the same constant student is stuck near the
    variance."""
    torch.manual_seed(0)
    teacher = structured_teacher(2, 16)[0].transpose(0, 1).reshape(N_TOKENS, 32)  # (N, H_t·D_t)
    constant = nn.Parameter(torch.randn(32))  # a student that says the same thing at every token
    learnable = nn.Linear(32, 32)  # teacher → student, trainable (the mistake)
    opt = torch.optim.Adam([constant, *learnable.parameters()], lr=1e-2)
    with torch.no_grad():
        start = float((constant - learnable(teacher)).square().mean())
    for _ in range(400):
        loss = (constant - learnable(teacher)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * start  # collapsed: loss ~0, yet the student carries no information

    mapper = TeacherToStudentMap(Geom(2, 16), Geom(2, 16))  # frozen: identity for equal geometries
    target = mapper(teacher.view(1, N_TOKENS, 2, 16).transpose(1, 2))  # (1, H_s, N, D_s)
    student = nn.Parameter(torch.zeros(1, 2, 1, 16))
    opt = torch.optim.Adam([student], lr=5e-2)
    mask = torch.ones(1, N_TOKENS)
    for _ in range(300):
        loss = kv_loss(student.expand(1, 2, N_TOKENS, 16), target, mask, normalize=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() > 0.9


@pytest.mark.parametrize("kind", ["per_head", "linear", "identity"])
def test_project_pair_equals_forward_of_keys_and_values(kind):
    student, teacher = (GQA_9_3, MQA_4_1) if kind != "identity" else (GQA_9_3, GQA_9_3)
    proj = KVProjector(student, teacher, kind=kind)
    with torch.no_grad():
        for p in proj.parameters():
            p.add_(0.1 * torch.randn_like(p))  # key and value maps differ
    k, v = torch.randn(2, 3, 5, 64), torch.randn(2, 3, 5, 64)
    pair = proj.project_pair(k, v)  # (2, B, T, H_t·D_t)
    for got, x, which in ((pair[0], k, "keys"), (pair[1], v, "values")):
        ref = proj(x, which=which)  # (B, H_t, T, D_t)
        torch.testing.assert_close(got, ref.transpose(1, 2).reshape(got.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["per_head", "linear", "identity"])
def test_project_layers_equals_forward_of_each_layer(kind):
    """Three layers' projectors stacked into one matmul give each layer's own maps, values and gradients."""
    from kvdistill.align.heads import project_layers

    student, teacher = (GQA_9_3, MQA_4_1) if kind != "identity" else (GQA_9_3, GQA_9_3)
    projs = [KVProjector(student, teacher, kind=kind) for _ in range(3)]
    with torch.no_grad():
        for p in (p for proj in projs for p in proj.parameters()):
            p.add_(0.1 * torch.randn_like(p))  # layers, keys and values differ
    ks = [
        torch.randn(2, 5, 3, 64).transpose(1, 2).requires_grad_() for _ in range(3)
    ]  # (B, H_s, T, D_s) views
    vs = [torch.randn(2, 3, 5, 64, requires_grad=True) for _ in range(3)]
    got = project_layers(projs, ks, vs)  # (L, 2, B, T, H_t·D_t)
    assert got.shape == (3, 2, 2, 5, teacher.num_kv_heads * teacher.head_dim)
    ref = torch.stack(
        [
            torch.stack([p(k, which="keys"), p(v, which="values")])
            for p, k, v in zip(projs, ks, vs, strict=True)
        ]
    )
    ref = ref.transpose(3, 4).reshape(got.shape)  # (L, 2, B, T, H_t·D_t)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(got)
    leaves = [*ks, *vs, *(p for proj in projs for p in proj.parameters())]
    for g, r in zip(
        torch.autograd.grad((got * weights).sum(), leaves),
        torch.autograd.grad((ref * weights).sum(), leaves),
        strict=True,
    ):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    with pytest.raises(KvdistillError, match="one projector per layer"):
        project_layers([*projs, KVProjector(student, GQA_9_3, kind="linear")], [*ks, ks[0]], [*vs, vs[0]])
