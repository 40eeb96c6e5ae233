"""Errors that reach users: each says what was wrong and what to do about it."""

from __future__ import annotations


class KvdistillError(ValueError):
    """A problem with the user's input (model, config, data, cache) that the user can fix.

    The CLI prints these as one clean message (no traceback) and exits non-zero.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class ConfigError(KvdistillError):
    """A config with one or more problems; `problems` lists every one of them."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


class CacheError(KvdistillError):
    """A teacher-KV cache that is corrupt, incomplete or does not match what it is used with."""
