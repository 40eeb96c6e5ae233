"""`kvdistill eval`: evaluate a saved student on held-out data, optionally against teachers."""

from __future__ import annotations

from pathlib import Path

from kvdistill.config import DataConfig, load_config
from kvdistill.models.load import load_model


def held_out(data: str, size: int, max_length: int, config: Path | None) -> tuple[DataConfig, list[dict], list[dict]]:
    """(data config, probe-fit records, held-out records) — the eval split of a run's data, never its train split."""
    from kvdistill.data import load_records

    if config is not None:
        dcfg = load_config(config).data
    elif data == "gsm_symbolic":
        dcfg = DataConfig(source="gsm_symbolic", size=max(size, 64), eval_size=size, max_length=max_length)
    else:
        suffix = Path(data).suffix.lstrip(".")
        source = {"jsonl": "jsonl", "json": "jsonl", "csv": "csv", "parquet": "parquet", "txt": "text"}.get(suffix)
        if source is None:
            from kvdistill.errors import KvdistillError

            raise KvdistillError(f"--data '{data}': unknown file type '.{suffix}'",
                                 "use .jsonl, .csv, .parquet or .txt, or gsm_symbolic")
        dcfg = DataConfig(source=source, path=data, size=10**9, eval_size=size, max_length=max_length)
    eval_records = load_records(dcfg, split="eval")
    fit_records = load_records(dcfg, split="train")[: max(len(eval_records), 16)]
    return dcfg, fit_records, eval_records


def evaluate_student(model, tokenizer, teachers: dict, fit_records, eval_records, *, max_length: int,
                     em: bool = True) -> dict:
    from kvdistill.eval.metrics import exact_match, perplexity, probe_kv_error

    model.eval()
    out = {"perplexity": perplexity(model, tokenizer, eval_records, max_length=max_length)}
    if em:
        out["exact_match"] = exact_match(model, tokenizer, eval_records)
    out["probe_kv_error"] = {}
    for name, (t_model, t_tok) in teachers.items():
        layers = probe_kv_error(model, tokenizer, t_model, t_tok, fit_records, eval_records, max_length=max_length)
        out["probe_kv_error"][name] = {"mean": sum(layers) / len(layers), "layers": layers}
    return out


def evaluate_checkpoint(checkpoint: str, *, data: str = "gsm_symbolic", config: Path | None = None,
                        teachers: list[str] = (), size: int = 32, max_length: int = 256, em: bool = True) -> dict:
    dcfg, fit, held = held_out(data, size, max_length, config)
    names = list(teachers)
    if config is not None and not names:
        names = [t.model for t in load_config(config).teachers if t.source == "online"]
    loaded = {n: load_model(n) for n in names}
    model, tok = load_model(checkpoint)
    result = evaluate_student(model, tok, loaded, fit, held, max_length=dcfg.max_length, em=em)
    result["checkpoint"] = str(checkpoint)
    result["samples"] = len(held)
    return result


def markdown_table(result: dict) -> str:
    lines = ["| metric | value |", "|---|---|",
             f"| held-out perplexity | {result['perplexity']['ppl']:.3f} |",
             f"| held-out CE (nats/token) | {result['perplexity']['ce']:.4f} |"]
    if "exact_match" in result:
        em = result["exact_match"]
        lines.append(f"| exact match | {em['exact_match']:.3f} ({em['n']} samples) |")
    for name, err in result.get("probe_kv_error", {}).items():
        per_layer = ", ".join(f"{x:.3f}" for x in err["layers"])
        lines.append(f"| KV probe error vs {name} (1-R², mean; per layer) | {err['mean']:.3f}; {per_layer} |")
    return "\n".join(lines)
