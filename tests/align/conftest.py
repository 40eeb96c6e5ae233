"""Texts and tokenizers shared by the token-alignment tests."""

from __future__ import annotations

import functools

import pytest

# Mixed-script texts: CJK, emoji (ZWJ sequences, skin tones, flags, keycaps), accented Latin (precomposed and
# combining), Cyrillic, Arabic, Hebrew, Devanagari, Thai, rare CJK outside the BMP, and ASCII around them.
MIXED_TEXTS = [
    "東京",
    "東京都は日本の首都です。",
    "I ❤️ 東京 and 서울!",
    "😀",
    "😀👍🏽🎉",
    "family: 👨\u200d👩\u200d👧\u200d👦 and 👩🏿\u200d🚀 in orbit",
    "👋🏻👋🏼👋🏽👋🏾👋🏿",
    "flags 🇫🇷🇯🇵🇧🇷 done.",
    "keycap 1️⃣ 2️⃣ #️⃣",
    "naïve café résumé façade",
    "e\u0301 a\u0300 o\u0308 n\u0303: combining marks",
    "Zalgo: Z\u0351\u0352\u0353a\u0354\u0355l\u0356g\u0357o",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีครับ",
    "𠀋𠀍𠀎 rare ideographs",
    "鱻龘靐 are rare too",
    "数学: x² + y² = z², ∑ᵢ aᵢ ≤ ∞",
    "Ünïcödé ✓ 数学 🙂 ok, naïve café — 12.5%",
    "Straße, œuvre, Ærø, İstanbul, ǅ",
    "tab\tnew\nline\r\nand  double  spaces 東",
    "  leading spaces 😀",
    "trailing 😀  ",
    "42 apples and 東京 pears",
    "日本語のテキストと English mixed 한국어 텍스트",
    "emoji at the end 🏳️\u200d🌈",
    "ﬁ ﬂ ligatures and ½ fractions",
    "Question: 東京 has 3 🍎 and 4 🍐, how many?\nAnswer: 7",
]


@functools.cache
def _load(name: str):
    from kvdistill.models.load import load_tokenizer

    return load_tokenizer(name)


@pytest.fixture(scope="session")
def mixed_texts() -> list[str]:
    """30 mixed-script texts."""
    return list(MIXED_TEXTS)


@pytest.fixture(scope="session")
def load():
    """name -> the offline tokenizer, loaded once per session (offline zoo names: smollm2-135m,
    gpt2-tokenizer...)."""
    return _load
