"""kvdistill.data: records from files (jsonl/csv/parquet/text) or generated GSM-Symbolic / arithmetic /
sorting problems and mixtures of them labelled by skill."""

from kvdistill.data.arith import arithmetic_problem, arithmetic_records
from kvdistill.data.gsm import gsm_symbolic_records
from kvdistill.data.records import batches, collate_records, load_records
from kvdistill.data.skills import skill_records
from kvdistill.data.sorting import sorting_records
from kvdistill.data.template import render_template

__all__ = [
    "arithmetic_problem",
    "arithmetic_records",
    "batches",
    "collate_records",
    "gsm_symbolic_records",
    "load_records",
    "render_template",
    "skill_records",
    "sorting_records",
]
