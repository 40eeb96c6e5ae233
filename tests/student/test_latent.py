"""The latent student: the parallel Jacobi update against step-by-step references of the same definition,
latent generation against a step-by-step greedy reference, and the save / load round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvdistill.models.capture import positions_from_mask
from kvdistill.student.latent import LatentHead, LatentStudent, load_latent_student

FAMILIES = {
    "llama": dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "qwen2": dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
    ),
    "gpt2": dict(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


def tiny_student(family: str, tokens: int = 4, iterations: int = 3, projection: str = "mlp") -> LatentStudent:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, **FAMILIES[family])
    cfg._attn_implementation = "sdpa"  # eager float64 gives NaN for left padding (transformers 5.24)
    backbone = AutoModelForCausalLM.from_config(cfg).double().eval()
    head = LatentHead(32, tokens, projection).double()
    if projection == "mlp":  # leave the identity start: a projection that changes something
        torch.nn.init.normal_(head.fc2.weight, std=0.3)
    return LatentStudent(backbone, head, iterations).eval()


def prefix_batch():
    ids = torch.tensor([[0, 0, 5, 9, 12, 3], [7, 8, 9, 10, 11, 4]])  # (B, P) left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def decoder_hidden(student, embeds, mask):
    out = student._decoder()(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[-1]


def jacobi_reference(student, ids, mask):
    """The definition, one slot at a time, every pass recomputed from scratch."""
    B, P = ids.shape
    M = student.tokens
    emb = student.embed(ids)
    e = student.head.init.unsqueeze(0).expand(B, M, -1).clone()
    full_mask = torch.cat([mask, mask.new_ones(B, M)], 1)
    for _ in range(student.iterations):
        new = torch.empty_like(e)
        for m in range(M):
            h = decoder_hidden(student, torch.cat([emb, e], 1), full_mask)  # (B, P+M, d)
            new[:, m] = student.head.project(h[:, P - 1 + m])
        e = new
    return e


def sequential_thought(student, ids, mask):
    """Coconut: latent m is the projected last hidden state after the prefix and latents 0..m-1."""
    B, P = ids.shape
    emb = student.embed(ids)
    e = emb.new_zeros(B, 0, emb.shape[-1])
    for m in range(student.tokens):
        h = decoder_hidden(student, torch.cat([emb, e], 1), torch.cat([mask, mask.new_ones(B, m)], 1))
        e = torch.cat([e, student.head.project(h[:, -1:])], 1)
    return e


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("projection", ["mlp", "linear", "none"])
def test_parallel_jacobi_equals_step_by_step_reference(family, projection):
    student = tiny_student(family, projection=projection)
    ids, mask = prefix_batch()
    with torch.no_grad():
        cached = student.latents(ids, mask)
        recomputed = student.latents(ids, mask, use_cache=False)
        ref = jacobi_reference(student, ids, mask)
    assert cached.shape == (2, 4, 32)
    torch.testing.assert_close(recomputed, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cached, ref, rtol=1e-9, atol=1e-10)
    # the latents change over the passes: T passes are not a no-op
    assert (ref - student.head.init).abs().max() > 1e-3


def test_jacobi_with_as_many_passes_as_slots_is_the_sequential_thought():
    student = tiny_student("llama", tokens=3, iterations=3)
    ids, mask = prefix_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            student.latents(ids, mask), sequential_thought(student, ids, mask), rtol=1e-9, atol=1e-10
        )
        student.iterations = 2  # one pass short: the last slot still differs
        assert (student.latents(ids, mask) - sequential_thought(student, ids, mask)).abs().max() > 1e-6


def test_jacobi_gradient_reaches_head_and_backbone_through_every_pass():
    student = tiny_student("llama").train()
    ids, mask = prefix_batch()
    student.latents(ids, mask).square().sum().backward()
    # e_k[m] reads e_{k-1}[0..m-1] only, so after T passes e_T reads e_0[0..M-1-T]: here (M 4, T 3) slot 0
    # alone
    grad = student.head.init.grad.abs().sum(-1)  # (M,)
    assert grad[0] > 0 and (grad[1:] == 0).all()
    assert student.head.fc1.weight.grad.abs().sum() > 0
    assert student.backbone.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_latent_generation_equals_step_by_step_greedy(family):
    student = tiny_student(family)
    ids, mask = prefix_batch()
    prompt = torch.tensor([[13, 14], [13, 14]])
    fast = student.generate(ids, mask, prompt, max_new_tokens=6)
    slow = student.generate(ids, mask, prompt, max_new_tokens=6, use_cache=False)
    # an independent greedy loop over the full forward with the reference latents
    with torch.no_grad():
        e = jacobi_reference(student, ids, mask)
        seq = torch.cat([student.embed(ids), e, student.embed(prompt)], 1)
        m = torch.cat([mask, mask.new_ones(2, e.shape[1] + prompt.shape[1])], 1)
        out = []
        for _ in range(6):
            logits = student.backbone(
                inputs_embeds=seq, attention_mask=m, position_ids=positions_from_mask(m)
            ).logits
            tok = logits[:, -1].argmax(-1)
            out.append(tok)
            seq = torch.cat([seq, student.embed(tok[:, None])], 1)
            m = torch.cat([m, m.new_ones(2, 1)], 1)
    ref = torch.stack(out, 1)
    assert torch.equal(fast["tokens"], ref) and torch.equal(slow["tokens"], ref)
    assert fast["latent_passes"] == student.iterations + 1


def test_generation_from_given_latents_equals_a_batch_whose_latents_are_those():
    """`latents=` (the swap probe's): sample 0 answered from sample 1's latents decodes what a greedy loop
    over sample 0's question, sample 1's reference latents and the prompt decodes; a wrong shape is
    refused."""
    from kvdistill.errors import KvdistillError

    student = tiny_student("llama")
    ids, mask = prefix_batch()
    prompt = torch.tensor([[13, 14], [13, 14]])
    with torch.no_grad():
        e = jacobi_reference(student, ids, mask)  # (2, M, d)
        swapped = e.flip(0)
        got = student.generate(ids, mask, prompt, max_new_tokens=5, latents=swapped)["tokens"]
        own = student.generate(ids, mask, prompt, max_new_tokens=5)["tokens"]
        seq = torch.cat([student.embed(ids), swapped, student.embed(prompt)], 1)
        m = torch.cat([mask, mask.new_ones(2, e.shape[1] + 2)], 1)
        ref = []
        for _ in range(5):
            tok = student.backbone(inputs_embeds=seq, attention_mask=m, position_ids=positions_from_mask(m))
            tok = tok.logits[:, -1].argmax(-1)
            ref.append(tok)
            seq = torch.cat([seq, student.embed(tok[:, None])], 1)
            m = torch.cat([m, m.new_ones(2, 1)], 1)
    assert torch.equal(got, torch.stack(ref, 1)) and not torch.equal(got, own)
    with pytest.raises(KvdistillError, match="latents of shape"):
        student.generate(ids, mask, prompt, max_new_tokens=1, latents=e[:, :2])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_latents_read_as_tokens_are_the_lm_heads_top_tokens_where_the_slots_are_projected_from(family):
    """read_latents against the full causal LM's logits (its own LM head path): slot 0 at the question's last
    position, slot m at latent m-1; generate returns the latents its answer read."""
    student = tiny_student(family)
    ids, mask = prefix_batch()
    with torch.no_grad():
        e = student.generate(ids, mask, torch.tensor([[13], [13]]), max_new_tokens=1)["latents"]
        torch.testing.assert_close(e, jacobi_reference(student, ids, mask))  # cached vs recomputed prefix
        m = torch.cat([mask, mask.new_ones(2, e.shape[1])], 1)
        logits = student.backbone(
            inputs_embeds=torch.cat([student.embed(ids), e], 1),
            attention_mask=m,
            position_ids=positions_from_mask(m),
        ).logits  # (B, P+M, V)
    P, M = ids.shape[1], e.shape[1]
    want = logits[:, P - 1 : P + M - 1].argmax(-1)
    assert torch.equal(student.read_latents(ids, mask, e), want) and want.shape == (2, M)


def test_generation_stops_at_eos_and_pads_with_it():
    student = tiny_student("llama")
    ids, mask = prefix_batch()
    prompt = torch.tensor([[13], [13]])
    first = student.generate(ids, mask, prompt, max_new_tokens=1)["tokens"][:, 0]
    out = student.generate(ids, mask, prompt, max_new_tokens=5, eos_id=int(first[0]))["tokens"]
    assert (out[0] == first[0]).all()  # sample 0 stopped at once: eos repeated


def test_save_and_load_round_trip(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    student = tiny_student("llama", projection="linear").float()
    student.backbone.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    tok.save_pretrained(tmp_path)
    student.save_head(tmp_path)
    loaded, _ = load_latent_student(tmp_path, attn_implementation="sdpa")
    ids, mask = prefix_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.latents(ids, mask), student.latents(ids, mask))
    assert loaded.iterations == 3 and loaded.tokens == 4


def _norm_ratio(student: LatentStudent, ids, mask) -> float:
    """Mean latent norm over the mean token-embedding norm."""
    with torch.no_grad():
        e = student.latents(ids, mask)  # (B, M, d)
    emb = student.backbone.get_input_embeddings().weight.detach()
    return float(e.norm(dim=-1).mean() / emb.norm(dim=-1).mean())


def test_embed_norm_head_starts_at_the_token_embedding_scale():
    """At init the embed_norm head's latents have a token embedding's norm (ratio ~1); the identity head feeds
    the post-norm hidden state, tens of times larger."""
    from kvdistill.student.latent import embedding_rms

    ids, mask = prefix_batch()
    ratios = {}
    for kind in ("embed_norm", "identity"):
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("llama", **FAMILIES["llama"])
        backbone = AutoModelForCausalLM.from_config(cfg).eval()
        rms = embedding_rms(backbone)
        head = LatentHead(32, 4, "mlp", head=kind, embed_rms=rms if kind == "embed_norm" else None)
        ratios[kind] = _norm_ratio(LatentStudent(backbone, head, 3).eval(), ids, mask)
        if kind == "embed_norm":  # the learned start too
            assert float(
                head.init.norm(dim=-1).mean() / backbone.get_input_embeddings().weight.norm(dim=-1).mean()
            ) == pytest.approx(1.0, abs=0.2)
    assert ratios["embed_norm"] == pytest.approx(1.0, abs=0.05)
    assert ratios["identity"] > 10


def test_embed_norm_head_is_saved_and_loaded(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    student = tiny_student("llama").float()
    student.head = LatentHead(32, 4, "mlp", head="embed_norm", embed_rms=0.3)
    torch.nn.init.normal_(student.head.gain, std=0.5)  # a trained gain must come back
    student.backbone.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    tok.save_pretrained(tmp_path)
    student.save_head(tmp_path)
    loaded, _ = load_latent_student(tmp_path, attn_implementation="sdpa")
    assert loaded.head.head == "embed_norm"
    ids, mask = prefix_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.latents(ids, mask), student.latents(ids, mask))


@pytest.mark.slow
def test_embed_norm_head_on_smollm2_starts_at_the_embedding_scale():
    """The same on the offline SmolLM2-135M, where the identity head's latents are about 18x a token
    embedding."""
    from kvdistill.models.load import load_model
    from kvdistill.student.latent import embedding_rms

    backbone, tok = load_model("smollm2-135m", attn_implementation="sdpa")
    enc = tok(
        ["Question: Compute 3 + 4 * 5.\n", "Question: Compute 12 - 7.\n"],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    hidden = backbone.get_input_embeddings().embedding_dim
    ratios = {}
    for kind in ("embed_norm", "identity"):
        torch.manual_seed(0)
        head = LatentHead(
            hidden, 4, "mlp", head=kind, embed_rms=embedding_rms(backbone) if kind == "embed_norm" else None
        )
        ratios[kind] = _norm_ratio(
            LatentStudent(backbone.eval(), head, 3).eval(), enc["input_ids"], enc["attention_mask"]
        )
    assert ratios["embed_norm"] == pytest.approx(1.0, abs=0.1)
    assert ratios["identity"] > 5
