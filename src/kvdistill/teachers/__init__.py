"""kvdistill.teachers: the teacher K/V record and its sources, a tagged union of an online model and a cache.

Below `cache/` (which writes and reads these records) and above `models/` and `compress/`.
"""

from kvdistill.teachers.cached import CachedTeacher
from kvdistill.teachers.capture import (
    TeacherInputs,
    answer_query_mask,
    capture_teacher,
    compress_capture,
    prepare_teacher,
)
from kvdistill.teachers.online import OnlineTeacher
from kvdistill.teachers.record import TeacherKV

__all__ = [
    "CachedTeacher",
    "OnlineTeacher",
    "TeacherInputs",
    "TeacherKV",
    "answer_query_mask",
    "capture_teacher",
    "compress_capture",
    "prepare_teacher",
]
