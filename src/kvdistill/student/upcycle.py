"""Sparse upcycling: a dense causal LM turned into the MoE of its family's counterpart, every expert a copy of
the dense MLP, the router newly initialised.

Notation: E experts, k chosen per token, F hidden width, I the MLP's intermediate width.

Dense llama / mistral -> mixtral, qwen3 -> qwen3_moe (same attention, norms and embeddings, so every other
weight is copied as it is). The MoE block's top-k weights sum to 1 (Mixtral always, Qwen3-MoE with
norm_topk_prob), so at initialisation the upcycled model computes exactly the dense model's function, whatever
the router picks (tests/student/test_upcycle.py checks the logits); training then lets the experts diverge.
The expert correspondence of an upcycled student to a teacher with as many experts is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from kvdistill.errors import KvdistillError

# dense model_type -> (MoE model_type, the MoE config's fields for E and k, extra fields)
COUNTERPARTS: dict[str, tuple[str, str, dict]] = {
    "llama": ("mixtral", "num_local_experts", {}),
    "mistral": ("mixtral", "num_local_experts", {}),
    "qwen3": (
        "qwen3_moe",
        "num_experts",
        {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    ),
}


def upcycled_config(dense_config, num_experts: int, top_k: int):
    """The MoE counterpart's config of a dense config (every shared field kept)."""
    from transformers import AutoConfig

    dense_type = dense_config.model_type
    if dense_type not in COUNTERPARTS:
        raise KvdistillError(
            f"student.upcycle: no MoE counterpart is known for the dense family '{dense_type}'",
            f"upcycle a student of {', '.join(COUNTERPARTS)}, or build an MoE from_config",
        )
    moe_type, experts_field, extra = COUNTERPARTS[dense_type]
    if getattr(dense_config, "mlp_bias", False):
        raise KvdistillError(
            f"student.upcycle: the dense {dense_type} MLP has biases, the {moe_type} experts none",
            "upcycle a checkpoint whose MLP has no bias",
        )
    fields = {
        k: v
        for k, v in dense_config.to_dict().items()
        if k not in ("model_type", "architectures", "transformers_version", "_name_or_path")
    }
    fields.update({experts_field: num_experts, "num_experts_per_tok": top_k, **extra})
    if moe_type == "qwen3_moe":
        fields["moe_intermediate_size"] = dense_config.intermediate_size
    return AutoConfig.for_model(moe_type, **fields)


def upcycle(dense: nn.Module, *, num_experts: int, top_k: int, seed: int = 0) -> nn.Module:
    """The MoE model whose every expert is `dense`'s MLP of the same layer; other weights copied, routers
    drawn with the MoE family's init under `seed`. Refused when a dense weight has no place in the MoE."""
    from transformers import AutoModelForCausalLM

    config = upcycled_config(dense.config, num_experts, top_k)
    config._attn_implementation = dense.config._attn_implementation
    torch.manual_seed(seed)
    moe = AutoModelForCausalLM.from_config(
        config, dtype=next(dense.parameters()).dtype, attn_implementation=dense.config._attn_implementation
    )
    src = dense.state_dict()
    dst = moe.state_dict()
    loaded = {}
    for name, tensor in src.items():
        if ".mlp." in name:
            continue
        if name not in dst or dst[name].shape != tensor.shape:
            raise KvdistillError(
                f"student.upcycle: dense weight {name} {tuple(tensor.shape)} has no counterpart in "
                f"{config.model_type}",
                "upcycle a checkpoint of a supported family unchanged",
            )
        loaded[name] = tensor
    for i in range(config.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp"
        gate, up, down = (
            src[f"{mlp}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")
        )  # (I, F) (I, F) (F, I)
        loaded[f"{mlp}.experts.gate_up_proj"] = (
            torch.cat([gate, up], 0)[None].expand(num_experts, -1, -1).clone()
        )
        loaded[f"{mlp}.experts.down_proj"] = down[None].expand(num_experts, -1, -1).clone()  # (E, F, I)
    missing = sorted(
        set(dst)
        - set(loaded)
        - {f"model.layers.{i}.mlp.gate.weight" for i in range(config.num_hidden_layers)}
    )
    if config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing:
        raise KvdistillError(
            f"student.upcycle: {config.model_type} weights {missing[:4]} have no dense source",
            "upcycle a checkpoint of a supported family unchanged",
        )
    moe.load_state_dict(loaded, strict=False)
    if config.tie_word_embeddings:
        moe.tie_weights()
    moe.config.name_or_path = (
        f"{getattr(dense.config, 'name_or_path', '') or dense.config.model_type}+upcycled"
    )
    return moe
