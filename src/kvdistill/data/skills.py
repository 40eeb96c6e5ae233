"""A task mixing several skills with exact answers, each record labelled with its skill (`data.source:
skills`).

    data: {source: skills, skills: [arithmetic, gsm_symbolic, sorting], mix: [1, 1, 1], size: 30000}

Record i of the mixture draws its skill from its own `random.Random("kvdistill-skills:<seed>:<i>")` with
probabilities proportional to `mix`; the j-th record of skill s is problem j of that skill's generator
(`kvdistill.data.arith`, `.gsm`, `.sorting`) with the same seed. Each generator is prefix-stable, so the
mixture is too: the first k records (hence the held-out split) are the same whatever `size` is. Ids are the
generators' (`arithmetic:<seed>:<index>`, ...), distinct across skills; every record carries `skill`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from kvdistill.data.arith import arithmetic_records
from kvdistill.data.gsm import DEFAULT_TEMPLATE, gsm_symbolic_records
from kvdistill.data.sorting import sorting_records
from kvdistill.errors import KvdistillError

SKILLS: dict[str, Callable[..., list[dict]]] = {
    "arithmetic": arithmetic_records,
    "gsm_symbolic": gsm_symbolic_records,
    "sorting": sorting_records,
}


def skill_of(records: Sequence[dict]) -> list[str | None]:
    """The skill label of each record (None where a record has none)."""
    return [r.get("skill") for r in records]


def skill_records(
    skills: Sequence[str],
    size: int,
    seed: int,
    mix: Sequence[float] | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> list[dict]:
    """`size` records mixing `skills` in proportions `mix` (default equal), in mixture order (module
    docstring)."""
    unknown = [s for s in skills if s not in SKILLS]
    if not skills or unknown or len(set(skills)) != len(skills):
        raise KvdistillError(
            f"data.skills {list(skills)} must be distinct names among {list(SKILLS)}",
            f"set data.skills to some of {', '.join(SKILLS)}",
        )
    weights = [1.0] * len(skills) if mix is None else [float(w) for w in mix]
    if len(weights) != len(skills) or any(not w > 0 for w in weights):
        raise KvdistillError(
            f"data.mix {list(weights)} must give one positive proportion per skill {list(skills)}",
            "set data.mix to as many positive numbers as data.skills, or leave it out (equal)",
        )
    if size <= 0:
        raise KvdistillError(f"skills size ({size}) must be positive", "set data.size to 1 or more")
    picks = [
        random.Random(f"kvdistill-skills:{seed}:{i}").choices(range(len(skills)), weights)[0]
        for i in range(size)
    ]
    pools = {}
    for k, name in enumerate(skills):
        n = picks.count(k)
        pools[k] = iter(SKILLS[name](n, seed, template=template)) if n else iter(())
    return [{**next(pools[k]), "skill": skills[k]} for k in picks]
