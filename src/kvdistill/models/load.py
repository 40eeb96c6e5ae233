"""Load any Hugging Face causal LM or encoder (hub id, local directory, GGUF file, or offline zoo name)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from kvdistill.errors import KvdistillError
from kvdistill.models import gguf, zoo

log = logging.getLogger(__name__)

# model_type values loaded with AutoModel (no LM head, no KV cache: K/V come from projection hooks)
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet"}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise KvdistillError(f"unknown dtype '{dtype}'", f"use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_path(name_or_path: str | os.PathLike) -> str:
    """A zoo name becomes its local directory; a local path must exist; anything else is a hub id.

    A GGUF file (or a directory holding exactly one *.gguf and no config.json) becomes its converted directory
    under ``$KVDISTILL_HOME/gguf-converted`` (converted on first use, then cached by the file's sha256)."""
    text = str(name_or_path)
    if zoo.resolve_name(text) is not None:
        return str(zoo.local_path(text))
    path = Path(text).expanduser()
    if path.exists():
        source = gguf.find_gguf(path)
        if source is not None:
            return str(gguf.converted_dir(source, zoo.home() / "gguf-converted"))
        if path.is_file():
            raise KvdistillError(
                f"'{text}' is a file, not a model directory or a GGUF file",
                "pass the directory that holds config.json, or a .gguf file",
            )
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise KvdistillError(
                f"'{text}' has no config.json and no .gguf file",
                "pass a Hugging Face model directory or a .gguf file",
            )
        return str(path)
    close = zoo.nearest(text) if "/" not in text else []
    if close:  # a name without an organisation close to an offline one: a typo, not a hub id to try
        raise KvdistillError(
            f"'{text}' is not an offline model name, a local path or a hub id (nearest offline names: "
            f"{', '.join(close)})",
            f"did you mean '{close[0]}'? `kvdistill zoo list` shows every offline name; a hub id reads "
            "ORG/NAME",
        )
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").split("/", 1)[-1]
    if looks_like_path or text.count("/") > 1 or text.lower().endswith(".gguf"):
        raise KvdistillError(
            f"model path '{text}' does not exist",
            f"check the path, or use an offline name ({', '.join(zoo.ZOO)}), a .gguf file or a hub id",
        )
    return text  # a hub id such as 'Qwen/Qwen2.5-0.5B'


def load_config(name_or_path: str):
    from transformers import AutoConfig

    path = resolve_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err


def _tokenizer_class(path: str):
    """The class a saved tokenizer names in its tokenizer_config.json, else AutoTokenizer.

    AutoTokenizer prefers the class of config.json's model_type: a qwen2 student saved with the Llama-2
    tokenizer would come back as a Qwen2Tokenizer, which rebuilds its own pre-tokenizer and gives other
    ids."""
    import transformers

    config = Path(path) / "tokenizer_config.json"
    if config.is_file():
        try:
            named = json.loads(config.read_text()).get("tokenizer_class")
        except (OSError, json.JSONDecodeError):
            named = None
        cls = getattr(transformers, str(named), None) if named else None
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls
    return transformers.AutoTokenizer


def load_tokenizer(name_or_path: str):

    path = resolve_path(name_or_path)
    try:
        tokenizer = _tokenizer_class(path).from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err
    if not getattr(tokenizer, "is_fast", False):
        raise KvdistillError(
            f"the tokenizer of '{name_or_path}' is a slow tokenizer without offset mappings",
            "use a model that ships tokenizer.json (a fast tokenizer)",
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def is_encoder_config(config) -> bool:
    return getattr(config, "model_type", "") in ENCODER_TYPES or bool(
        getattr(config, "is_encoder_decoder", False)
    )


def attn_implementation_for(attentions: bool) -> str:
    """The attention kernel a run should load a model with: "eager" when it reads attention probabilities
    (sdpa returns none), else "sdpa" (`load_model` falls back to eager for models without sdpa)."""
    return "eager" if attentions else "sdpa"


def from_pretrained_or_config(
    model_cls, *, attn_implementation: str, path: str | None = None, config=None, dtype: torch.dtype
):
    """`model_cls.from_pretrained(path)` or `.from_config(config)`, with eager attention where the model has
    no kernel of the asked `attn_implementation` (transformers raises ValueError for those)."""

    def build(attn):
        if path is not None:
            return model_cls.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        return model_cls.from_config(config, dtype=dtype, attn_implementation=attn)

    # transformers names the kernel "sdpa" or (5.25) "torch.nn.functional.scaled_dot_product_attention"
    names = (
        (attn_implementation, "scaled_dot_product_attention")
        if attn_implementation == "sdpa"
        else (attn_implementation,)
    )
    try:
        return build(attn_implementation)
    except ValueError as err:
        if attn_implementation == "eager" or not any(n in str(err) for n in names):
            raise
        log.info(
            "%s has no %s attention, loading it with eager attention",
            path or type(config).__name__,
            attn_implementation,
        )
        return build("eager")


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tokenizer: str | None = None,
    attn_implementation: str = "eager",
):
    """Load (model, tokenizer). The model is in eval mode on `device`.

    `name_or_path`: an offline zoo name (smollm2-135m, gemma3-270m, minilm-l6), a local directory, a local
    .gguf file (converted once into a cached float16 directory), or a hub id.
    `tokenizer`: load the tokenizer from elsewhere (default: same place as the model).
    `attn_implementation`: "eager" by default so attention probabilities can be captured; "sdpa" is faster
    (and falls back to eager for models without it). Training and evaluation pick with
    `attn_implementation_for`.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    path = resolve_path(name_or_path)
    config = load_config(name_or_path)
    model_cls = AutoModel if is_encoder_config(config) else AutoModelForCausalLM
    try:
        model = from_pretrained_or_config(
            model_cls, path=path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err
    model.to(device).eval()
    model.config.name_or_path = str(name_or_path)
    return model, load_tokenizer(tokenizer or name_or_path)


def _load_error(name: str, err: Exception) -> KvdistillError:
    import difflib

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    names = [n for e in zoo.ZOO.values() for n in (e.name, *e.aliases)]
    close = difflib.get_close_matches(str(name).lower(), names, n=1, cutoff=0.75)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return KvdistillError(
        f"could not load '{name}': {str(err).splitlines()[0][:300]}",
        f"{hint}use an offline name ({', '.join(zoo.ZOO)}), a local directory with config.json, a .gguf "
        "file, or a "
        "hub id" + (" (HF_HUB_OFFLINE=1 is set, so hub ids only work if already cached)" if offline else ""),
    )
