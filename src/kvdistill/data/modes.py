"""How a file or dataset row becomes a record (the record: `kvdistill.data.records`).

A row becomes a record in one of three ways:

- chat mode: the row's `data.messages_field` is a conversation, a list of {"role", "content"}; the record's
text
  is a `kvdistill.models.chat.ChatText` (the contents as "role: content" lines, carrying the messages), which
  every model reads in its own chat template, aligned on the contents; the last message, when the assistant's,
  is the answer (`answer_start` its content's offset, `question` the shared text before it);
- text mode: the row's `data.text_field` is the text (always for `source: text`: one record per non-blank
  line); with an `data.answer_field` column too, `answer_start` is its last occurrence in the text;
- template mode: `data.question_field` / `data.cot_field` / `data.answer_field` rendered with `data.template`
  (placeholders `{question}`, `{cot}`, `{answer}`); a template line holding only `{cot}` is dropped when a
  record has no chain of thought. The default `cot` column is optional; a `cot_field` that is set is not.

Chat mode is chosen when `data.messages_field` is set, or when the rows have that column and neither a text
nor a question column; text mode when `data.text_field` is set, or when the rows have a `text_field` column
and no `question_field` column. Rows with an `id` column keep it as their id, others get `<name>:<row>`.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

from kvdistill.config import DataConfig
from kvdistill.data.rows import data_files, dataset_rows, empty_source, read_rows, source_label
from kvdistill.data.template import make_record
from kvdistill.errors import KvdistillError

logger = logging.getLogger(__name__)


def file_records(cfg: DataConfig, dataset=None) -> tuple[list[dict], str]:
    """(every record of the files or dataset in their order: line, chat, text or template mode (see the module
    docstring), a name for messages)."""
    if dataset is not None or cfg.source == "hf":
        rows, columns, name = dataset_rows(cfg, dataset)
    else:
        rows, columns = read_rows(cfg, data_files(cfg))
        name = Path(cfg.path).name
    label = f"data.path '{cfg.path}'" if cfg.path else "the dataset passed in"
    if cfg.source == "text":
        return _line_records(cfg, rows, name), label
    ids = _row_ids(cfg, rows, columns, name)
    if _is_chat_mode(cfg, columns):
        return _chat_records(cfg, rows, columns, ids), label
    if _is_text_mode(cfg, columns):
        return _text_records(cfg, rows, columns, ids), label
    return _template_records(cfg, rows, columns, ids), label


def _missing_field(cfg: DataConfig, key: str, value: str, columns: list[str]) -> KvdistillError:
    close = difflib.get_close_matches(value, columns, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return KvdistillError(
        f"data.{key} = '{value}': no such column in {source_label(cfg)}{hint} (columns: "
        f"{', '.join(columns)})",
        f"set data.{key} to one of the columns" + (f", e.g. data.{key}={close[0]}" if close else ""),
    )


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _line_records(cfg: DataConfig, rows: list[dict], name: str) -> list[dict]:
    """`source: text`: one record per non-blank line; ids count lines from 1 (blank lines are not records)."""
    records = [
        {
            "id": f"{name}:{i + 1}",
            "text": row["text"],
            "answer_start": None,
            "question": None,
            "cot": None,
            "answer": None,
        }
        for i, row in enumerate(rows)
        if row["text"].strip()
    ]
    if not records:
        raise empty_source(cfg)
    if len(records) < len(rows):
        logger.warning("%s: skipped %d blank line(s) of %d", name, len(rows) - len(records), len(rows))
    return records


def _is_chat_mode(cfg: DataConfig, columns: list[str]) -> bool:
    """Chat mode if data.messages_field is set, or the rows have that column and no text / question column
    (and neither field is set)."""
    explicit = cfg.model_fields_set
    if "messages_field" in explicit:
        return True
    return (
        cfg.messages_field in columns
        and not {"text_field", "question_field"} & explicit
        and cfg.text_field not in columns
        and cfg.question_field not in columns
    )


def _chat_records(cfg: DataConfig, rows: list[dict], columns: list[str], ids: list[str]) -> list[dict]:
    """Chat mode: each row's conversation as a `ChatText`; the last message, when the assistant's, is the
    answer."""
    from kvdistill.models.chat import ChatText

    if cfg.messages_field not in columns:
        raise _missing_field(cfg, "messages_field", cfg.messages_field, columns)
    records = []
    for i, row in enumerate(rows):
        messages = row[cfg.messages_field]
        bad = (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if bad:
            raise KvdistillError(
                f"{source_label(cfg)} row {i} (id '{ids[i]}'): {cfg.messages_field} (data.messages_field) is "
                "not a "
                f"non-empty list of {{role, content}} messages with text contents: {str(messages)[:120]}",
                "give every row a list such as [{role: user, content: ...}, {role: assistant, content: ...}]",
            )
        chat = ChatText(messages)
        last = chat.messages[-1]
        answered = last["role"] == "assistant" and last["content"].strip()
        records.append(
            {
                "id": ids[i],
                "text": chat,
                "answer_start": chat.starts[-1] if answered else None,
                "question": chat[: chat.starts[-1]] if answered else None,
                "cot": None,
                "answer": last["content"] if answered else None,
            }
        )
    return records


def _is_text_mode(cfg: DataConfig, columns: list[str]) -> bool:
    """Text mode if data.text_field is set, or the file has that column and no (unset) question column."""
    explicit = cfg.model_fields_set
    return "text_field" in explicit or (
        cfg.text_field in columns and cfg.question_field not in columns and "question_field" not in explicit
    )


def _text_records(cfg: DataConfig, rows: list[dict], columns: list[str], ids: list[str]) -> list[dict]:
    """Text mode: the text column is the text; `answer_start` is the answer column's last occurrence in it."""
    if cfg.text_field not in columns:
        raise _missing_field(cfg, "text_field", cfg.text_field, columns)
    has_answer = cfg.answer_field in columns
    records = []
    for i, row in enumerate(rows):
        text = _as_text(row[cfg.text_field])
        if text is None or not text.strip():
            raise KvdistillError(
                f"{source_label(cfg)} row {i} (id '{ids[i]}'): {cfg.text_field} is empty",
                "remove the row or give it text",
            )
        answer = _as_text(row[cfg.answer_field]) if has_answer else None
        start = text.rfind(answer) if answer else -1
        records.append(
            {
                "id": ids[i],
                "text": text,
                "answer_start": start if start >= 0 else None,
                "question": None,
                "cot": None,
                "answer": answer,
            }
        )
    return records


def _template_columns(cfg: DataConfig, columns: list[str]) -> str | None:
    """Check the question and answer columns exist; the cot column to read, or None if there is none."""
    explicit = cfg.model_fields_set
    if cfg.question_field not in columns:
        if "question_field" not in explicit and cfg.text_field not in columns:
            raise KvdistillError(
                f"{source_label(cfg)} has neither a '{cfg.text_field}' column (data.text_field) nor a "
                f"'{cfg.question_field}' column (data.question_field) (columns: {', '.join(columns)})",
                "set data.text_field to the column holding whole texts, or data.question_field / "
                "data.answer_field to the question and answer columns",
            )
        raise _missing_field(cfg, "question_field", cfg.question_field, columns)
    if cfg.answer_field not in columns:
        raise _missing_field(cfg, "answer_field", cfg.answer_field, columns)
    cot_field = cfg.cot_field
    if cot_field is not None and cot_field not in columns:
        if "cot_field" in explicit:
            raise _missing_field(cfg, "cot_field", cot_field, columns)
        cot_field = None  # the default 'cot' column is optional
    return cot_field


def _template_records(cfg: DataConfig, rows: list[dict], columns: list[str], ids: list[str]) -> list[dict]:
    """Template mode: question / cot / answer columns rendered with data.template."""
    cot_field = _template_columns(cfg, columns)
    records = []
    for i, row in enumerate(rows):
        question, answer = _as_text(row[cfg.question_field]), _as_text(row[cfg.answer_field])
        for key, value in (("question_field", question), ("answer_field", answer)):
            if value is None or not value.strip():
                raise KvdistillError(
                    f"{source_label(cfg)} row {i} (id '{ids[i]}'): {getattr(cfg, key)} (data.{key}) is empty",
                    "remove the row or fill it in",
                )
        cot = _as_text(row[cot_field]) if cot_field else None
        records.append(make_record(ids[i], question, cot, answer, cfg.template))
    return records


def _row_ids(cfg: DataConfig, rows: list[dict], columns: list[str], name: str) -> list[str]:
    if "id" not in columns:
        return [f"{name}:{i}" for i in range(len(rows))]
    ids = [_as_text(row["id"]) for row in rows]
    blank = [i for i, x in enumerate(ids) if x is None or not x.strip()]
    if blank:
        raise KvdistillError(
            f"{source_label(cfg)}: the 'id' column is empty in rows {blank[:5]}",
            "give every row an id, or drop the 'id' column to use row numbers",
        )
    seen: set[str] = set()
    dupes = sorted({x for x in ids if x in seen or seen.add(x)})
    if dupes:
        raise KvdistillError(
            f"{source_label(cfg)}: ids {dupes[:5]} occur more than once in the 'id' column",
            "make the ids unique, or drop the 'id' column to use row numbers",
        )
    return ids
