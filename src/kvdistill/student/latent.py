"""The latent-reasoning student (KaVa, arXiv 2510.02312): one backbone that reads the question, then M
continuous latent tokens, then the answer; the latents come from Jacobi iterations over projected hidden
states (PCCoT, arXiv 2506.18582).

Notation: B batch, P prefix (question) columns, M latent slots, S suffix (answer) columns, d hidden size,
T the number of Jacobi iterations.

Columns of a student-mode batch: [ prefix (P, left-padded) | latents (M) | suffix (S, right-padded) ], mask =
prefix mask | ones | suffix mask, positions = cumsum(mask) - 1 (each sample's tokens are contiguous). Left
padding puts every sample's latents in the same columns P .. P+M-1.

The latents (our reading of PCCoT):
    e_0[m] = init[m]                                     a learned (M, d) start
    h^k    = last hidden states of backbone(prefix, e_{k-1}) at the M latent columns        (B, M, d)
    e_k[0] = proj(h_q),  e_k[m] = proj(h^k[m-1]) for m >= 1   h_q: the last prefix token's last hidden state
for k = 1..T, all slots at once (a Jacobi step: slot m reads the previous pass's slot m-1). The answer is read
after e_T. The prefix's K/V are computed once and reused by every pass (the model's cache, cropped back to the
prefix after each pass; a cache that cannot be cropped is replaced by recomputing the prefix). After k passes
slots 0..k-1 no longer change, so with T >= M the latents equal the sequential (Coconut-style) continuous
thought. proj = norm ∘ f: f is 'mlp' h + W2·gelu(W1·h) (W2 starts at 0, so f starts as the identity), 'linear'
(starts as the identity) or 'none' (the hidden state itself); norm ('head') is 'embed_norm' x / rms(x) · g
with a learned gain g (d,) that starts at the RMS of the token embeddings, so the latents enter the backbone
at the scale of a token embedding from the first step (the post-norm hidden state is 18-50x larger), or
'identity' (none).

A saved latent student is a plain Hugging Face model (the backbone) plus `latent.json` and
`latent.safetensors` (the head) in the same directory. `latent_view` tokenizes template records into a
student-mode batch (training's answer CE and the held-out one, `kvdistill.eval.heldout.latent_answer_ce`, read
it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kvdistill.data.segments import Segments
from kvdistill.errors import KvdistillError
from kvdistill.models.capture import forward_kv, positions_from_mask, tokenize
from kvdistill.models.hf_forward import cache_argument, returned_cache
from kvdistill.student.build import unwrap_student

PROJECTIONS = ("mlp", "linear", "none")
HEADS = ("embed_norm", "identity")
HEAD_CONFIG = "latent.json"
HEAD_WEIGHTS = "latent.safetensors"


class LatentHead(nn.Module):
    """The learned start `init` (M, d) and the projection of hidden states into latent inputs (module
    docstring).

    head 'embed_norm' needs `embed_rms`, the RMS of the backbone's token embeddings: the gain starts there and
    `init` is drawn at that scale; 'identity' keeps the projection's output as it is (`init` at
    `init_std`)."""

    def __init__(
        self,
        hidden_size: int,
        tokens: int,
        projection: str = "mlp",
        init_std: float = 0.02,
        *,
        head: str = "identity",
        embed_rms: float | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        if projection not in PROJECTIONS:
            raise KvdistillError(
                f"student.latent.projection '{projection}' is unknown", f"use one of {', '.join(PROJECTIONS)}"
            )
        if head not in HEADS:
            raise KvdistillError(f"student.latent.head '{head}' is unknown", f"use one of {', '.join(HEADS)}")
        if head == "embed_norm" and (embed_rms is None or not embed_rms > 0):
            raise KvdistillError(
                f"head embed_norm needs the token embeddings' RMS (> 0), got {embed_rms!r}",
                "pass embedding_rms(backbone)",
            )
        self.tokens, self.projection, self.hidden_size, self.head, self.eps = (
            tokens,
            projection,
            hidden_size,
            head,
            eps,
        )
        std = float(embed_rms) if head == "embed_norm" else init_std
        self.init = nn.Parameter(torch.randn(tokens, hidden_size) * std)  # (M, d)
        if head == "embed_norm":
            self.gain = nn.Parameter(torch.full((hidden_size,), float(embed_rms)))  # (d,)
        if projection == "mlp":
            self.fc1 = nn.Linear(hidden_size, hidden_size)
            self.fc2 = nn.Linear(hidden_size, hidden_size)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
        elif projection == "linear":
            self.fc = nn.Linear(hidden_size, hidden_size)
            with torch.no_grad():
                self.fc.weight.copy_(torch.eye(hidden_size))
                self.fc.bias.zero_()

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) hidden states -> (..., d) latent inputs, in the head's dtype."""
        h = h.to(self.init.dtype)
        if self.projection == "mlp":
            x = h + self.fc2(nn.functional.gelu(self.fc1(h)))
        elif self.projection == "linear":
            x = self.fc(h)
        else:
            x = h
        if self.head == "embed_norm":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain
        return x


def embedding_rms(backbone: nn.Module) -> float:
    """sqrt(mean(E²)) of the backbone's input embedding matrix E (V, d): a token embedding's typical norm over
    √d."""
    weight = backbone.get_input_embeddings().weight.detach()
    return float(weight.float().pow(2).mean().sqrt())


def _crop_to(cache, length: int) -> bool:
    """Crop the cache back to its first `length` tokens; False when this cache cannot be cropped."""
    try:
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)  # a negative count removes that many tokens (transformers 4.4x and 5.x alike)
        return cache.get_seq_length() == length
    except (AttributeError, ValueError, RuntimeError, TypeError, NotImplementedError):
        return False


class LatentStudent(nn.Module):
    """A backbone (any decoder the core supports, optionally LoRA-wrapped) and its `LatentHead`."""

    def __init__(self, backbone: nn.Module, head: LatentHead, iterations: int):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.iterations = iterations

    @property
    def tokens(self) -> int:
        return self.head.tokens

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(ids)

    def _dtype(self) -> torch.dtype:
        return self.backbone.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------------------------------ latents
    def _decoder(self) -> nn.Module:
        """The decoder under the LM head (LoRA layers included when wrapped): the passes that only need hidden
        states skip the vocabulary projection."""
        return unwrap_student(self.backbone).base_model

    def _last_hidden(self, out) -> torch.Tensor:
        return out.hidden_states[-1]  # after the final norm (transformers 5), as the LM head reads it

    def _hidden(self, emb: torch.Tensor, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, P+M, d) of prefix embeddings `emb` (B, P, d) then latents `e` (B, M, d),
        `mask` (B, P+M), the prefix recomputed (no cache)."""
        out = self._decoder()(
            inputs_embeds=torch.cat([emb, e], 1),
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
            use_cache=False,
            output_hidden_states=True,
        )
        return self._last_hidden(out)

    def latents(
        self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, *, use_cache: bool = True
    ) -> torch.Tensor:
        """e_T (B, M, d) for a left-padded prefix (B, P) (see the module docstring); use_cache=False
        recomputes the prefix in every pass (the reference the cached path must equal)."""
        B, P = prefix_ids.shape
        M, dtype = self.tokens, self._dtype()
        e = self.head.init.to(dtype).unsqueeze(0).expand(B, M, -1)  # (B, M, d)
        if self.iterations == 0 or M == 0:
            return e
        if bool((prefix_mask[:, -1] == 0).any()):
            raise KvdistillError(
                "the prefix must be left-padded (its last column real in every sample)",
                "tokenize the questions with padding_side='left'",
            )
        emb = self.embed(prefix_ids)  # (B, P, d)
        ones = prefix_mask.new_ones(B, M)
        mask = torch.cat([prefix_mask, ones], 1)  # (B, P+M)
        lat_pos = prefix_mask.sum(-1, keepdim=True) + torch.arange(M, device=prefix_ids.device)  # (B, M)
        cache = None
        if use_cache:
            out = self._decoder()(
                inputs_embeds=emb,
                attention_mask=prefix_mask,
                position_ids=positions_from_mask(prefix_mask),
                use_cache=True,
                output_hidden_states=True,
            )
            h_q = self._last_hidden(out)[:, -1]  # (B, d)
            cache = returned_cache(out)
        cache_kw = cache_argument(self._decoder())
        for _ in range(self.iterations):
            if cache is not None:
                out = self._decoder()(
                    inputs_embeds=e,
                    attention_mask=mask,
                    position_ids=lat_pos,
                    use_cache=True,
                    output_hidden_states=True,
                    **{cache_kw: cache},
                )
                h = self._last_hidden(out)  # (B, M, d)
                if not _crop_to(cache, P):
                    cache = None  # the next passes recompute the prefix
            else:
                full = self._hidden(emb, e, mask)  # (B, P+M, d)
                h_q, h = full[:, P - 1], full[:, P:]
            shifted = torch.cat([h_q[:, None], h[:, :-1]], 1)  # (B, M, d): slot m reads slot m-1
            e = self.head.project(shifted).to(dtype)
        return e

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        suffix_ids: torch.Tensor,
        suffix_mask: torch.Tensor,
        *,
        pad_id: int,
        geometry=None,
        hidden_states: bool = False,
        logits: bool = True,
    ):
        """The student-mode pass: a `KVCapture` of the (B, P+M+S) columns (K/V pre-rotation; the latent slots
        are columns P .. P+M-1; their input_ids are `pad_id`, never read)."""
        B, P = prefix_ids.shape
        M = self.tokens
        e = self.latents(prefix_ids, prefix_mask)  # (B, M, d)
        embeds = torch.cat([self.embed(prefix_ids), e, self.embed(suffix_ids)], 1)  # (B, P+M+S, d)
        ids = torch.cat([prefix_ids, prefix_ids.new_full((B, M), pad_id), suffix_ids], 1)
        mask = torch.cat([prefix_mask, prefix_mask.new_ones(B, M), suffix_mask], 1)
        return forward_kv(
            self.backbone,
            ids,
            mask,
            geometry=geometry,
            inputs_embeds=embeds,
            logits=logits,
            hidden_states=hidden_states,
        )

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        prompt_ids: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_id: int | None = None,
        use_cache: bool = True,
        latents: torch.Tensor | None = None,
    ) -> dict:
        """Greedy answers in latent mode: prefix (B, P) left-padded, the latents, then `prompt_ids` (B, Q)
        (the same number of tokens in every sample, e.g. 'Answer:'), then up to `max_new_tokens` tokens (B, N)
        (after an eos, eos is repeated). Returns {tokens (B, N), seconds, latent_passes, latents (B, M, d):
        those the answer read}; use_cache=False
        recomputes the whole sequence for every token (the reference). `latents` (B, M, d): answer from these
        instead of the prefix's own (the swap probe, `kvdistill.eval.decode.latent_swap_exact_match`)."""
        t0 = time.perf_counter()
        B, P = prefix_ids.shape
        M = self.tokens
        if latents is None:
            e = self.latents(prefix_ids, prefix_mask, use_cache=use_cache)
        elif latents.shape != (B, M, self.head.init.shape[-1]):
            raise KvdistillError(
                f"latents of shape {tuple(latents.shape)} for a batch of {B} with {M} latent slots",
                f"pass latents of shape ({B}, {M}, {self.head.init.shape[-1]})",
            )
        else:
            e = latents.to(self._dtype())
        embeds = torch.cat([self.embed(prefix_ids), e, self.embed(prompt_ids)], 1)  # (B, P+M+Q, d)
        mask = torch.cat([prefix_mask, prefix_mask.new_ones(B, M + prompt_ids.shape[1])], 1)
        done = torch.zeros(B, dtype=torch.bool, device=prefix_ids.device)
        new: list[torch.Tensor] = []
        cache = None
        cache_kw = cache_argument(self.backbone)
        step_in = embeds
        for _ in range(max_new_tokens):
            if use_cache:
                pos = positions_from_mask(mask)[:, -step_in.shape[1] :]
                out = self.backbone(
                    inputs_embeds=step_in,
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=True,
                    **({cache_kw: cache} if cache is not None else {}),
                )
                cache = returned_cache(out)
            else:
                out = self.backbone(
                    inputs_embeds=step_in,
                    attention_mask=mask,
                    position_ids=positions_from_mask(mask),
                    use_cache=False,
                )
            token = out.logits[:, -1].argmax(-1)  # (B,)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
            new.append(token)
            emb = self.embed(token[:, None])  # (B, 1, d)
            step_in = emb if use_cache else torch.cat([step_in, emb], 1)
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            if eos_id is not None and bool(done.all()):
                break
        tokens = torch.stack(new, 1) if new else prefix_ids.new_zeros(B, 0)
        if prefix_ids.is_cuda:
            torch.cuda.synchronize()
        return {
            "tokens": tokens,
            "seconds": time.perf_counter() - t0,
            "latent_passes": self.iterations + 1,
            "latents": e,
        }

    @torch.no_grad()
    def read_latents(
        self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """(B, M) token ids: the LM head's top token at each hidden state a latent slot is projected from in
        the next Jacobi pass (slot 0: the question's last position, slot m: latent m-1), with `latents` (B,
        M, d) after the left-padded prefix (B, P): the latents read as words (CODI reads its continuous
        thoughts through the LM head too)."""
        B, P = prefix_ids.shape
        M = self.tokens
        if M == 0:
            return prefix_ids.new_zeros(B, 0)
        mask = torch.cat([prefix_mask, prefix_mask.new_ones(B, M)], 1)
        h = self._hidden(self.embed(prefix_ids), latents.to(self._dtype()), mask)[:, P - 1 : P + M - 1]
        return self.backbone.get_output_embeddings()(h).argmax(-1)  # (B, M)

    # ------------------------------------------------------------------------------------------ saving
    def save_head(self, out_dir: str | Path) -> None:
        """latent.json and latent.safetensors into `out_dir` (next to the saved backbone)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        (out / HEAD_CONFIG).write_text(
            json.dumps(
                {
                    "tokens": self.tokens,
                    "iterations": self.iterations,
                    "projection": self.head.projection,
                    "head": self.head.head,
                    "hidden_size": self.head.hidden_size,
                },
                indent=1,
            )
        )
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
            str(out / HEAD_WEIGHTS),
        )


def is_latent_student(student_dir: str | Path) -> bool:
    return (Path(student_dir) / HEAD_CONFIG).is_file()


def load_latent_student(student_dir: str | Path, *, device=None, attn_implementation: str = "sdpa"):
    """(LatentStudent, tokenizer) from a saved latent student directory, in eval mode."""
    from safetensors.torch import load_file

    from kvdistill.models.load import load_model

    student_dir = Path(student_dir)
    if not is_latent_student(student_dir):
        raise KvdistillError(
            f"'{student_dir}' holds no {HEAD_CONFIG}: it is not a latent student",
            "pass the student directory of a run with a student.latent section",
        )
    meta = json.loads((student_dir / HEAD_CONFIG).read_text())
    backbone, tokenizer = load_model(str(student_dir), device=device, attn_implementation=attn_implementation)
    kind = meta.get("head", "identity")  # heads saved before embed_norm existed are identity heads
    head = LatentHead(
        meta["hidden_size"],
        meta["tokens"],
        meta["projection"],
        head=kind,
        embed_rms=1.0 if kind == "embed_norm" else None,
    )  # the gain is then loaded
    head.load_state_dict(load_file(str(student_dir / HEAD_WEIGHTS)))
    model = LatentStudent(backbone, head.to(next(backbone.parameters()).device), meta["iterations"])
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------- student-mode batch
@dataclass
class LatentView:
    """The student-mode batch (CPU): prefix ids/mask (B, P) left-padded, suffix ids/mask (B, S) right-padded,
    answer_mask (B, P+M+S) the predictions of the answer CE (the last column before the suffix and the
    suffix), pre_answer (B,) the column of the token before the answer."""

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    answer_mask: torch.Tensor
    pre_answer: torch.Tensor


def latent_view(tokenizer, segs: list[Segments], tokens: int) -> LatentView:
    """Tokenize prefixes (with the tokenizer's BOS) and suffixes (without) for `tokens` latent slots
    (`tokenize`: byte spans; a part that tokenizes to nothing is refused)."""
    pre = tokenize(tokenizer, [s.prefix for s in segs], padding_side="left")
    suf = tokenize(tokenizer, [s.suffix for s in segs], padding_side="right", add_special_tokens=False)
    B, P = pre["input_ids"].shape
    S = suf["input_ids"].shape[1]
    M = tokens
    answer = torch.zeros(B, P + M + S, dtype=torch.long)
    answer[:, P + M - 1] = 1  # the last latent (or prefix token) predicts the suffix's first token
    answer[:, P + M :] = suf["attention_mask"]
    pre_answer = []
    for b, s in enumerate(segs):
        at = s.byte(s.answer_start) - s.byte(s.suffix_start)  # the answer's byte offset in the suffix
        ends = suf["offset_mapping"][b, :, 1]  # byte spans
        before = ((ends <= at) & (ends > 0) & suf["attention_mask"][b].bool()).nonzero().flatten()
        pre_answer.append(P + M + int(before.max()) if len(before) else P + M - 1)
    return LatentView(
        pre["input_ids"],
        pre["attention_mask"],
        suf["input_ids"],
        suf["attention_mask"],
        answer,
        torch.tensor(pre_answer),
    )
