"""The teachers an experiment prepares: only those the chosen conditions read, and the one the student starts
from."""

from __future__ import annotations

from kvdistill.experiments.spec import load_spec
from kvdistill.experiments.teachers import teachers_needed


def test_only_the_teachers_the_chosen_conditions_read_are_prepared():
    kava = load_spec("kava")  # E1 and E4 distil the backbone itself (student_from); E5 reads the two others
    assert teachers_needed(kava, ["E1", "E4", "nocot_ft", "cot_ft"]) == ["backbone"]
    assert teachers_needed(kava, ["E1", "E5"]) == ["backbone", "qwen_sp", "gemma_sp"]
    assert teachers_needed(kava, ["E4_long", "E4_codi1_long", "nocot_long"]) == ["backbone"]
    assert ("E4_long", "nocot_long") in kava.compare
    small = load_spec("distill-small")
    assert teachers_needed(small, ["ce_only"]) == []
    assert teachers_needed(small, ["ce_only", "kd_gemma"]) == ["gemma_sp"]
    assert teachers_needed(small, list(small.conditions)) == ["llama_bpe", "qwen_sp", "gemma_sp"]
