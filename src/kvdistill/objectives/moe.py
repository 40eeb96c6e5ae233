"""The MoE terms of the objective: routing distillation, expert-output distillation and the student's load
balance.

Notation: B batch, T_s student tokens, M = T_t teacher tokens, P_s/P_t MoE blocks, E_s/E_t experts, k_s/k_t
experts per token, F_s/F_t widths.

    moe(b) = λ_bal·balance(b) + Σ_n w_n(b) · (λ_route·route_n(b) + λ_expert·expert_n(b))

balance: the student's sequence-wise load-balancing loss (`losses.load_balance`), mean over its MoE blocks, on
whenever the student is an MoE (weight `losses.balance`, default the student config's router_aux_loss_coef),
so a CE-only twin keeps it too. route_n / expert_n: `losses.routing_kl` / `losses.expert_output_error` between
student MoE block i and teacher block j of the block pairs (ratio map: i -> round(i·(P_t - 1)/(P_s - 1))),
averaged over the pairs, on the teacher's tokens through the character alignment. Routing comes from each
model's own router logits (hooks on the routers, `kvdistill.models.moe`), never from a separate network.

Per pair, the expert correspondence corr (E_t, E_s) is a buffer (fixed, so no loss can shrink it): the
identity for equal expert counts (correspondence auto/identity), else fitted on training records by `prepare`
(`fit_correspondence`). Expert outputs of a student narrower or wider than the teacher go through a learned
F_s -> F_t map per pair (a registered nn.Linear: the optimizer sees it).
"""

from __future__ import annotations

import torch
from torch import nn

from kvdistill import losses
from kvdistill.align.experts import block_pairs, fit_correspondence, teacher_of
from kvdistill.align.tokens import teacher_alignment_sparse
from kvdistill.errors import KvdistillError
from kvdistill.models.moe import attach_capture, moe_layers, require_moe
from kvdistill.objectives.space import Step
from kvdistill.student import unwrap_student


class MoETerms(nn.Module):
    """Captures (hooks) on the student's and teachers' MoE blocks, the correspondences and width maps."""

    def __init__(self, cfg, student: nn.Module, teachers: list):
        super().__init__()
        c = cfg.losses
        self.weights = {"routing": c.routing.weight, "expert": c.expert.weight}
        self.kind = c.routing.kind
        self.normalize = c.expert.normalize
        self.teaching = [t for t, w in self.weights.items() if w > 0] if teachers else []
        base = unwrap_student(student)
        s_layers = moe_layers(base)
        if self.teaching:
            s_layers = require_moe(base, "the student")
        if c.balance is not None and c.balance > 0 and not s_layers:
            raise KvdistillError(
                f"losses.balance ({c.balance}) needs an MoE student, but the student is dense",
                "drop losses.balance, or use an MoE student (or student.upcycle)",
            )
        self.balance = (
            (
                c.balance
                if c.balance is not None
                else float(getattr(base.config, "router_aux_loss_coef", 0.0) or 0.0)
            )
            if s_layers
            else 0.0
        )
        self.s_layers = s_layers
        want_s = bool(s_layers) and (self.balance > 0 or bool(self.teaching))
        self.s_cap, self._handles = (
            attach_capture(s_layers, experts="expert" in self.teaching) if want_s else (None, [])
        )
        self.t_caps, self.t_layers, self.pairs = [], [], []
        self.proj = nn.ModuleDict()
        self.fitted_needed: list[str] = []
        for t in teachers if self.teaching else []:
            if getattr(t, "kind", None) != "online":
                raise KvdistillError(
                    f"losses.routing / losses.expert need teacher '{t.name}' online (it is "
                    f"{getattr(t, 'kind', '?')})",
                    "use source: online for MoE teachers",
                )
            layers = require_moe(t.model, f"teacher '{t.name}'")
            cap, handles = attach_capture(layers, experts="expert" in self.teaching)
            self._handles += handles
            self.t_caps.append(cap)
            self.t_layers.append(layers)
            pairs = block_pairs(len(s_layers), len(layers))
            self.pairs.append(pairs)
            maps = nn.ModuleList()
            for p, (i, j) in enumerate(pairs):
                e_s, e_t = s_layers[i].num_experts, layers[j].num_experts
                mode = c.routing.correspondence
                if mode == "identity" and e_s != e_t:
                    raise KvdistillError(
                        "losses.routing.correspondence identity needs equal expert counts, but student "
                        f"block {i} "
                        f"has {e_s} and teacher '{t.name}' block {j} has {e_t}",
                        "use correspondence: fitted (or auto)",
                    )
                fitted = mode == "fitted" or (mode == "auto" and e_s != e_t)
                corr = torch.eye(e_s) if not fitted else torch.full((e_t, e_s), 1.0 / e_s)
                self.register_buffer(self._corr(t.name, p), corr)
                self.register_buffer(self._of(t.name, p), teacher_of(corr))
                if fitted:
                    self.fitted_needed.append(self._corr(t.name, p))
                f_s, f_t = s_layers[i].width, layers[j].width
                maps.append(
                    nn.Linear(f_s, f_t, bias=False)
                    if "expert" in self.teaching and f_s != f_t
                    else nn.Identity()
                )
            self.proj[t.name] = maps
        self.register_buffer("_fitted", torch.tensor(not self.fitted_needed))

    @staticmethod
    def _corr(name: str, p: int) -> str:
        return f"corr_{name}_{p}"

    @staticmethod
    def _of(name: str, p: int) -> str:
        return f"teacher_of_{name}_{p}"

    @property
    def active(self) -> bool:
        return self.s_cap is not None

    # ------------------------------------------------------------------------------------------------ fitting
    @torch.no_grad()
    def prepare(self, records: list[dict], teachers: list, max_length: int, batch_size: int) -> None:
        """Fit the correspondences that are fitted from the teachers' routing on `records` (no-op
        otherwise)."""
        if not self.fitted_needed:
            return
        for n, t in enumerate(teachers):
            names = [self._corr(t.name, p) for p in range(len(self.pairs[n]))]
            if not any(x in self.fitted_needed for x in names):
                continue
            probs: dict[int, list[torch.Tensor]] = {}
            for lo in range(0, len(records), batch_size):
                tkv = t.kv(records[lo : lo + batch_size], max_length=max_length)
                real = tkv.capture.attention_mask.reshape(-1).bool()  # (B·T_t,)
                for j, layer in enumerate(self.t_layers[n]):
                    logp = losses.routing_log_probs(
                        self.t_caps[n].router_logits[j], layer.scoring
                    )  # (B·T_t, E_t)
                    probs.setdefault(j, []).append(logp.exp()[real].cpu())
            for p, (i, j) in enumerate(self.pairs[n]):
                if names[p] not in self.fitted_needed:
                    continue
                P = torch.cat(probs[j])
                corr = fit_correspondence(P, self.s_layers[i].num_experts)
                getattr(self, names[p]).copy_(corr)
                getattr(self, self._of(t.name, p)).copy_(teacher_of(corr, P.mean(0)))
        self._fitted.fill_(True)

    # ---------------------------------------------------------------------------------------------- the terms
    def forward(self, step: Step, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """moe (B,) and metrics; weights (B, N) per-sample fusion weights (unused without teaching terms)."""
        mask = step.batch.mask
        B, T_s = mask.shape
        extra = torch.zeros(B, device=mask.device)
        metrics: dict[str, torch.Tensor] = {}
        if self.s_cap is None:
            return extra, metrics
        s_by = [self.s_cap.by_token(i, B, T_s) for i in range(len(self.s_layers))]
        s_logp = [
            losses.routing_log_probs(x["router_logits"], layer.scoring)
            for x, layer in zip(s_by, self.s_layers, strict=True)
        ]
        if self.balance > 0:
            bal = sum(losses.load_balance(lp, x["index"], mask) for lp, x in zip(s_logp, s_by, strict=True))
            bal = bal / len(s_by)
            extra = extra + self.balance * bal
            metrics["loss/balance"] = bal.detach().mean()
        if not self.teaching:
            return extra, metrics
        if not bool(self._fitted):
            raise KvdistillError(
                "the MoE expert correspondences are fitted from the teachers but were not",
                "call Objective.prepare(train_records) before training (the trainer does)",
            )
        for n, teacher in enumerate(step.teachers):
            terms = self.teacher_terms(step, n, s_by, s_logp)
            for name, (value, agree) in terms.items():
                extra = extra + weights[:, n] * self.weights[name] * value
                metrics[f"loss/{name}/{teacher.name}"] = value.detach().mean()
                for key, v in agree.items():
                    metrics[f"{key}/{teacher.name}"] = v.mean()
        return extra, metrics

    def teacher_terms(self, step: Step, n: int, s_by: list[dict], s_logp: list[torch.Tensor]) -> dict:
        """{routing | expert: (per-sample value (B,), agreement metrics)} of teacher n, averaged over block
        pairs."""
        teacher, tkv, tcap = step.teachers[n], step.records[n], self.t_caps[n]
        mask = step.batch.mask
        B, T_s = mask.shape
        T_t = tkv.capture.attention_mask.shape[1]
        spans_t, mask_t = tkv.host_spans(next(iter(tkv.spans)))
        index, weight = teacher_alignment_sparse(
            spans_t, mask_t, step.batch.spans_cpu, step.batch.mask_cpu, device=mask.device
        )
        index, weight = index[:, 0], weight[:, 0]  # (B, M, K) teacher tokens onto student tokens
        t_mask = tkv.capture.attention_mask
        out: dict[str, tuple[torch.Tensor, dict]] = {}
        P = len(self.pairs[n])
        route = torch.zeros(B, device=mask.device)
        expert = torch.zeros(B, device=mask.device)
        top1 = torch.zeros(B, device=mask.device)
        topk = torch.zeros(B, device=mask.device)
        for p, (i, j) in enumerate(self.pairs[n]):
            corr = getattr(self, self._corr(teacher.name, p))
            t_by = tcap.by_token(j, B, T_t)
            t_layer = self.t_layers[n][j]
            t_logp = losses.routing_log_probs(t_by["router_logits"], t_layer.scoring)  # (B, M, E_t)
            if "routing" in self.teaching:
                route = (
                    route
                    + losses.routing_kl(
                        s_logp[i], t_logp, t_mask, index, weight, corr, kind=self.kind, top_k=t_layer.top_k
                    )
                    / P
                )
            a1, ak = losses.routing_agreement(
                s_logp[i].detach(), t_logp, t_mask, index, weight, corr, self.s_layers[i].top_k
            )
            top1, topk = top1 + a1 / P, topk + ak / P
            if "expert" in self.teaching:
                y_s = self.proj[teacher.name][p](s_by[i]["outputs"].float())  # (B, T_s, k_s, F_t)
                expert = (
                    expert
                    + losses.expert_output_error(
                        y_s,
                        s_by[i]["index"],
                        t_by["outputs"],
                        t_by["index"],
                        t_mask,
                        index,
                        weight,
                        getattr(self, self._of(teacher.name, p)),
                        normalize=self.normalize,
                    )
                    / P
                )
        agreement = {"routing/top1_agreement": top1, "routing/topk_overlap": topk}
        if "routing" in self.teaching:
            out["routing"] = (route, agreement)
        if "expert" in self.teaching:
            out["expert"] = (expert, {} if "routing" in self.teaching else agreement)
        return out
