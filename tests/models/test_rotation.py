"""Which way a family rotates pairs of key dims, read from its own modeling code."""

from __future__ import annotations

from kvdistill.models.rotation import rotation_of_code


def test_family_rotation_is_read_from_its_code():
    """No table: the family's own rotate function says how dims pair and in which direction."""
    assert rotation_of_code("transformers.models.llama.modeling_llama") == ("rotate_half", 1)
    assert rotation_of_code("transformers.models.cohere.modeling_cohere") == ("interleaved", 1)
    assert rotation_of_code("transformers.models.gptj.modeling_gptj") == ("interleaved", 1)
    assert rotation_of_code("transformers.models.llama4.modeling_llama4") == (
        "interleaved",
        1,
    )  # complex freqs
    assert rotation_of_code("transformers.models.nanochat.modeling_nanochat") == ("rotate_half", -1)
