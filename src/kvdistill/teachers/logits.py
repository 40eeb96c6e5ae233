"""A teacher's next-token distributions kept sparse: its top-k log-probabilities, exact at each temperature a
loss reads, what an offline cache stores and a cached teacher gives back (the loss, `losses.topk_logit_kd`,
puts the rest of the mass in one tail bucket).

Notation: B batch, T teacher tokens, V vocabulary, k kept entries per position, n stored temperatures.

At every position the teacher's logits z (V,) are kept as
    values (k,)   log softmax(z)_v of the k most probable tokens, descending (temperature 1)
    index  (k,)   their token ids
    shift  (n,)   logsumexp(z)/τ − logsumexp(z/τ) for each stored τ
The top-k set is the same at every τ (softening keeps the order), and log softmax(z/τ)_v = values_v/τ +
shift_τ, so the top-k log-probabilities at a stored τ are exact up to the values' storage rounding
(`TeacherLogits.at`), and the tail's mass is what they leave. Renormalising the top-k alone would be wrong at
every τ, and so would 1 − (top-k mass) taken from the rounded values of a flat teacher (a top-16 mass of 3e-4
out of 49,152 tokens): the float32 shift keeps each log-probability exact. At a τ that is not stored the
normaliser logsumexp(z/τ) is unknown (it depends on the whole vocabulary), which is why the temperatures are
chosen when the cache is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kvdistill.errors import KvdistillError

_ROW_BYTES = 1 << 28  # float32 bytes of logits handled per chunk by `topk_logprobs` (256 MiB)


@dataclass(frozen=True)
class LogitSpec:
    """What is kept of a teacher's distributions: `top_k` entries (at most the vocabulary), values stored in
    `dtype`, token ids in the smallest integer dtype that holds `vocab_size` ids, normalisers at
    `temperatures`."""

    top_k: int
    dtype: str
    temperatures: tuple[float, ...]
    vocab_size: int

    @property
    def k(self) -> int:
        return min(self.top_k, self.vocab_size)

    @property
    def index_dtype(self) -> str:
        return "uint16" if self.vocab_size <= 1 << 16 else "int32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_index_dtype(self) -> torch.dtype:
        return getattr(torch, self.index_dtype)

    def to_dict(self) -> dict:
        """The manifest's `logits` entry."""
        return {
            "top_k": self.k,
            "dtype": self.dtype,
            "index_dtype": self.index_dtype,
            "temperatures": [float(t) for t in self.temperatures],
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LogitSpec:
        return cls(
            int(d["top_k"]), str(d["dtype"]), tuple(float(t) for t in d["temperatures"]), int(d["vocab_size"])
        )


@torch.no_grad()
def topk_logprobs(
    logits: torch.Tensor,
    k: int,
    temperatures: tuple[float, ...] | list[float],
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse form of logits (B, T, V): values (B, T, k) float32 log-probabilities at τ = 1 (descending),
    index (B, T, k) int64, shift (B, T, n) float32 at each of the n temperatures (module docstring).

    Computed in chunks of rows (at most ~256 MiB of float32 logits at a time), so no (B, T, V) float32 copy is
    made; rows where `mask` (B, T) is 0 are skipped (zeros)."""
    B, T, V = logits.shape
    k = min(k, V)
    temps = [float(t) for t in temperatures]
    rows = logits.reshape(B * T, V)
    values = torch.zeros(B * T, k, dtype=torch.float32, device=logits.device)
    index = torch.zeros(B * T, k, dtype=torch.long, device=logits.device)
    shift = torch.zeros(B * T, len(temps), dtype=torch.float32, device=logits.device)
    live = None if mask is None else mask.reshape(B * T).bool().nonzero().squeeze(1)  # rows to compute
    n_rows = B * T if live is None else live.numel()
    step = max(1, _ROW_BYTES // (4 * V))
    for lo in range(0, n_rows, step):
        at = (
            torch.arange(lo, min(lo + step, n_rows), device=logits.device)
            if live is None
            else live[lo : lo + step]
        )
        z = rows.index_select(0, at).float()  # (r, V)
        top, idx = z.topk(k, dim=-1)  # (r, k), descending
        lse = torch.logsumexp(z, -1)  # (r,)
        values[at] = top - lse[:, None]
        index[at] = idx
        for n, tau in enumerate(temps):
            shift[at, n] = lse / tau - torch.logsumexp(z / tau, -1)
    return values.view(B, T, k), index.view(B, T, k), shift.view(B, T, len(temps))


@dataclass
class TeacherLogits:
    """A batch of sparse teacher distributions (layout in the module docstring), right-padded: values (B, T,
    k) float, index (B, T, k) int64, shift (B, T, n) float32 at `temperatures`, mask (B, T) 1 on real tokens,
    spans (B, T, 2) the tokens' UTF-8 byte spans (every token's, whatever the K/V compression kept)."""

    values: torch.Tensor
    index: torch.Tensor
    shift: torch.Tensor
    temperatures: tuple[float, ...]
    mask: torch.Tensor
    spans: torch.Tensor

    def at(self, temperature: float, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, T, k) int64, log p_τ of them (B, T, k) float32) at a stored temperature τ: values/τ +
        shift_τ (exact up to the values' storage rounding, see the module docstring); `k`: the first k only
        (the top-k of a smaller k), None: all stored. The form `losses.topk_logit_kd` takes."""
        n = self._slot(temperature)
        k = self.values.shape[-1] if k is None else k
        return self.index[..., :k], self.values[..., :k].float() / temperature + self.shift[
            ..., n, None
        ].float()

    def _slot(self, temperature: float) -> int:
        for n, t in enumerate(self.temperatures):
            if math.isclose(t, temperature, rel_tol=1e-6):
                return n
        raise KvdistillError(
            f"the cached top-k log-probabilities are normalised at temperatures {list(self.temperatures)}, "
            "not at "
            f"{temperature}: the normaliser at another temperature needs the whole vocabulary, not the top-k",
            "re-extract the cache with that temperature in teachers.N.logits.temperatures "
            "(`kvdistill extract ... --logits-temperatures`), or train at a stored temperature",
        )

    def map(self, fn) -> TeacherLogits:
        """The same record with fn applied to each tensor (e.g. a device copy)."""
        return replace(
            self,
            values=fn(self.values),
            index=fn(self.index),
            shift=fn(self.shift),
            mask=fn(self.mask),
            spans=fn(self.spans),
        )
