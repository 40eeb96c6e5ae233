"""UTF-8 byte spans of tokens, from a fast tokenizer's character offsets.

Notation: B batch, T tokens, N characters (code points) of all texts, M tokens in groups, G groups.

A fast tokenizer reports each token as a [start, end) interval of characters. A byte-level BPE (GPT-2,
SmolLM2) or a SentencePiece model with byte fallback (Llama-2) splits a character it has no token for into
several tokens, and every one of them then reports that character's span: SmolLM2 tokenizes '東京' as 'æĿ' '±'
'äº' '¬' with offsets (0,1) (0,1) (1,2) (1,2), so token alignment could only mix them. `byte_spans` gives each
token the [start, end) of the UTF-8 bytes of the text it stands for instead ('東京' -> (0,2) (2,3) (3,5)
(5,6)):

1. Character offsets become byte offsets through the texts' cumulative UTF-8 lengths, vectorised over the
batch.
   ASCII text has byte spans == character spans (but for step 3's prepended '▁').
2. A group is a run of tokens that share a character: a token whose character span starts before the furthest
   end of the tokens before it joins the group of its predecessor. A group's bytes are given out in token
   order by each token's own byte length, derived from its string (`convert_ids_to_tokens`, once per distinct
   id):
     ByteLevel decoder (GPT-2 style): each character is one byte through the GPT-2 byte-to-unicode table;
     '<0xE6>' (SentencePiece byte fallback): that one byte;
     any other piece: its UTF-8, '▁' read as a space and a WordPiece continuation prefix ('##') dropped.
   The lengths must add up to the group's bytes and put every token inside its own characters; this is
   vectorised over all groups of the batch.
3. The rare groups that fail that check go to Python, which compares the tokens' derived bytes with the text's
   bytes one token at a time. A token of spaces the text does not have there (the '▁' that a Metaspace
   pre-tokenizer prepends, which Llama-2 reports on the text's first character when it cannot merge with it)
   gets an empty span: it stands for no byte of the text.
4. Where the derived bytes still cannot be reconciled with the text (a normaliser changed it: BERT's NFD
   spells 서 as the jamo 'ᄉ' '##ᅥ', NFKC 'ﬁ' as 'f' 'i'), each character that n of the group's tokens share
   is split evenly in token order: the k-th of them gets the bytes [k·L // n, (k+1)·L // n) of the
   character's L bytes (at least one byte, so pieces
   overlap only when n > L). That is deterministic, so a tokenization aligned with itself stays the identity;
   across tokenizers it is approximate.

Tokens with an empty character span (special tokens, padding) keep an empty span, at the byte offset of their
character offset: padding (0, 0) stays (0, 0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvdistill.errors import KvdistillError

__all__ = ["byte_spans", "token_bytes"]

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68
    bytes are shifted to U+0100 onwards (' ' -> 'Ġ', '\\n' -> 'Ċ')."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, shift = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


_BYTE_OF = _gpt2_unicode_to_byte()


@dataclass(frozen=True)
class _PieceRules:
    """How a token string spells its bytes, read off the tokenizer's decoder."""

    byte_level: bool  # a ByteLevel decoder: one character per byte through `_BYTE_OF`
    prefix: str  # WordPiece continuation prefix ('##'), '' when none


def _decoder_types(state) -> list[dict]:
    """Every decoder dict of a (possibly nested Sequence) decoder state."""
    if isinstance(state, dict):
        return [state, *(d for sub in state.get("decoders") or [] for d in _decoder_types(sub))]
    return []


def _piece_rules(tokenizer) -> _PieceRules:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:
        state = json.loads(decoder.__getstate__()) if decoder is not None else {}
    except (AttributeError, TypeError, ValueError):
        state = {}
    decoders = _decoder_types(state)
    prefix = next((d.get("prefix") or "" for d in decoders if d.get("type") == "WordPiece"), "")
    return _PieceRules(byte_level=any(d.get("type") == "ByteLevel" for d in decoders), prefix=prefix)


def _candidates(piece: str | None, rules: _PieceRules) -> list[bytes]:
    """The bytes a token string may stand for, the most likely first."""
    if not piece:
        return []
    raw = piece.encode("utf-8", "surrogatepass")
    if rules.byte_level:
        try:
            return [bytes(_BYTE_OF[ch] for ch in piece), raw]
        except KeyError:  # an added token, stored as plain text
            return [raw]
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return [bytes([int(fallback[1], 16)])]
    text = piece[len(rules.prefix) :] if rules.prefix and piece.startswith(rules.prefix) else piece
    spelled = text.replace("▁", " ").encode("utf-8", "surrogatepass")
    return [spelled] if spelled == raw else [spelled, raw]


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes | None]:
    """The UTF-8 bytes each token id spells as a piece of text (byte-level BPE through GPT-2's byte table,
    SentencePiece '▁' as a space and <0xNN> as that byte, a WordPiece '##' dropped), None for an id without a
    token string. Special tokens come out as their literal text: tell them apart with the tokenizer's special
    ids."""
    rules = _piece_rules(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    out = []
    for piece in pieces:
        cands = _candidates(piece, rules) if isinstance(piece, str) else []
        out.append(cands[0] if cands else None)
    return out


# ------------------------------------------------------------------------------------------ one group
def _matched(
    data: bytes, cum: list[int], spans: list[tuple[int, int]], candidates: list[list[bytes]]
) -> list[tuple[int, int]] | None:
    """Byte spans of a group's tokens from their own bytes, or None where they do not spell the text.

    data: the text's UTF-8; spans: the G tokens' character spans, counted from the group's first character c0;
    cum[c]: the byte offset in `data` of character c0 + c.
    """
    pos, out = cum[0], []
    for (s, e), cands in zip(spans, candidates, strict=True):
        hit = next((c for c in cands if data[pos : pos + len(c)] == c), None)
        if hit is None:
            if cands and not cands[0].strip(b" "):  # a space the tokenizer prepended, not in the text
                out.append((pos, pos))
                continue
            return None
        a, z = pos, pos + len(hit)
        if not (cum[s] <= a < cum[s + 1] and cum[e - 1] < z <= cum[e]):
            return None  # the bytes lie outside the token's own characters
        out.append((a, z))
        pos = z
    return out if pos == cum[max(e for _, e in spans)] else None


def _even_split(cum: list[int], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte spans of a group's tokens with every shared character split evenly among its tokens, in order
    (cum and spans as in `_matched`)."""

    def piece(c: int, k: int) -> tuple[int, int]:
        touching = [j for j, (s, e) in enumerate(spans) if s <= c < e]  # tokens on character c, in order
        if len(touching) == 1:
            return cum[c], cum[c + 1]
        n, rank, L = len(touching), touching.index(k), cum[c + 1] - cum[c]
        a = cum[c] + rank * L // n
        return a, max(cum[c] + (rank + 1) * L // n, a + 1)

    return [(piece(s, k)[0], piece(e - 1, k)[1]) for k, (s, e) in enumerate(spans)]


# ------------------------------------------------------------------------------------------ public API
def byte_spans(tokenizer, texts: Sequence[str], input_ids, offset_mapping) -> torch.Tensor:
    """UTF-8 byte [start, end) of every token of a batch, exact below the character.

    texts: the B texts as tokenized; input_ids (B, T); offset_mapping (B, T, 2): the fast tokenizer's
    character offsets of the same call (padding (0, 0)). Returns int64 (B, T, 2) on the CPU; empty character
    spans (special tokens, padding) stay empty.
    """
    offsets, ids, lengths = _checked_inputs(texts, input_ids, offset_mapping)  # (B, T, 2), (B, T), (B,)
    to_bytes = _ByteOffsets(texts, lengths)
    spans = to_bytes(torch.arange(len(texts))[:, None, None], offsets)  # (B, T, 2) bytes of whole characters
    members = _shared_groups(offsets)
    if members is None:
        return spans
    rules = _piece_rules(tokenizer)
    distinct, which = ids.flatten()[members.index].unique(return_inverse=True)  # (U,), (M,)
    candidates = [_candidates(p, rules) for p in tokenizer.convert_ids_to_tokens(distinct.tolist())]
    ok = _fit_by_size(spans, offsets, members, candidates, which, to_bytes)  # (M,)
    if bool(ok.all()):
        return spans
    _fit_one_by_one(spans, offsets, members, ~ok, candidates, which, to_bytes)
    return spans


def _checked_inputs(
    texts: Sequence[str], input_ids, offset_mapping
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets (B, T, 2), ids (B, T), lengths (B,)) on the CPU, or an error quoting the mismatched input."""
    offsets = torch.as_tensor(offset_mapping).long().cpu().contiguous()  # (B, T, 2) characters
    ids = torch.as_tensor(input_ids).cpu()  # (B, T)
    B = len(texts)
    if offsets.numel() == 0:
        offsets = offsets.reshape(B, -1, 2)  # every text empty and no BOS: (B, 0)
    if offsets.dim() != 3 or offsets.shape[::2] != (B, 2) or tuple(ids.shape) != offsets.shape[:2]:
        raise KvdistillError(
            f"byte_spans got {B} texts, input_ids {tuple(ids.shape)} and offset_mapping "
            f"{tuple(offsets.shape)}; "
            "expected B texts, (B, T) and (B, T, 2)",
            "pass the texts with the input_ids and offset_mapping of one tokenizer call "
            "(return_offsets_mapping=True)",
        )
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)  # (B,) characters per text
    start, end = offsets[..., 0], offsets[..., 1]  # (B, T) characters
    bad = (start < 0) | (start > end) | (end > lengths[:, None])  # (B, T)
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise KvdistillError(
            f"offset_mapping[{b}, {t}] = {offsets[b, t].tolist()} is not a span of text #{b} "
            f"({int(lengths[b])} characters)",
            "pass the character offsets the tokenizer returned for these very texts",
        )
    return offsets, ids, lengths


@dataclass(frozen=True)
class _Members:
    """The M tokens of groups of two or more, over the whole batch, in ascending flat order (groups
    consecutive)."""

    index: torch.Tensor  # (M,) flat position in (B·T)
    row: torch.Tensor  # (M,) text of the batch
    g: torch.Tensor  # (M,) group index in [0, G)
    first: torch.Tensor  # (M,) bool: first member of its group
    G: int


def _shared_groups(offsets: torch.Tensor) -> _Members | None:
    """Tokens that share a character, grouped (step 2 of the module docstring); None when no token does.

    A token joins the group of its predecessor when it starts before the furthest end of the non-empty
    tokens before it.
    """
    B, T = offsets.shape[:2]
    start, end = offsets[..., 0], offsets[..., 1]  # (B, T) characters
    nonempty = end > start  # (B, T)
    reach = torch.where(nonempty, end, -1).cummax(dim=1).values  # (B, T) furthest end up to each token
    joins = nonempty & (start < F.pad(reach[:, :-1], (1, 0), value=-1))  # (B, T) shares an earlier character
    if not bool(joins.any()):
        return None
    leader = nonempty & ~joins  # (B, T) first token of each group
    gid = (
        leader.long().cumsum(1) + torch.arange(B)[:, None] * (T + 1)
    ).flatten()  # (B·T,) group, unique per row
    joined = torch.zeros(B * (T + 1) + 1, dtype=torch.bool)
    joined[gid[joins.flatten()]] = True  # groups of two or more tokens
    member = (joined[gid] & nonempty.flatten()).nonzero().flatten()  # (M,) ascending: groups are consecutive
    new_group = F.pad(gid[member][1:] != gid[member][:-1], (1, 0), value=True)  # (M,) first member of a group
    g = new_group.cumsum(0) - 1  # (M,) group index in [0, G)
    return _Members(index=member, row=member // T, g=g, first=new_group, G=int(g[-1]) + 1)


def _fit_by_size(
    spans: torch.Tensor,
    offsets: torch.Tensor,
    members: _Members,
    candidates: list[list[bytes]],
    which: torch.Tensor,
    to_bytes: _ByteOffsets,
) -> torch.Tensor:
    """Give out each group's bytes in token order by the tokens' derived byte lengths, vectorised.

    Writes the spans of the groups where the lengths add up and put every token inside its own characters
    into `spans` (B, T, 2); returns (M,) bool: the member's group was resolved.
    """
    member, row, g, G = members.index, members.row, members.g, members.G
    s_c, e_c = offsets.view(-1, 2)[member].unbind(-1)  # (M,) characters
    s_b, e_b = spans.view(-1, 2)[member].unbind(-1)  # (M,) bytes of the whole characters
    size = torch.tensor([len(c[0]) if c else 0 for c in candidates], dtype=torch.long)[which]  # (M,) bytes

    g_start = torch.full((G,), torch.iinfo(torch.long).max).scatter_reduce(0, g, s_b, "amin")  # (G,)
    g_end = torch.zeros(G, dtype=torch.long).scatter_reduce(0, g, e_b, "amax")  # (G,)
    g_size = torch.zeros(G, dtype=torch.long).index_add(0, g, size)  # (G,) derived bytes of the group
    earlier = size.cumsum(0) - size  # (M,) derived bytes of the members before, across groups
    a = g_start[g] + earlier - earlier[members.first][g]  # (M,) token order within the group
    z = a + size  # (M,)
    inside = (
        (size > 0) & (a >= s_b) & (a < to_bytes(row, s_c + 1)) & (z > to_bytes(row, e_c - 1)) & (z <= e_b)
    )
    fits = (g_size == g_end - g_start) & torch.ones(G, dtype=torch.long).scatter_reduce(
        0, g, inside.long(), "amin"
    ).bool()  # (G,)
    ok = fits[g]  # (M,)
    spans.view(-1, 2)[member[ok]] = torch.stack([a[ok], z[ok]], dim=-1)
    return ok


def _fit_one_by_one(
    spans: torch.Tensor,
    offsets: torch.Tensor,
    members: _Members,
    todo: torch.Tensor,
    candidates: list[list[bytes]],
    which: torch.Tensor,
    to_bytes: _ByteOffsets,
) -> None:
    """Steps 3 and 4 for the members in `todo` (M,) bool, one group at a time: match the tokens' bytes
    against the text's, else split shared characters evenly; writes their spans into `spans` (B, T, 2)."""
    rest = todo.nonzero().flatten().tolist()  # positions in `members`, groups consecutive
    g_rest, row_rest = members.g[rest].tolist(), members.row[rest].tolist()
    which_rest = which[rest].tolist()
    char_spans = offsets.view(-1, 2)[members.index[rest]].tolist()
    found: list[tuple[int, int]] = []
    i = 0
    while i < len(rest):
        j = i + 1
        while j < len(rest) and g_rest[j] == g_rest[i]:
            j += 1
        b = row_rest[i]
        c0 = min(s for s, _ in char_spans[i:j])  # the group's first character
        group = [(s - c0, e - c0) for s, e in char_spans[i:j]]  # G character spans, counted from c0
        local = to_bytes.of_text(b, c0, c0 + max(e for _, e in group))  # byte offset of character c0 + c
        matched = _matched(to_bytes.utf8(b), local, group, [candidates[u] for u in which_rest[i:j]])
        found += matched or _even_split(local, group)
        i = j
    spans.view(-1, 2)[members.index[rest]] = torch.tensor(found, dtype=torch.long)  # (M_rest, 2)


class _ByteOffsets:
    """Character offsets -> byte offsets of a batch of texts, through the cumulative UTF-8 lengths."""

    def __init__(self, texts: Sequence[str], lengths: torch.Tensor):
        self.texts, self._utf8 = texts, {}
        self.base = F.pad(lengths.cumsum(0), (1, 0))  # (B + 1,) first character of each text, joined
        self.cum = None  # ASCII: one byte per character
        if not all(t.isascii() for t in texts):
            utf32 = bytearray("".join(texts).encode("utf-32-le", "surrogatepass"))
            cp = torch.frombuffer(utf32, dtype=torch.int32)  # (N,) code points of all texts, joined
            size = 1 + (cp >= 0x80).long() + (cp >= 0x800).long() + (cp >= 0x10000).long()  # (N,) UTF-8 bytes
            self.cum = F.pad(size.cumsum(0), (1, 0))  # (N + 1,) bytes before each character, joined

    def __call__(self, rows: torch.Tensor, chars: torch.Tensor) -> torch.Tensor:
        """Bytes before character `chars` of text `rows` (broadcast)."""
        if self.cum is None:
            return chars.clone()
        first = self.base[rows]
        return self.cum[first + chars] - self.cum[first]

    def of_text(self, b: int, c0: int, c1: int) -> list[int]:
        """Byte offsets of characters c0..c1 (inclusive) of text b."""
        if self.cum is None:
            return list(range(c0, c1 + 1))
        at = int(self.base[b])
        return (self.cum[at + c0 : at + c1 + 1] - self.cum[at]).tolist()

    def utf8(self, b: int) -> bytes:
        if b not in self._utf8:
            self._utf8[b] = self.texts[b].encode("utf-8", "surrogatepass")
        return self._utf8[b]
