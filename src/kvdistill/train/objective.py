"""The distillation objective: student forward, every teacher's K/V, alignment, maps, fusion, losses.

Notation: B batch, N teachers, L_s/L_t layers, H_s/H_t KV heads, D_s/D_t head dims, T_s student tokens,
M kept teacher tokens of a layer (T_t when uncompressed).

Loss space (default, collapse-safe): the student's K/V of layer i are mapped into teacher n's geometry by a
learnable projector P_ni and resampled onto the teacher's (kept) tokens through the character alignment
A (B, H_t, M, T_s) (rows: teacher tokens, normalised over the student tokens they overlap):

    pred = A · P_ni(K_s[i])                      (B, H_t, M, D_t)
    l_n(b) = Σ_i Σ_j W_n[i, j] · err(pred, K_t[j]) / #mapped layers      (W_n: layer map, rows sum to 1)
    loss_kd = mean_b Σ_n w_n(b) · l_n(b)                                  (w: fusion weights)

err is a per-sample mean over kept, covered teacher tokens, optionally divided by that sample's target
variance, so layers and teachers of different scales weigh alike and the loss does not depend on how samples
are grouped into batches. A constant student cannot reach a low loss whatever P learns (P maps a constant to a
constant), which is why the maps run student → teacher. Target space (`fusion.space: target`) instead fuses
teacher K/V into the student's geometry with frozen maps and compares there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvdistill import losses as L
from kvdistill.align.heads import KVProjector, TeacherToStudentMap, project_layers
from kvdistill.align.layers import layer_map
from kvdistill.align.plan import alignment_plan
from kvdistill.align.tokens import batch_token_alignment, batch_token_alignment_sparse, resample_rows
from kvdistill.config import RunConfig
from kvdistill.errors import KvdistillError
from kvdistill.fuse import Router, entropy_regularizer, fixed_weights, prototype
from kvdistill.fuse.latent import LatentSpace, kv_features
from kvdistill.models.capture import forward_kv, tokenize
from kvdistill.models.geometry import geometry_of
from kvdistill.teachers import TeacherKV
from kvdistill.train.student import build_student, save_student, unwrap_student


# ------------------------------------------------------------------------------------------ per-sample losses
def sample_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of err (B, ...) over the elements where mask (broadcastable to err) is 1, per sample -> (B,).

    A sample with nothing counted gets 0.
    """
    mask = mask.to(err.dtype).expand_as(err)
    dims = tuple(range(1, err.dim()))
    return (err * mask).sum(dims) / mask.sum(dims).clamp(min=1.0)


def kv_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, kind: str = "mse",
             normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample KV error (B,) between pred and target (B, H, M, D) over mask (B, H, M) or (B, M).

    normalize: divide by the variance (smooth-L1: the std) of the sample's counted target values (detached).
    """
    if pred.shape != target.shape:
        raise KvdistillError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ",
                             "map the student K/V into the teacher's geometry first")
    B, H, M, D = pred.shape
    if mask.dim() == 2:  # one mask for every head: (B, M, H·D) rows
        pred, target = pred.transpose(1, 2).reshape(B, M, H * D), target.transpose(1, 2).reshape(B, M, H * D)
    else:  # a mask per head: (B, H·M, D) rows
        pred, target, mask = pred.reshape(B, H * M, D), target.reshape(B, H * M, D), mask.reshape(B, H * M)
    return kv_errors(pred[None], target[None], mask, kind=kind, normalize=normalize, eps=eps)[0]


def kv_errors(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, kind: str = "mse",
              normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """`kv_error` of many tensors at once (e.g. layer pairs × keys and values) laid out as rows: pred, target
    (..., B, N, F) over mask broadcastable to (..., B, N) (1 = the row counts) -> (..., B): per sample, the mean
    over counted rows and their F features.

    The difference is taken in the inputs' dtype and only it is squared and reduced in float32 (no float32 copy
    of pred or target is kept for backward); the target's variance (no gradient) is reduced in float32.
    """
    m = mask.float()[..., None]  # (..., B, N, 1)
    count = (m.sum((-2, -1)) * target.shape[-1]).clamp(min=1.0)  # (..., B)
    diff = (pred - target).float()  # (..., B, N, F)
    err = diff.square() if kind == "mse" else torch.nn.functional.smooth_l1_loss(
        diff, torch.zeros_like(diff), reduction="none")
    out = (err * m).sum((-2, -1)) / count  # (..., B)
    if not normalize:
        return out
    with torch.no_grad():
        mean = (target * m).sum((-2, -1)) / count  # (..., B), float32 by promotion
        var = ((target - mean[..., None, None]).square() * m).sum((-2, -1)) / count  # (..., B)
    return out / ((var + eps) if kind == "mse" else (var + eps).sqrt())


def ce_per_sample(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token CE per sample (B,): logits[:, t] predicts labels[:, t+1] where both tokens are real.

    Every position is scored against the next label (the last one against a wrapped label, then masked out), so
    the (B, T, V) logits are not sliced: no extra (B, T, V) copy forward and no zero-filled one in backward.
    """
    B, T, V = logits.shape
    following = labels.roll(-1, dims=1)  # (B, T) the label each position predicts; [:, -1] is masked below
    nll = torch.nn.functional.cross_entropy(logits.reshape(B * T, V).float(), following.reshape(B * T),
                                            reduction="none").view(B, T)  # (B, T)
    counted = mask * mask.roll(-1, dims=1)  # (B, T)
    counted[:, -1] = 0
    return sample_mean(nll, counted)


# ------------------------------------------------------------------------------------------ alignment helper
def teacher_alignment(spans_t: torch.Tensor, mask_t: torch.Tensor, spans_s: torch.Tensor,
                      mask_s: torch.Tensor) -> torch.Tensor:
    """Rows = teacher tokens, normalised over overlapping student tokens.

    spans_t (B, M, 2) / mask_t (B, M) -> (B, M, T_s); or per head (B, H, M, 2) / (B, H, M) -> (B, H, M, T_s).
    """
    if spans_t.dim() == 3:
        return batch_token_alignment(spans_t, mask_t, spans_s, mask_s)
    B, H, M, _ = spans_t.shape
    T_s = spans_s.shape[1]
    flat = batch_token_alignment(spans_t.reshape(B * H, M, 2), mask_t.reshape(B * H, M),
                                 spans_s.repeat_interleave(H, 0), mask_s.repeat_interleave(H, 0))
    return flat.view(B, H, M, T_s)


def teacher_alignment_sparse(spans_t: torch.Tensor, mask_t: torch.Tensor, spans_s: torch.Tensor,
                             mask_s: torch.Tensor, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`teacher_alignment` as index, weight (B, H|1, M, K) for `resample_rows`.

    Computed on the CPU (the spans are small and the sweep is many tiny ops with host syncs), the result moved to
    `device` (default: mask_s's) once; pass CPU spans and masks to avoid a device-to-host copy.
    """
    device = device or mask_s.device
    spans_t, mask_t, spans_s, mask_s = spans_t.cpu(), mask_t.cpu(), spans_s.cpu(), mask_s.cpu()
    if spans_t.dim() == 3:
        index, weight = batch_token_alignment_sparse(spans_t, mask_t, spans_s, mask_s)  # (B, M, K)
        return index[:, None].to(device, non_blocking=True), weight[:, None].to(device, non_blocking=True)
    B, H, M, _ = spans_t.shape
    index, weight = batch_token_alignment_sparse(spans_t.reshape(B * H, M, 2), mask_t.reshape(B * H, M),
                                                 spans_s.repeat_interleave(H, 0), mask_s.repeat_interleave(H, 0))
    K = index.shape[-1]
    return index.view(B, H, M, K).to(device, non_blocking=True), weight.view(B, H, M, K).to(device, non_blocking=True)


def _read_metrics(metrics: dict[str, torch.Tensor], mask_cpu: torch.Tensor) -> dict[str, float]:
    """Scalar metric tensors as floats, read from the device in one transfer; `tokens` from the CPU mask."""
    names = list(metrics)
    values = torch.stack([metrics[k].float().reshape(()) for k in names]).tolist() if names else []
    return {"tokens": float(mask_cpu.sum()), **dict(zip(names, values, strict=True))}


class _LayerPairs:
    """The (student layer i, teacher layer j, weight w) pairs of one teacher's layer map, flattened in map order
    (an interpolated student layer gives one pair per teacher layer it reads), with what the batched loss needs.

    layers: the mapped student layers (each once, ascending); at: per pair, the position of its i in `layers`
    (None when the pairs are exactly `layers`); coef (P, 2): w·kv.keys, w·kv.values; weight (P,): w.
    """

    def __init__(self, i, j, w, layers, at_list, coef, weight, device):
        self.i, self.j, self.w, self.layers, self.coef, self.weight = i, j, w, layers, coef, weight
        self.at_list = at_list
        self.at = None if at_list == list(range(len(layers))) else torch.tensor(at_list, device=device)

    def layer_positions(self, pos: list[int], device) -> torch.Tensor | None:
        """Position in `layers` of the student layer of each pair in `pos` (ascending), None when it is 0..L-1."""
        at = [self.at_list[p] for p in pos]
        if at == list(range(len(self.layers))):
            return None
        return self.at.to(device) if len(pos) == len(self.i) else torch.tensor(at, device=device)

    @classmethod
    def of(cls, pairs: list[tuple[int, list[tuple[int, float]]]], kv, device) -> _LayerPairs:
        flat = [(i, j, w) for i, row in pairs for j, w in row]
        i, j, w = ([p[k] for p in flat] for k in range(3))
        layers = [i for i, _ in pairs]
        coef = torch.tensor([[x * kv.keys, x * kv.values] for x in w], dtype=torch.float32, device=device)
        return cls(i, j, w, layers, [layers.index(x) for x in i], coef,
                   torch.tensor(w, dtype=torch.float32, device=device), device)


# ------------------------------------------------------------------------------------------ the objective
class Objective(nn.Module):
    def __init__(self, cfg: RunConfig, student: nn.Module, tokenizer, teachers: list, device):
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.tokenizer = tokenizer
        self.teachers = teachers  # plain list: frozen, not part of the trained / checkpointed module
        self.student_geometry = geometry_of(unwrap_student(student), name=str(cfg.student.model or "student"))
        sg = self.student_geometry
        self.layer_maps: dict[str, torch.Tensor] = {}
        self._pairs: dict[str, list[tuple[int, list[tuple[int, float]]]]] = {}
        self._layer_pairs: dict[str, _LayerPairs] = {}  # the same pairs flattened, for the batched KV loss
        self.projectors = nn.ModuleDict()
        self.to_student = nn.ModuleDict()
        self.hidden_proj = nn.ModuleDict()
        target_space = cfg.fusion.space == "target"
        latent_space = cfg.fusion.space == "latent"
        latent_dims: dict[str, dict[int, int]] = {}
        for tcfg, teacher in zip(cfg.teachers, teachers, strict=True):
            lm = tcfg.layer_map
            matrix = layer_map(sg.num_layers, teacher.geometry.num_layers, strategy=lm.strategy,
                               explicit=lm.explicit, interpolate=lm.interpolate)  # (L_s, L_t)
            self.layer_maps[teacher.name] = matrix
            # (student layer, [(teacher layer, weight), ...]) of every mapped student layer, as Python numbers
            self._pairs[teacher.name] = [(i, [(j, float(matrix[i, j])) for j in matrix[i].nonzero().flatten().tolist()])
                                         for i in range(sg.num_layers) if matrix[i].sum() > 0]
            self._layer_pairs[teacher.name] = _LayerPairs.of(self._pairs[teacher.name], cfg.losses.kv, device)
            missing = sorted({int(j) for j in matrix.nonzero()[:, 1]} - set(teacher.layers))
            if missing:
                raise KvdistillError(f"teacher '{teacher.name}' lacks layers {missing} that the layer map uses",
                                     "re-extract the cache with those layers, or change layers.layer_map")
            mapped = [i for i in range(sg.num_layers) if matrix[i].sum() > 0]
            if target_space:
                self.to_student[teacher.name] = TeacherToStudentMap(teacher.geometry, sg)
            elif latent_space:
                tg = teacher.geometry
                latent_dims[teacher.name] = dict.fromkeys(mapped, 2 * tg.num_kv_heads * tg.head_dim)
            else:
                self.projectors[teacher.name] = nn.ModuleDict(
                    {str(i): KVProjector(sg, teacher.geometry, kind=tcfg.projector) for i in mapped})
            if cfg.losses.hidden > 0:
                self.hidden_proj[teacher.name] = nn.Linear(sg.hidden_size, teacher.geometry.hidden_size, bias=False)
        self.latent = None
        self.latent_heads = nn.ModuleDict()
        if latent_space:
            self.latent = LatentSpace(latent_dims, cfg.fusion.latent.dim)
            for i in sorted({i for layers in latent_dims.values() for i in layers}):
                self.latent_heads[str(i)] = nn.Linear(2 * sg.num_kv_heads * sg.head_dim, cfg.fusion.latent.dim)
        n = len(teachers)
        weights = cfg.fusion.weights or [t.weight for t in cfg.teachers]
        self.register_buffer("fixed", fixed_weights(weights) if n else torch.zeros(0), persistent=False)
        self.router = None
        if cfg.fusion.kind == "router":
            self.router = Router(sg.hidden_size, n, kind=cfg.fusion.router.kind, per_token=False)
        if cfg.losses.logit_kd.weight > 0:
            for teacher in teachers:
                if teacher.geometry.vocab_size != sg.vocab_size or teacher.tokenizer.get_vocab() != tokenizer.get_vocab():
                    raise KvdistillError(
                        f"losses.logit_kd needs the student and teacher '{teacher.name}' to share a vocabulary",
                        "set losses.logit_kd.weight: 0 for cross-tokenizer teachers (KV losses align by characters)")
        self.to(device)
        for teacher in teachers:
            teacher.to(device)

    # -------------------------------------------------------------------------------------- helpers
    def _student_batch(self, records):
        """ids, mask (B, T_s), spans (B, T_s, 2) on the objective's device."""
        return self._student_inputs(records)[0]

    def _student_inputs(self, records):
        """(ids, mask, spans) on the objective's device, and (spans, mask) on the CPU for the token alignment."""
        texts = [r["text"] for r in records]
        enc = tokenize(self.tokenizer, texts, max_length=self.cfg.data.max_length, padding_side="right",
                       max_positions=self.student_geometry.max_positions)
        dev = self.fixed.device
        spans, mask = enc["offset_mapping"], enc["attention_mask"]
        return (enc["input_ids"].to(dev), mask.to(dev), spans.to(dev)), (spans, mask)

    def _needs(self):
        c = self.cfg.losses
        return dict(hidden_states=c.hidden > 0, logits=c.logit_kd.weight > 0, attentions=c.attention_kl > 0)

    def fusion_weights(self, student_hidden: torch.Tensor | None, mask: torch.Tensor,
                       teacher_kv: list[TeacherKV], preds: dict) -> torch.Tensor:
        """(B, N) weights over teachers for each sample."""
        B = mask.shape[0]
        kind = self.cfg.fusion.kind
        if kind == "fixed":
            return self.fixed[None].expand(B, -1)
        if kind == "router":
            return self.router(student_hidden.detach().float(), mask)
        # similarity: cosine (or dot / -l2) between the student's pooled, projected keys and the teacher's
        # pooled keys on the same (deepest mapped) layer, softmax over teachers with a temperature
        sim = self.cfg.fusion.similarity
        scores = []
        for n, _teacher in enumerate(self.teachers):
            pred, target, m = preds[n]  # (B, H, M, D) each, m (B, H, M)
            m2 = m.amax(1) if m.dim() == 3 else m  # (B, M)
            q = prototype(pred.detach().transpose(1, 2).flatten(2), m2, kind=sim.prototype if sim.prototype != "kmeans" else "mean")
            p = prototype(target.transpose(1, 2).flatten(2).float(), m2,
                          kind=sim.prototype if sim.prototype != "kmeans" else "mean")
            if sim.metric == "cosine":
                s = torch.nn.functional.cosine_similarity(q, p, dim=-1)
            elif sim.metric == "dot":
                s = (q * p).sum(-1) / math.sqrt(q.shape[-1])
            else:
                s = -(q - p).square().sum(-1) / q.shape[-1]
            scores.append(s)
        return torch.softmax(torch.stack(scores, -1) / sim.temperature, dim=-1)  # (B, N)

    # -------------------------------------------------------------------------------------- forward
    def forward(self, records: list[dict]):
        cfg = self.cfg
        (ids, mask, spans_s), (spans_cpu, mask_cpu) = self._student_inputs(records)  # (B, T_s), (B, T_s), (B, T_s, 2)
        needs = self._needs()
        want_hidden = needs["hidden_states"] or self.router is not None
        s = forward_kv(self.student, ids, mask, geometry=self.student_geometry, logits=True,
                       hidden_states=want_hidden, attentions=needs["attentions"])
        # metrics are kept as tensors and read in one transfer at the end (no host sync inside the step)
        metrics: dict[str, torch.Tensor] = {}
        ce = ce_per_sample(s.logits, ids, mask)  # (B,)
        total = cfg.losses.ce * ce.mean()
        metrics["loss/ce"] = ce.detach().mean()
        if not self.teachers:
            metrics["loss"] = total.detach()
            return total, _read_metrics(metrics, mask_cpu)

        per_teacher = []  # (B,) KD loss of each teacher
        deepest = {}
        for n, teacher in enumerate(self.teachers):
            tkv = teacher.kv(records, max_length=cfg.data.max_length, **needs)
            if cfg.fusion.space in ("target", "latent"):
                per_teacher.append(None)
                deepest[n] = tkv
                continue
            loss_n, deepest[n], terms = self._teacher_loss(teacher, tkv, s, mask, spans_s,
                                                             (spans_cpu, mask_cpu))
            per_teacher.append(loss_n)
            for key, value in terms.items():
                metrics[f"loss/{key}/{teacher.name}"] = value
        hidden_last = s.hidden_states[-1] if want_hidden else None
        if cfg.fusion.space == "latent":
            per_teacher, preds = [], {}
            for n, teacher in enumerate(self.teachers):
                loss_n, preds[n] = self._latent_loss(teacher, deepest[n], s, mask, spans_s)
                per_teacher.append(loss_n)
                metrics[f"loss/latent/{teacher.name}"] = loss_n.detach().mean()
            weights = self.fusion_weights(hidden_last, mask, [], preds)  # (B, N)
            kd = (weights * torch.stack(per_teacher, -1)).sum(-1)  # (B,)
        elif cfg.fusion.space == "target":
            kd = self._target_space_loss(s, mask, spans_s, deepest, hidden_last)
            weights = self._last_weights
        else:
            weights = self.fusion_weights(hidden_last, mask, [], deepest)  # (B, N)
            kd = (weights * torch.stack(per_teacher, -1)).sum(-1)  # (B,)
        total = total + kd.mean()
        if self.router is not None and cfg.fusion.entropy.weight > 0:
            ent = entropy_regularizer(weights, target=cfg.fusion.entropy.target)
            total = total + cfg.fusion.entropy.weight * ent
            metrics["loss/entropy"] = ent.detach()
        for n, teacher in enumerate(self.teachers):
            metrics[f"weight/{teacher.name}"] = weights[:, n].detach().mean()
        metrics["loss/kd"] = kd.detach().mean()
        metrics["loss"] = total.detach()
        return total, _read_metrics(metrics, mask_cpu)

    def _teacher_loss(self, teacher, tkv: TeacherKV, s, mask_s, spans_s, student_cpu):
        """Per-sample loss (B,) of one teacher, the deepest layer's (pred, target, mask), term metrics (tensors).

        Batched over the layer pairs (i, j, w) of the teacher's map: the student K and V of every mapped layer are
        projected in one matmul (`project_layers`), resampled onto the teacher's tokens with the sparse alignment
        in one gather (`resample_rows`, student dtype; per-head alignments of the teacher layers are stacked),
        compared with the stacked teacher K/V in one reduction (`kv_errors`: (P, 2, B)) and weighed by w.
        Relation / attention-KL / hidden terms are per pair.
        """
        cfg = self.cfg.losses
        kv = cfg.kv
        dev = mask_s.device
        B = mask_s.shape[0]
        total = torch.zeros(B, device=dev)
        terms: dict[str, torch.Tensor] = {}
        lp = self._layer_pairs[teacher.name]
        pairs = self._pairs[teacher.name]
        aligned: dict[int, tuple] = {}  # alignment key -> (index, weight (B, H|1, M, K), covered (B, [H_t,] M))

        def key_of(j: int) -> int:  # uncompressed teachers share the spans of every layer
            return -1 if tkv.shared_spans else id(tkv.spans[j])

        for j in lp.j:
            key = key_of(j)
            if key not in aligned:
                index, weight = teacher_alignment_sparse(*tkv.host_spans(j), *student_cpu,
                                                         device=dev)  # (B, H|1, M, K)
                hit = weight.sum(-1) > 0  # (B, H|1, M) teacher tokens that overlap a student token
                shared = tkv.mask[j].dim() == 2
                covered = (hit[:, 0] if shared else hit).long() * tkv.mask[j].to(dev)  # (B, M) or (B, H_t, M)
                aligned[key] = (index[:, 0] if shared else index, weight[:, 0] if shared else weight, covered)
        # student K and V of every mapped layer in the teacher's geometry: (L, 2, B, T_s, H_t·D_t)
        projectors = self.projectors[teacher.name]
        proj = project_layers([projectors[str(i)] for i in lp.layers], [s.keys[i] for i in lp.layers],
                              [s.values[i] for i in lp.layers])
        _, H_t, _, D_t = tkv.keys[lp.j[0]].shape
        groups = self._pair_groups(tkv, lp, aligned, key_of)
        deepest = None
        for pos, (index, weight, covered) in groups:
            # pos: positions of this group's pairs in lp; index, weight (B, M, K) shared or (P_g, B, H_t, M, K)
            P = len(pos)
            at = lp.layer_positions(pos, dev)  # (P,) pair -> its student layer in proj, None: the identity
            targets = [tkv.keys[j].to(dev) if g == 0 else tkv.values[j].to(dev) for j in (lp.j[p] for p in pos)
                       for g in (0, 1)]
            if covered.dim() == 2:  # shared spans: rows are teacher tokens, features H_t·D_t
                pred = resample_rows(proj, index, weight)  # (L, 2, B, M, H_t·D_t)
                pred = pred if at is None else pred.index_select(0, at)  # (P, 2, B, M, H_t·D_t)
                M = pred.shape[3]
                target = torch.stack([t.transpose(1, 2) for t in targets]).view(P, 2, B, M, H_t * D_t)
                rows_mask = covered  # (B, M)
                k_pred = pred[:, 0].view(P, B, M, H_t, D_t)  # (P, B, M, H_t, D_t)
                k_t = target[:, 0].view(P, B, M, H_t, D_t)
                cos_mask = covered[:, :, None]  # (B, M, 1)
            else:  # kept tokens differ per head: rows are (head, token), features D_t
                x = proj if at is None else proj.index_select(0, at)  # (P, 2, B, T_s, H_t·D_t)
                x = x.view(P, 2, B, -1, H_t, D_t).transpose(3, 4)  # (P, 2, B, H_t, T_s, D_t)
                pred = resample_rows(x, index[:, None], weight[:, None])  # (P, 2, B, H_t, M, D_t)
                M = pred.shape[4]
                target = torch.stack(targets).view(P, 2, B, H_t, M, D_t)
                k_pred, k_t, cos_mask = pred[:, 0], target[:, 0], covered  # (P, B, H_t, M, D_t), (P, B, H_t, M)
                pred, target = pred.reshape(P, 2, B, H_t * M, D_t), target.reshape(P, 2, B, H_t * M, D_t)
                rows_mask = covered.view(P, 1, B, H_t * M)
            if kv.weight > 0:
                coef = (lp.coef if len(lp.j) == P else lp.coef[pos]).to(dev)  # (P, 2), a no-op on its device
                err = kv_errors(pred, target, rows_mask, kind=kv.kind, normalize=kv.normalize)  # (P, 2, B)
                err = (coef[:, :, None] * err).sum((0, 1))  # (B,)
                terms["kv"] = terms["kv"] + err if "kv" in terms else err
            if cfg.cosine > 0:
                cos = 1 - torch.nn.functional.cosine_similarity(k_pred.float(), k_t.float(), dim=-1)  # (P, B, ...)
                m = cos_mask.to(cos.dtype).expand_as(cos)
                cos = (cos * m).sum((-2, -1)) / m.sum((-2, -1)).clamp(min=1.0)  # (P, B)
                w = (lp.weight if len(lp.j) == P else lp.weight[pos]).to(dev)  # (P,)
                cos = (w[:, None] * cos).sum(0)  # (B,)
                terms["cosine"] = terms["cosine"] + cos if "cosine" in terms else cos
            if pos[-1] == len(lp.j) - 1:  # the last pair: the deepest (pred, target, mask)
                last = k_pred[-1]  # (B, M, H_t, D_t) or (B, H_t, M, D_t)
                deepest = ((last.transpose(1, 2) if covered.dim() == 2 else last), tkv.keys[lp.j[-1]].to(dev),
                           covered if covered.dim() == 2 else covered[-1])
        if cfg.relation > 0 or cfg.attention_kl > 0 or cfg.hidden > 0:
            dense: dict[int, torch.Tensor] = {}  # alignment key -> dense A
            for i, j, w in zip(lp.i, lp.j, lp.w, strict=True):
                key = key_of(j)
                if key not in dense:
                    dense[key] = teacher_alignment(tkv.spans[j], tkv.mask[j], spans_s, mask_s)
                self._extra_terms(terms, w, i, j, s, tkv, dense[key], aligned[key][2], teacher)
        scale = {"kv": kv.weight, "cosine": cfg.cosine, "relation": cfg.relation,
                 "attention_kl": cfg.attention_kl, "hidden": cfg.hidden}
        metrics = {}
        for name, value in terms.items():
            total = total + scale[name] * value / len(pairs)
            metrics[name] = value.detach().mean() / len(pairs)
        if cfg.logit_kd.weight > 0:
            kd = self._logit_kd(s, tkv, mask_s)
            total = total + cfg.logit_kd.weight * kd
            metrics["logit_kd"] = kd.detach().mean()
        return total, deepest, metrics

    @staticmethod
    def _pair_groups(tkv: TeacherKV, lp: _LayerPairs, aligned: dict, key_of) -> list[tuple[list[int], tuple]]:
        """The layer pairs of `lp` grouped for one resample each: [(positions in lp, (index, weight, covered))].

        Pairs whose teacher layer has one alignment for all heads (index (B, M, K)) group by that alignment (all
        pairs of an uncompressed teacher); per-head alignments (B, H_t, M, K) of pairs with the same M are stacked
        into (P_g, B, H_t, M, K), K padded with zero weights, covered (P_g, B, H_t, M).
        """
        shared: dict[int, list[int]] = {}
        per_head: dict[int, list[int]] = {}
        for p, j in enumerate(lp.j):
            index = aligned[key_of(j)][0]
            if index.dim() == 3:
                shared.setdefault(key_of(j), []).append(p)
            else:
                per_head.setdefault(index.shape[2], []).append(p)
        groups = [(pos, aligned[key]) for key, pos in shared.items()]
        for pos in per_head.values():
            al = [aligned[key_of(lp.j[p])] for p in pos]
            K = max(a[0].shape[-1] for a in al)

            def pad(x, K=K):  # (B, H_t, M, k) -> (B, H_t, M, K) with zeros
                return x if x.shape[-1] == K else torch.nn.functional.pad(x, (0, K - x.shape[-1]))

            groups.append((pos, (torch.stack([pad(a[0]) for a in al]), torch.stack([pad(a[1]) for a in al]),
                                 torch.stack([a[2] for a in al]))))
        return groups

    def _extra_terms(self, terms, w, i, j, s, tkv: TeacherKV, A, covered, teacher):
        """Relation, attention-KL and hidden-state terms (online, uncompressed teachers: shared spans)."""
        cfg = self.cfg.losses
        if A.dim() != 3 or tkv.capture is None:
            raise KvdistillError(f"relation / attention_kl / hidden losses need teacher '{teacher.name}' online and "
                                 "uncompressed", "set those loss weights to 0 for cached or compressed teachers")
        B = A.shape[0]
        cap = tkv.capture
        if cfg.relation > 0:
            k_on_t = torch.einsum("bmt,bhtd->bhmd", A.float(), s.keys[i].float())  # student keys on teacher tokens
            vals = [L.relation_loss(k_on_t[b : b + 1], tkv.keys[j][b : b + 1].float(), covered[b : b + 1])
                    for b in range(B)]
            terms["relation"] = terms.get("relation", 0) + w * torch.stack(vals)
        if cfg.attention_kl > 0:
            # teacher attention (M x M) moved onto the student grid: A^T P A, rows renormalised
            vals = []
            for b in range(B):
                At = A[b].float()  # (M, T_s)
                p_t = cap.attentions[j][b].float()  # (H_t, M, M)
                p_on_s = torch.einsum("mt,hmn,nu->htu", At, p_t, At)  # (H_t, T_s, T_s)
                p_on_s = p_on_s / p_on_s.sum(-1, keepdim=True).clamp(min=1e-9)
                ms = (At.sum(0) > 0).long()[None]  # (1, T_s) student tokens covered by the teacher
                vals.append(L.attention_kl(s.attentions[i][b : b + 1].float(), p_on_s[None], ms))
            terms["attention_kl"] = terms.get("attention_kl", 0) + w * torch.stack(vals)
        if cfg.hidden > 0:
            h_s = self.hidden_proj[teacher.name](s.hidden_states[i + 1].float())  # (B, T_s, H_t)
            h_pred = torch.einsum("bmt,bth->bmh", A.float(), h_s)  # (B, M, H_t)
            h_t = cap.hidden_states[j + 1].float()
            err = kv_error(h_pred[:, None], h_t[:, None], covered, normalize=True)
            terms["hidden"] = terms.get("hidden", 0) + w * err

    def _logit_kd(self, s, tkv: TeacherKV, mask):
        t_logits = tkv.capture.logits
        if t_logits.shape != s.logits.shape:
            raise KvdistillError(f"student logits {tuple(s.logits.shape)} and teacher logits "
                                 f"{tuple(t_logits.shape)} differ", "logit KD needs the same tokenizer")
        T = self.cfg.losses.logit_kd.temperature
        log_s = torch.log_softmax(s.logits.float() / T, -1)
        log_t = torch.log_softmax(t_logits.float() / T, -1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1) * T * T  # (B, T)
        return sample_mean(kl, mask)

    def _target_space_loss(self, s, mask_s, spans_s, tkvs: dict[int, TeacherKV], hidden_last):
        """Fuse teacher K/V into the student's geometry with frozen maps; per-sample error to the student."""
        kv = self.cfg.losses.kv
        B = mask_s.shape[0]
        L_s = self.student_geometry.num_layers
        total = torch.zeros(B, device=mask_s.device)
        weights = self.fusion_weights(hidden_last, mask_s, [], None) if self.cfg.fusion.kind != "similarity" else None
        if weights is None:
            weights = self.fixed[None].expand(B, -1)
        self._last_weights = weights
        count = 0
        for i in range(L_s):
            fused_k = fused_v = None
            cover = torch.zeros_like(mask_s, dtype=torch.float)
            for n, teacher in enumerate(self.teachers):
                tkv = tkvs[n]
                row = self.layer_maps[teacher.name][i]
                if row.sum() == 0 or not tkv.shared_spans:
                    continue
                j_list = row.nonzero().flatten().tolist()
                A = batch_token_alignment(spans_s, mask_s, tkv.spans[j_list[0]], tkv.mask[j_list[0]])  # (B,T_s,M)
                k = sum(float(row[j]) * tkv.keys[j].float() for j in j_list)
                v = sum(float(row[j]) * tkv.values[j].float() for j in j_list)
                mapper = self.to_student[teacher.name]
                k_on_s = mapper(torch.einsum("btm,bhmd->bhtd", A.float(), k), which="keys")  # (B, H_s, T_s, D_s)
                v_on_s = mapper(torch.einsum("btm,bhmd->bhtd", A.float(), v), which="values")
                wn = weights[:, n][:, None, None, None]
                fused_k = wn * k_on_s if fused_k is None else fused_k + wn * k_on_s
                fused_v = wn * v_on_s if fused_v is None else fused_v + wn * v_on_s
                cover = torch.maximum(cover, (A.sum(-1) > 0).float())
            if fused_k is None:
                continue
            m = cover * mask_s
            total = total + kv.keys * kv_error(s.keys[i], fused_k, m, kind=kv.kind, normalize=kv.normalize)
            total = total + kv.values * kv_error(s.values[i], fused_v, m, kind=kv.kind, normalize=kv.normalize)
            count += 1
        return kv.weight * total / max(count, 1)

    # -------------------------------------------------------------------------------------- latent space Z
    def _teacher_features(self, teacher, tkv: TeacherKV, i: int) -> torch.Tensor:
        """Teacher K/V features mixed over the teacher layers mapped to student layer i: (B, T_t, 2·H_t·D_t)."""
        if not tkv.shared_spans:
            raise KvdistillError(f"fusion.space 'latent' needs teacher '{teacher.name}' uncompressed",
                                 "set its compression.kind: full, or use fusion.space: loss")
        row = self.layer_maps[teacher.name][i]
        return sum(float(row[j]) * kv_features(tkv.keys[j], tkv.values[j]) for j in row.nonzero().flatten().tolist())

    def _latent_loss(self, teacher, tkv: TeacherKV, s, mask_s, spans_s):
        """Per-sample error (B,) in Z between the student head and this teacher, over its mapped layers."""
        kv = self.cfg.losses.kv
        matrix = self.layer_maps[teacher.name]
        mapped = [i for i in range(matrix.shape[0]) if matrix[i].sum() > 0]
        any_j = int(matrix[mapped[0]].nonzero().flatten()[0])
        A = batch_token_alignment(spans_s, mask_s, tkv.spans[any_j], tkv.mask[any_j])  # (B, T_s, T_t)
        covered = (A.sum(-1) > 0).long() * mask_s  # (B, T_s)
        total = torch.zeros(mask_s.shape[0], device=mask_s.device)
        deepest = None
        for i in mapped:
            z_t = self.latent.encode(teacher.name, i, self._teacher_features(teacher, tkv, i))  # (B, T_t, d_z)
            target = torch.einsum("bst,btz->bsz", A, z_t)  # (B, T_s, d_z) on the student's tokens
            pred = self.latent_heads[str(i)](kv_features(s.keys[i], s.values[i]))  # (B, T_s, d_z)
            total = total + kv_error(pred[:, None], target[:, None], covered, kind=kv.kind, normalize=kv.normalize)
            deepest = (pred[:, None], target[:, None], covered[:, None])
        return kv.weight * total / len(mapped), deepest

    @torch.no_grad()
    def prepare(self, records: list[dict]) -> None:
        """Fit what is fitted rather than trained (the latent maps) on `records`; a no-op otherwise or once done."""
        if self.latent is None or bool(self.latent.fitted) or not self.teachers:
            return
        bs = self.cfg.train.batch_size
        samples: dict[tuple[str, int], list] = {}
        pairs: dict[tuple[str, int], list] = {}
        reference = self.teachers[0]
        for lo in range(0, len(records), bs):
            batch = records[lo : lo + bs]
            tkvs = [t.kv(batch, max_length=self.cfg.data.max_length) for t in self.teachers]
            first = {t.name: int(self.layer_maps[t.name].nonzero()[0, 1]) for t in self.teachers}
            ref_kv, j0 = tkvs[0], first[reference.name]
            for teacher, tkv in zip(self.teachers, tkvs, strict=True):
                j = first[teacher.name]
                m = tkv.mask[j].bool()  # (B, T_t)
                A = None
                if teacher is not reference:  # reference tokens, normalised over this teacher's tokens
                    A = batch_token_alignment(ref_kv.spans[j0], ref_kv.mask[j0], tkv.spans[j], tkv.mask[j])
                for i in self.latent.feature_layers(teacher.name):
                    x = self._teacher_features(teacher, tkv, i)  # (B, T_t, F)
                    samples.setdefault((teacher.name, i), []).append(x[m])
                    if A is None or (reference.name, i) not in self.latent.keys_:
                        continue
                    x_ref = self._teacher_features(reference, ref_kv, i)  # (B, T_0, F_0)
                    on_ref = torch.einsum("bst,btf->bsf", A, x)  # (B, T_0, F)
                    ok = (A.sum(-1) > 0) & ref_kv.mask[j0].bool()
                    pairs.setdefault((teacher.name, i), []).append((on_ref[ok], x_ref[ok]))
        fit_samples = {k: (torch.cat(v), torch.ones(sum(len(x) for x in v))) for k, v in samples.items()}
        fit_pairs = {k: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v]),
                         torch.ones(sum(len(a) for a, _ in v))) for k, v in pairs.items()}
        self.latent.fit({k: (x.cpu(), w) for k, (x, w) in fit_samples.items()},
                        {k: (a.cpu(), b.cpu(), w) for k, (a, b, w) in fit_pairs.items()}, reference.name)

    # -------------------------------------------------------------------------------------- outside training
    def plan(self) -> dict:
        out = {"student": self.student_geometry.to_dict(), "teachers": []}
        for tcfg, teacher in zip(self.cfg.teachers, self.teachers, strict=True):
            p = alignment_plan(self.student_geometry, teacher.geometry, strategy=tcfg.layer_map.strategy,
                               explicit=tcfg.layer_map.explicit, interpolate=tcfg.layer_map.interpolate,
                               projector=tcfg.projector)
            p["geometry"] = teacher.geometry.to_dict()
            p["source"] = teacher.kind
            out["teachers"].append(p)
        return out

    def alignment_sample(self, record: dict) -> dict:
        """Tokens of the student and every teacher for one record, and their alignment (for the report)."""
        from kvdistill.align.tokens import token_alignment

        def toks(tokenizer):
            enc = tokenizer(record["text"][:400], return_offsets_mapping=True, truncation=True, max_length=48)
            return tokenizer.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"]

        s_tok, s_spans = toks(self.tokenizer)
        out = {"text": record["text"][:400], "student": {"tokens": s_tok}, "teachers": {}}
        for teacher in self.teachers:
            if getattr(teacher, "tokenizer", None) is None:
                continue
            t_tok, t_spans = toks(teacher.tokenizer)
            A = token_alignment(torch.tensor(s_spans), torch.tensor(t_spans)).to_dense()
            out["teachers"][teacher.name] = {"tokens": t_tok, "alignment": [[round(float(x), 4) for x in r] for r in A]}
        return out

    def save_student(self, out_dir) -> None:
        save_student(self.student, self.tokenizer, str(out_dir))

    @torch.no_grad()
    def evaluate(self, records: list[dict], batch_size: int | None = None) -> dict:
        from kvdistill.eval.metrics import evaluate_objective

        was = self.training
        self.eval()
        try:
            return evaluate_objective(self, records, batch_size or self.cfg.train.batch_size)
        finally:
            self.train(was)


def build_teachers(cfg: RunConfig, device) -> list:
    from kvdistill.models.load import attn_implementation_for, load_config, load_model
    from kvdistill.models.queries import supports_queries
    from kvdistill.teachers import CachedTeacher, OnlineTeacher

    teachers = []
    on_gpu = torch.device(device).type == "cuda"
    for tcfg in cfg.teachers:
        if tcfg.source == "cache":
            from kvdistill.cache.extract import open_teacher_cache

            # refused unless it holds this run's teacher, tokenizer, compression and data
            teachers.append(CachedTeacher(tcfg.name, open_teacher_cache(tcfg, cfg.data)))
            continue
        dtype = tcfg.dtype if tcfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        comp = tcfg.compression
        # attention probabilities are read for attention_kl, and by rkv for families whose importance cannot come
        # from hooked queries (models.queries); sdpa otherwise
        rkv_attn = comp.kind == "rkv" and not supports_queries(geometry_of(load_config(tcfg.model)))
        attn = attn_implementation_for(cfg.losses.attention_kl > 0 or rkv_attn)
        model, tok = load_model(tcfg.model, dtype=dtype, attn_implementation=attn)
        teachers.append(OnlineTeacher(tcfg.name, model, tok, compression=comp.build() if comp.kind != "full" else None,
                                      layers=comp.layers))
    return teachers


def build_objective(cfg: RunConfig, device="cpu", *, init_student: str | None = None) -> Objective:
    student_cfg = cfg.student
    if init_student is not None:
        student_cfg = student_cfg.model_copy(update={"model": str(init_student), "from_config": None,
                                                     "tokenizer": None})
    student, tokenizer = build_student(student_cfg, seed=cfg.train.seed, attentions=cfg.losses.attention_kl > 0)
    teachers = build_teachers(cfg, device)
    torch.manual_seed(cfg.train.seed + 1)  # projector / router init independent of how the student was built
    return Objective(cfg, student, tokenizer, teachers, device)
