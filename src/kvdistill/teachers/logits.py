"""A teacher's next-token distributions kept sparse: its top-k log-probabilities and the log-mass of the rest (the
tail) at each temperature a loss reads, what an offline cache stores and a cached teacher gives back.

Notation: B batch, T teacher tokens, V vocabulary, k kept entries per position, n stored temperatures.

At every position the teacher's logits z (V,) are kept as
    values (k,)   log softmax(z)_v of the k most probable tokens, descending (temperature 1)
    index  (k,)   their token ids
    shift  (n,)   logsumexp(z)/τ − logsumexp(z/τ) for each stored τ
    tail   (n,)   log Σ_{v ∉ top-k} softmax(z/τ)_v for each stored τ (−inf where k = V)
The top-k set is the same at every τ (softening keeps the order), and log softmax(z/τ)_v = values_v/τ + shift_τ, so
the distribution at a stored τ is exact: the top-k entries values/τ + shift_τ and the tail bucket tail_τ
(`TeacherLogits.at`). Both are stored rather than one derived from the other: 1 − (top-k mass) loses every digit
of a tail near 0, 1 − (tail) every digit of a small top-k mass (a flat teacher). At a τ that is not stored the tail's
mass is unknown (it depends on the tail's own shape), which is why the temperatures are chosen when the cache is
written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kvdistill.errors import KvdistillError

_ROW_BYTES = 1 << 28  # float32 bytes of logits handled per chunk by `topk_logprobs` (256 MiB)


@dataclass(frozen=True)
class LogitSpec:
    """What is kept of a teacher's distributions: `top_k` entries (at most the vocabulary), values stored in `dtype`,
    token ids in the smallest integer dtype that holds `vocab_size` ids, the tail at `temperatures`."""

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
        return {"top_k": self.k, "dtype": self.dtype, "index_dtype": self.index_dtype,
                "temperatures": [float(t) for t in self.temperatures], "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, d: dict) -> LogitSpec:
        return cls(int(d["top_k"]), str(d["dtype"]), tuple(float(t) for t in d["temperatures"]), int(d["vocab_size"]))


@torch.no_grad()
def topk_logprobs(logits: torch.Tensor, k: int, temperatures: tuple[float, ...] | list[float],
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse form of logits (B, T, V): values (B, T, k) float32 log-probabilities at τ = 1 (descending), index
    (B, T, k) int64, shift and tail (B, T, n) float32 at each of the n temperatures (module docstring).

    Computed in chunks of rows (at most ~256 MiB of float32 logits at a time), so no (B, T, V) float32 copy is made;
    rows where `mask` (B, T) is 0 are skipped (zeros)."""
    B, T, V = logits.shape
    k = min(k, V)
    temps = [float(t) for t in temperatures]
    rows = logits.reshape(B * T, V)
    values = torch.zeros(B * T, k, dtype=torch.float32, device=logits.device)
    index = torch.zeros(B * T, k, dtype=torch.long, device=logits.device)
    shift = torch.zeros(B * T, len(temps), dtype=torch.float32, device=logits.device)
    tail = torch.zeros(B * T, len(temps), dtype=torch.float32, device=logits.device)
    live = None if mask is None else mask.reshape(B * T).bool().nonzero().squeeze(1)  # rows to compute
    n_rows = B * T if live is None else live.numel()
    step = max(1, _ROW_BYTES // (4 * V))
    for lo in range(0, n_rows, step):
        at = torch.arange(lo, min(lo + step, n_rows), device=logits.device) if live is None else live[lo:lo + step]
        z = rows.index_select(0, at).float()  # (r, V)
        top, idx = z.topk(k, dim=-1)  # (r, k), descending
        lse = torch.logsumexp(z, -1)  # (r,)
        values[at] = top - lse[:, None]
        index[at] = idx
        rest = z.scatter(-1, idx, -math.inf)  # (r, V) the tail's logits
        for n, tau in enumerate(temps):
            lse_tau = torch.logsumexp(z / tau, -1)  # (r,)
            shift[at, n] = lse / tau - lse_tau
            tail[at, n] = torch.logsumexp(rest / tau, -1) - lse_tau
    n = len(temps)
    return values.view(B, T, k), index.view(B, T, k), shift.view(B, T, n), tail.view(B, T, n)


@dataclass
class TeacherLogits:
    """A batch of sparse teacher distributions (layout in the module docstring), right-padded: values (B, T, k)
    float, index (B, T, k) int64, shift and tail (B, T, n) float32 at `temperatures`, mask (B, T) 1 on real tokens."""

    values: torch.Tensor
    index: torch.Tensor
    shift: torch.Tensor
    tail: torch.Tensor
    temperatures: tuple[float, ...]
    mask: torch.Tensor

    def at(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p_τ of the top-k (B, T, k), log tail mass (B, T)) at a stored temperature τ, float32: values/τ +
        shift_τ and tail_τ (exact up to the storage rounding of the values, see the module docstring)."""
        n = self._slot(temperature)
        top = self.values.float() / temperature + self.shift[..., n, None].float()  # (B, T, k)
        return top, self.tail[..., n].float()

    def _slot(self, temperature: float) -> int:
        for n, t in enumerate(self.temperatures):
            if math.isclose(t, temperature, rel_tol=1e-6):
                return n
        raise KvdistillError(
            f"the cached top-k log-probabilities hold the tail mass at temperatures {list(self.temperatures)}, "
            f"not at {temperature}: the tail's mass at another temperature cannot be recovered from the top-k",
            "re-extract the cache with that temperature in teachers.N.logits.temperatures "
            "(`kvdistill extract ... --logits-temperatures`), or train at a stored temperature")

    def map(self, fn) -> TeacherLogits:
        """The same record with fn applied to each tensor (e.g. a device copy)."""
        return replace(self, values=fn(self.values), index=fn(self.index), shift=fn(self.shift), tail=fn(self.tail),
                       mask=fn(self.mask))
