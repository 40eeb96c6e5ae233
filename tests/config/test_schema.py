"""Run-level checks of the schema: options that a run would accept and never read are refused with key and
fix."""

from __future__ import annotations

import pytest

from kvdistill.config import load_config
from kvdistill.errors import ConfigError

STUDENT = {"model": "smollm2-135m"}


def test_a_storage_dtype_on_an_online_teacher_and_a_run_dtype_on_a_cached_one_are_refused():
    online = {"model": "gemma3-270m", "compression": {"dtype": "float16"}}
    cached = {"model": "gemma3-270m", "source": "cache", "cache_dir": "/nowhere", "dtype": "bfloat16"}
    with pytest.raises(ConfigError) as err:
        load_config(raw={"student": STUDENT, "teachers": [online, {**cached, "name": "c"}]})
    (found,) = err.value.problems
    assert (
        "teachers.0.compression.dtype (float16) is the storage dtype of a teacher cache, but teacher "
        "'gemma3-270m' runs online"
    ) in found
    assert "drop compression.dtype, or set teachers.0.dtype" in found
    assert (
        "teachers.1.dtype (bfloat16) is the dtype a teacher runs in, but teacher 'c' is read from its cache"
        in found
    )
    assert (
        "drop teachers.1.dtype (for `kvdistill extract`, pass it as an override: teachers.1.dtype=bfloat16)"
        in found
    )
    # what each kind of teacher reads, and the defaults a run's config.yaml spells out, are accepted
    ok = load_config(
        raw={
            "student": STUDENT,
            "teachers": [
                {"model": "gemma3-270m", "dtype": "float16", "compression": {"dtype": "bfloat16"}},
                {**cached, "name": "c", "dtype": "auto", "compression": {"dtype": "float16"}},
            ],
        }
    )
    assert ok.teachers[0].dtype == "float16" and ok.teachers[1].compression.dtype == "float16"
