"""A cached teacher: K/V read from a directory that `kvdistill extract` wrote.

The reader is passed in (`kvdistill.cache.open_teacher_cache` opens and checks it), so this layer does not
depend on the cache's layout: anything with `meta`, `layers`, `index` and `teacher_kv(ids, device=)` serves.
"""

from __future__ import annotations

from kvdistill.errors import KvdistillError
from kvdistill.models.geometry import KVGeometry
from kvdistill.teachers.record import TeacherKV


class CachedTeacher:
    """K/V read from a cache; it holds only K/V, so hidden states, logits and attentions are refused."""

    kind = "cache"

    def __init__(self, name: str, reader):
        self.name = name
        self.reader = reader
        self.geometry = KVGeometry.from_dict(reader.meta["teacher"]["geometry"])
        self.layers = reader.layers
        self.device = "cpu"

    def to(self, device) -> CachedTeacher:
        self.device = device
        return self

    def kv(self, records: list[dict], *, max_length: int, hidden_states=False, logits=False,
           attentions=False) -> TeacherKV:
        if hidden_states or logits or attentions:
            raise KvdistillError(f"teacher '{self.name}' comes from a cache, which holds only K/V",
                                 "use only the kv / cosine losses with cached teachers, or run it online")
        missing = [r["id"] for r in records if r["id"] not in self.reader.index]
        if missing:
            raise KvdistillError(f"cache of teacher '{self.name}' has no entry for samples {missing[:5]}",
                                 "extract the cache over the same data config as training")
        return self.reader.teacher_kv([r["id"] for r in records], device=self.device)
