"""The `fusion` section of a run configuration: how the text objective weighs its teachers and in which
space."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kvdistill.config.section import Section


class SimilarityConfig(Section):
    prototype: Literal["mean", "first", "max", "kmeans"] = "mean"
    metric: Literal["cosine", "dot", "l2"] = "cosine"
    temperature: float = Field(1.0, gt=0.0)
    kmeans_k: int = Field(4, gt=0)


class RouterConfig(Section):
    kind: Literal["mlp", "gate", "attention"] = "mlp"
    per_token: bool = False
    target: Literal["kv_loss", "confidence"] = "kv_loss"
    """What trains the router. kv_loss: the weighted loss Σ_n w_n·KV_loss_n itself (its minimum puts all
    weight on the teacher easiest to match, whatever the sample); confidence: KL(confidence weights || router
    weights), the confidence weights of `fusion.confidence` from the teachers' own logits, while the K/V loss
    uses the router's weights without passing gradient into it (a router that routes where teacher logits are
    absent)."""
    target_weight: float = Field(1.0, gt=0.0)
    """target confidence: the weight of the router's KL term in the loss."""


class ConfidenceConfig(Section):
    temperature: float = Field(0.1, gt=0.0)
    """τ of w_n = softmax_n(-NLL_n / τ), NLL_n teacher n's own NLL of the sample's scored text in nats per
    UTF-8 byte (`kvdistill.fuse.confidence`): a gap of τ nats per byte between two teachers is a factor e in
    weight."""
    span: Literal["continuation", "text"] = "continuation"
    """The text scored: continuation, what follows the question line of a template-mode record (the labelled
    reasoning and answer); text, the whole text (records without a question: chat, plain text)."""


class EntropyConfig(Section):
    target: Literal["diverse", "specialized"] = "diverse"
    weight: float = Field(0.01, ge=0.0)


class LatentConfig(Section):
    dim: int = Field(64, gt=0)
    """d_z: width of the shared latent space Z."""
    fit_samples: int = Field(32, gt=1)
    """Training records (the first ones, the same on every process) that the frozen maps into Z are fitted
    on."""


class FusionConfig(Section):
    kind: Literal["fixed", "similarity", "router", "confidence"] = "fixed"
    """fixed weights; similarity of the student's side to teacher prototypes; a learned router on the
    student's hidden states; confidence: each teacher's own NLL per byte of the sample (`fusion.confidence`),
    no learning."""
    space: Literal["loss", "target", "latent"] = "loss"
    """loss: Σ_i w_i·KV_loss_i with maps from the student into each teacher's geometry (default,
    collapse-safe); target: one fused target Σ_i w_i·A_i(KV_i) with frozen teacher→student maps A_i;
    latent: every teacher's K/V in one shared space Z (frozen whitened PCA + Procrustes rotation onto a
    reference teacher), one learnable student head into Z; works for encoder teachers too."""
    latent: LatentConfig = LatentConfig()
    weights: list[float] | None = None
    """Fixed weights, one per teacher (default: each teacher's `weight`, normalised)."""
    similarity: SimilarityConfig = SimilarityConfig()
    router: RouterConfig = RouterConfig()
    entropy: EntropyConfig = EntropyConfig()
    confidence: ConfidenceConfig = ConfidenceConfig()

    @property
    def scores_teachers(self) -> bool:
        """Whether the teachers' pass scores each sample with the teachers' own logits (the confidence
        weights)."""
        return self.kind == "confidence" or (self.kind == "router" and self.router.target == "confidence")

    @model_validator(mode="after")
    def _used_sections(self):
        """A section changed from its defaults that the chosen kind / space never reads is refused, not
        ignored (compared by value, so a config dumped with every default reloads)."""
        defaults = FusionConfig.model_construct()
        unused = [
            (key, need)
            for key, need, used in (
                ("similarity", "kind: similarity", self.kind == "similarity"),
                ("router", "kind: router", self.kind == "router"),
                ("entropy", "kind: router", self.kind == "router"),
                ("weights", "kind: fixed", self.kind == "fixed"),
                ("latent", "space: latent", self.space == "latent"),
                (
                    "confidence",
                    "kind: confidence (or kind: router with router.target: confidence)",
                    self.scores_teachers,
                ),
            )
            if getattr(self, key) != getattr(defaults, key) and not used
        ]
        problems = [
            f"fusion.{key} is changed from its default but only fusion.{need} reads it (kind {self.kind}, "
            f"space {self.space}); "
            f"drop fusion.{key} or set fusion.{need}"
            for key, need in unused
        ]
        if self.kind == "router" and self.router.kind == "attention" and self.router.per_token:
            problems.append(
                "fusion.router.per_token needs router kind 'mlp' or 'gate': the attention router pools "
                "over tokens"
            )
        if self.router.target == "kv_loss" and self.router.target_weight != defaults.router.target_weight:
            problems.append(
                f"fusion.router.target_weight ({self.router.target_weight}) weighs the router's KL toward "
                "the confidence weights, but fusion.router.target is kv_loss: drop it or set "
                "fusion.router.target: confidence"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self
