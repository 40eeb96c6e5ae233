"""What `kvdistill inspect` shows of a student and its teachers before any training, from their configs and
tokenizers alone (no weights): each model's KV geometry, how a text tokenizes (tokens with UTF-8 byte spans),
and the alignment plan from the student to each teacher (`kvdistill.align.plan`) with the token alignment of
the text.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def inspect_models(
    models: list[str], text: str | None = None, strategy: str = "ratio", projector: str = "auto"
) -> list[dict]:
    """Geometry of each model, the tokenization of `text`, and the plan from the first (student) to the
    others."""
    from kvdistill.align.plan import alignment_plan
    from kvdistill.align.tokens import token_alignment
    from kvdistill.models.capture import tokenize
    from kvdistill.models.geometry import geometry_of
    from kvdistill.models.load import load_config, load_tokenizer

    entries, geometries, spans = [], [], []
    for name in models:
        geometry = geometry_of(load_config(name), name=name)
        entry = geometry.to_dict()
        entry["kv_bytes_per_token"] = geometry.kv_bytes_per_token(2)
        if text is not None:
            tokenizer = load_tokenizer(name)
            enc = tokenize(tokenizer, [text])
            ids = enc["input_ids"][0].tolist()
            byte_spans = enc["offset_mapping"][0]  # (T, 2) UTF-8 byte [start, end) of the text
            entry["tokens"] = [
                {"id": i, "token": tokenizer.convert_ids_to_tokens(i), "span": s}
                for i, s in zip(ids, byte_spans.tolist(), strict=True)
            ]
            spans.append(byte_spans)
        entries.append(entry)
        geometries.append(geometry)
    for i in range(1, len(entries)):
        plan = alignment_plan(geometries[0], geometries[i], strategy=strategy, projector=projector)
        if text is not None:
            align = token_alignment(spans[0], spans[i]).to_dense()  # (T_s, T_t)
            plan["token_alignment"] = {
                "student_tokens": len(spans[0]),
                "teacher_tokens": len(spans[i]),
                "aligned_student_tokens": int((align.sum(dim=1) > 0).sum()),
                "nonzeros": int((align > 0).sum()),
            }
        entries[i]["plan_from_student"] = plan
    return entries


def show_inspection(entries: list[dict], text: str | None, out: Console) -> None:
    """Print `inspect_models`' entries for a person: the geometry table, each model's tokens of `text`, and
    the plan from the student to each teacher."""
    out.print(geometry_table(entries))
    for e in entries:
        if "tokens" in e:
            out.print(f"\n[bold]{escape(e['name'])}[/bold]: {len(e['tokens'])} tokens")
            out.print(token_text(e["tokens"], text))
    for e in entries[1:]:
        plan = e["plan_from_student"]
        p = plan["projector"]
        out.print(f"\n[bold]{escape(entries[0]['name'])} (student) ← {escape(e['name'])} (teacher)[/bold]")
        out.print(
            f"  layer map ({plan['layer_map']['strategy']}, student←teacher): "
            + pairs_text(plan["layer_map"]["pairs"])
        )
        out.print(
            f"  projector: {p['kind']} (H_kv {p['from']['num_kv_heads']}×D {p['from']['head_dim']} → "
            f"H_kv {p['to']['num_kv_heads']}×D {p['to']['head_dim']}), {p['params_total']:,} parameters "
            f"for keys+values over {plan['layer_map']['mapped_student_layers']} layers"
        )
        if "token_alignment" in plan:
            ta = plan["token_alignment"]
            out.print(
                f"  tokens: {ta['student_tokens']} student vs {ta['teacher_tokens']} teacher; "
                f"{ta['aligned_student_tokens']} student tokens aligned, {ta['nonzeros']} non-zeros"
            )


def geometry_table(entries: list[dict]) -> Table:
    """The KV geometry with one column per model and one row per property (fits 80 columns for three models;
    long names and values wrap rather than being cut)."""
    table = Table("", *(escape(e["name"]) for e in entries), title="KV geometry", show_lines=False)
    for column in table.columns:
        column.overflow = "fold"
    rows = [
        ("type", lambda e: e["model_type"]),
        ("layers", lambda e: e["num_layers"]),
        ("heads / KV heads", lambda e: f"{e['num_attention_heads']} / {e['num_kv_heads']}"),
        ("head dim", lambda e: e["head_dim"]),
        ("hidden", lambda e: e["hidden_size"]),
        ("vocab", lambda e: f"{e['vocab_size']:,}"),
        ("positions", _rope_text),
        ("sliding window", lambda e: e["sliding_window"] or "-"),
        ("KV bytes/token", lambda e: f"{e['kv_bytes_per_token']:,} (bf16)"),
    ]
    for label, cell in rows:
        table.add_row(label, *(escape(str(cell(e))) for e in entries))
    return table


def _rope_text(e: dict) -> str:
    rope = e.get("rope")
    if rope is None:
        return "learned"
    return f"{rope['style']}, d={rope['rotary_dim']}, θ={_short_theta(rope['theta'])}"


def token_text(tokens: list[dict], text: str) -> Text:
    """The tokens as the text they cover (their UTF-8 byte spans of `text`), separated by spaces (in
    alternating colours on a terminal), with spaces inside a token shown as '·' and line breaks as '⏎'; a
    token covering no text (BOS, EOS) by its name in brackets."""
    raw = text.encode("utf-8")
    shown = Text()
    for n, t in enumerate(tokens):
        start, end = t["span"]
        if end > start:
            piece = raw[start:end].decode("utf-8", errors="replace").replace(" ", "·").replace("\n", "⏎")
        else:
            piece = f"[{t['token']}]"
        shown.append(piece, style="cyan" if n % 2 else "")
        shown.append(" ")  # lines wrap at token boundaries
    return shown


def pairs_text(pairs: list[dict]) -> str:
    """describe_layer_map pairs as text: `0←0, 1←9(0.33)+10(0.67), 2←-` (- for an unsupervised layer)."""
    parts = []
    for p in pairs:
        src = p["teacher"]
        if not src:
            text = "-"
        elif len(src) == 1:
            text = str(src[0][0])
        else:
            text = "+".join(f"{j}({w:.2f})" for j, w in src)
        parts.append(f"{p['student']}←{text}")
    return ", ".join(parts)


def _short_theta(theta) -> str:
    if isinstance(theta, list):
        distinct = sorted(set(theta))
        return "/".join(f"{t:g}" for t in distinct) + " per layer"
    return f"{theta:g}"
