"""The `data` section of a run configuration: where the records come from and how they split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kvdistill.config.section import Section

GENERATED = (
    "gsm_symbolic",
    "arithmetic",
    "sorting",
    "skills",
)  # data sources generated from data.size and seed


class DataConfig(Section):
    """Where the records come from and how they split (kvdistill.data.records).

    `source`: a file format read from `path` (jsonl, csv, parquet, text); `hf`, a Hugging Face dataset read
    through the `datasets` library (`path`: a hub id, a directory written by `save_to_disk`, or a folder of
    data files; in the Python API also an in-memory `datasets.Dataset` passed to `train(..., dataset=)`); or a
    generator needing no path: `gsm_symbolic` (GSM-Symbolic word problems, reasoning_gym), `arithmetic` (2-4
    step integer arithmetic with a worked solution, from `seed` alone), `sorting` (digit sorting), or `skills`
    (a mixture of those, each record labelled with its skill). Every record of a file or dataset is used
    unless `limit` caps them; `size` is the number of generated problems. The first `eval_size` records are
    held out (the test split), the next `val_size` are the validation split (training's held-out curves, early
    stopping); train records whose question also occurs in either are dropped (logged with the count);
    `train_size` caps the train split (the first ones, after `train_skills`).
    """

    # set or not: text / template / chat mode of a file, a split asked of a one-split dataset, a source next
    # to an in-memory dataset (kvdistill.data.records)
    presence_fields = frozenset(
        {"text_field", "question_field", "cot_field", "messages_field", "split", "source"}
    )

    source: Literal[
        "jsonl", "csv", "parquet", "text", "hf", "gsm_symbolic", "arithmetic", "sorting", "skills"
    ] = "gsm_symbolic"
    path: str | None = None
    split: str = "train"
    """source hf: the dataset's split to read (a hub dataset or a saved DatasetDict)."""
    subset: str | None = None
    """source hf: the hub dataset's configuration name (load_dataset's `name`)."""
    text_field: str = "text"
    question_field: str = "question"
    cot_field: str | None = "cot"
    answer_field: str = "answer"
    messages_field: str = "messages"
    """Chat records: a list of {role, content} rendered with each model's own chat template
    (kvdistill.models.chat); the last assistant message is the answer."""
    template: str = "Question: {question}\nReasoning: {cot}\nAnswer: {answer}\n"
    """How (question, cot, answer) records become one training text; plain `text_field` records ignore it. The
    final line break ends the answer, so greedy decoding learns where an answer stops (exact match reads its
    first line)."""
    size: int | None = Field(None, gt=0)
    """Number of generated problems (gsm_symbolic, arithmetic; None: 256). Files and datasets: not read
    (limit)."""
    limit: int | None = Field(None, gt=0)
    """Files and datasets: use only this many records (drawn after shuffling with `seed`); None: all of
    them."""
    eval_size: int = Field(32, ge=0)
    val_size: int = Field(0, ge=0)
    """Validation records after the eval (test) split: with val_size > 0, training's held-out figures
    (eval_every, train.early_stopping, summary.json) come from them and the test split is left to the final
    scoring."""
    train_size: int | None = Field(None, gt=0)
    """Cap on the train split (its first records): a small labelled set drawn from a large pool whose held-out
    splits stay the same whatever the cap (generated sources are prefix-stable)."""
    seed: int = 0
    max_length: int = Field(256, gt=1)
    skills: list[Literal["arithmetic", "gsm_symbolic", "sorting"]] = []
    """`source: skills`: the generated skills mixed (each record labelled with its `skill`)."""
    mix: list[float] | None = None
    """`source: skills`: one positive proportion per skill (default equal)."""
    train_skills: list[str] | None = None
    """`source: skills`: keep only the train records of these skills (a specialist teacher); eval is the whole
    mix."""

    @model_validator(mode="after")
    def _path(self):
        generated = self.source in GENERATED
        problems = []
        if not generated and self.source != "hf" and not self.path:
            problems.append(f"data.source '{self.source}' needs data.path")
        if generated and self.size is None:
            self.size = 256
        if not generated and self.size is not None:
            problems.append(
                f"data.size ({self.size}) is the number of generated problems, but data.source "
                f"'{self.source}' reads records: every record is used; drop data.size, or cap them with "
                f"data.limit: {self.size}"
            )
        if generated and self.limit is not None:
            problems.append(
                f"data.limit caps the records of a file or dataset; data.source '{self.source}' "
                f"generates data.size problems: set data.size: {self.limit} instead"
            )
        unread = [
            k
            for k in ("split", "subset")
            if k in self.model_fields_set
            and self.source != "hf"
            and getattr(self, k) != type(self).model_fields[k].default
        ]
        problems += [
            f"data.{k} is read by data.source hf only (source is '{self.source}'); drop it" for k in unread
        ]
        if generated and self.path:
            problems.append(f"data.path is not read by the generator '{self.source}'; drop it")
        if self.source == "skills":
            if not self.skills or len(set(self.skills)) != len(self.skills):
                problems.append(
                    f"data.skills {self.skills}: source 'skills' needs distinct skills "
                    "(some of arithmetic, gsm_symbolic, sorting)"
                )
            if self.mix is not None and (
                len(self.mix) != len(self.skills) or any(not w > 0 for w in self.mix)
            ):
                problems.append(
                    f"data.mix {self.mix} must give one positive proportion per skill {self.skills}"
                )
            unknown = [s for s in self.train_skills or [] if s not in self.skills]
            if unknown or self.train_skills == []:
                problems.append(
                    f"data.train_skills {self.train_skills} must be some of data.skills {self.skills}"
                )
        else:
            given = [k for k in ("skills", "mix", "train_skills") if getattr(self, k)]
            if given:
                problems.append(
                    f"data.{', data.'.join(given)} apply only to data.source 'skills' "
                    f"(source is '{self.source}'): set data.source: skills or remove them"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self
