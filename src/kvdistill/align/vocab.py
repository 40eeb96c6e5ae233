"""The token strings two vocabularies share: the buckets that make a teacher's next-token distribution
comparable with the student's across tokenizers (`kvdistill.losses.cross_logit_kd`).

Notation: V_s / V_t student / teacher vocabulary (the models' logit widths, which may exceed the tokenizers'
by padded rows), S shared strings.

Every vocabulary entry gets a key: the UTF-8 bytes its token spells (`kvdistill.align.bytes.token_bytes`:
GPT-2's 'Ġthe' and Llama-2's '▁the' both spell b' the'), or for a special token its role (the end-of-text
tokens of two tokenizers are one event, whatever their names) or else its literal name ('<|im_start|>' matches
'<|im_start|>'). The keys present on both sides are the S shared buckets 0..S-1 (in the student's id order);
every other entry, padded rows, the unknown token and the padding token included, goes to bucket S, "other".
Several entries of one side with one key (SentencePiece's '▁' and '<0x20>' both spell a space) share their
bucket: the projected probability of a bucket is the total probability of spelling that string next.

The projection is exact as a coarsening (the divergence of the projected distributions is at most that of any
finer common partition), and it is the identity for one tokenizer; what it cannot know is that two tokenizers
split text differently, so "the next token spells ' the'" is the same text event only up to segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvdistill.align.bytes import token_bytes
from kvdistill.errors import KvdistillError

__all__ = ["VocabProjection", "shared_vocabulary", "token_keys"]


@dataclass(frozen=True)
class VocabProjection:
    """student (V_s,), teacher (V_t,) long: the bucket of every entry, in [0, shared]; bucket `shared` =
    other."""

    student: torch.Tensor
    teacher: torch.Tensor
    shared: int

    def to(self, device) -> VocabProjection:
        return VocabProjection(self.student.to(device), self.teacher.to(device), self.shared)


def token_keys(tokenizer, size: int) -> list[bytes | tuple[str, str] | None]:
    """The key of every id in [0, size): its bytes, ('role', 'eos'|'bos') for those special tokens,
    ('special', name) for another special token, None for unknown / padding tokens and ids beyond the
    tokenizer."""
    n = min(size, len(tokenizer))
    keys: list = token_bytes(tokenizer, range(n)) + [None] * (size - n)
    roles = {getattr(tokenizer, f"{r}_token_id", None): r for r in ("bos", "eos")}
    dropped = {getattr(tokenizer, f"{r}_token_id", None) for r in ("unk", "pad")} - set(roles)
    names = tokenizer.convert_ids_to_tokens([i for i in tokenizer.all_special_ids if i < n])
    for i, name in zip([i for i in tokenizer.all_special_ids if i < n], names, strict=True):
        keys[i] = ("role", roles[i]) if i in roles else ("special", str(name))
    for i in dropped:
        if i is not None and i < n:
            keys[i] = None
    return keys


def shared_vocabulary(
    student_tokenizer, teacher_tokenizer, student_size: int, teacher_size: int, teacher_name: str = "teacher"
) -> VocabProjection:
    """The bucket of every student entry (student_size, the student's logit width) and teacher entry
    (teacher_size) by shared key; raises when the two vocabularies share no string (nothing to compare)."""
    s_keys = token_keys(student_tokenizer, student_size)
    t_keys = token_keys(teacher_tokenizer, teacher_size)
    common = set(s_keys) & set(t_keys)
    common.discard(None)
    if not common:
        raise KvdistillError(
            f"the student's and teacher {teacher_name!r}'s vocabularies share no token string, so their "
            "next-token "
            "distributions have no event in common",
            f"set losses.logit_kd.weight: 0 (or drop teacher '{teacher_name}'); its K/V are still aligned by "
            "bytes",
        )
    bucket: dict = {}
    for key in s_keys:  # buckets in the student's id order
        if key in common and key not in bucket:
            bucket[key] = len(bucket)
    S = len(bucket)
    student = torch.tensor([bucket.get(k, S) for k in s_keys], dtype=torch.long)  # (V_s,)
    teacher = torch.tensor([bucket.get(k, S) for k in t_keys], dtype=torch.long)  # (V_t,)
    return VocabProjection(student, teacher, S)
