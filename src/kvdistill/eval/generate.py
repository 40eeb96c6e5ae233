"""`kvdistill generate CHECKPOINT --prompt TEXT`: a saved student's continuation of a prompt, and its speed.

The saved student is a plain Hugging Face causal LM (distillation is a training-time objective: nothing of it
is in the checkpoint), so this is `model.generate` on a model `load_model` reads: greedy, or sampling with a
temperature and nucleus (top-p) under a seed. Tokens/s counts the new tokens over the generation's wall time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from kvdistill.device import default_device
from kvdistill.errors import KvdistillError
from kvdistill.eval.decode import pad_id


@dataclass
class Generation:
    prompt: str
    continuation: str
    new_tokens: int
    seconds: float
    tokens_per_s: float
    model: str
    sampling: dict
    latent_reads: list[str] | None = None  # latent mode: each latent read as a token (`read_latents`)

    def to_dict(self) -> dict:
        return asdict(self)


def generate(
    checkpoint: str,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str | None = None,
    latent: bool = False,
    answer_prompt: str = "Answer:",
) -> Generation:
    """The continuation of `prompt` by the student of `checkpoint` (RUN, RUN/final, RUN/checkpoints/step-N, a
    student directory or a model name). temperature 0: greedy; > 0: sampling (with top_p < 1 nucleus) under
    `seed`.
    """
    from kvdistill.models.load import load_model
    from kvdistill.rundir import resolve_checkpoint

    if max_new_tokens < 1:
        raise KvdistillError(
            f"max_new_tokens ({max_new_tokens}) must be >= 1", "pass --max-new-tokens 1 or more"
        )
    if temperature < 0:
        raise KvdistillError(
            f"temperature ({temperature}) must be >= 0", "use 0 for greedy, e.g. 0.8 to sample"
        )
    if not 0 < top_p <= 1:
        raise KvdistillError(
            f"top_p ({top_p}) must lie in (0, 1]", "use e.g. --top-p 0.9, or 1 for no nucleus cut"
        )
    if top_p < 1 and temperature == 0:
        raise KvdistillError(
            "--top-p only acts when sampling, but temperature is 0 (greedy)",
            "add --temperature (e.g. 0.8) or drop --top-p",
        )
    if not prompt:
        raise KvdistillError("the prompt is empty", "pass --prompt TEXT")
    check_text(prompt, "--prompt")
    check_text(answer_prompt, "--answer-prompt")
    device = default_device(device)
    path, _ = resolve_checkpoint(checkpoint)
    if latent:
        if temperature > 0:
            raise KvdistillError("latent mode decodes greedily", "drop --temperature / --top-p with --latent")
        return _latent(path, prompt, answer_prompt, max_new_tokens, device)
    model, tok = load_model(path, device=device, attn_implementation="sdpa")
    model.eval()
    enc = tok(prompt, return_tensors="pt").to(device)
    _check_positions(model.config, enc["input_ids"].shape[1], max_new_tokens)
    sampling = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p, top_k=0)
    pad = pad_id(tok)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1] :]
    text = tok.decode(new, skip_special_tokens=True)
    return Generation(
        prompt=prompt,
        continuation=text,
        new_tokens=int(new.numel()),
        seconds=seconds,
        tokens_per_s=new.numel() / max(seconds, 1e-9),
        model=path,
        sampling={"temperature": temperature, "top_p": top_p, "seed": seed, "max_new_tokens": max_new_tokens},
    )


def check_text(text: str, flag: str) -> None:
    """Refuse text that is not valid UTF-8 (bytes the shell passed that Python kept as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raw = text.encode("utf-8", "surrogateescape")[err.start : err.end] if err.reason else b""
        raise KvdistillError(
            f"{flag} is not valid UTF-8 text (byte(s) {raw.hex(' ') or '?'} at character {err.start})",
            f"pass {flag} as UTF-8 text (check the terminal's encoding)",
        ) from None


def _check_positions(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation longer than the model's position table (it would run past its positions)."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and prompt_tokens + max_new_tokens > positions:
        room = positions - prompt_tokens
        raise KvdistillError(
            f"--max-new-tokens {max_new_tokens} after a {prompt_tokens}-token prompt runs past the model's "
            f"{positions} positions",
            f"pass --max-new-tokens {room} or less" if room > 0 else "shorten the prompt",
        )


def _latent(path: str, prompt: str, answer_prompt: str, max_new_tokens: int, device: str) -> Generation:
    """Latent mode (kvdistill.student.latent): `prompt` is the question part of the template ('Question:
    ...\n'), then the student's latents, then `answer_prompt`, then greedy decoding."""
    from kvdistill.student.latent import load_latent_student

    student, tok = load_latent_student(path, device=device)
    enc = tok(prompt, return_tensors="pt")
    after = tok(answer_prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    _check_positions(
        student.backbone.config, enc["input_ids"].shape[1] + student.tokens + after.shape[1], max_new_tokens
    )
    out = student.generate(
        enc["input_ids"].to(device),
        enc["attention_mask"].to(device),
        after.to(device),
        max_new_tokens=max_new_tokens,
        eos_id=tok.eos_token_id,
    )
    new = [t for t in out["tokens"][0].tolist() if t != tok.eos_token_id]
    text = tok.decode(new, skip_special_tokens=True)
    reads = student.read_latents(
        enc["input_ids"].to(device), enc["attention_mask"].to(device), out["latents"]
    )[0].tolist()
    return Generation(
        prompt=prompt,
        continuation=answer_prompt + text,
        new_tokens=len(new),
        seconds=out["seconds"],
        tokens_per_s=len(new) / max(out["seconds"], 1e-9),
        model=path,
        sampling={
            "latent_tokens": student.tokens,
            "latent_passes": out["latent_passes"],
            "max_new_tokens": max_new_tokens,
        },
        latent_reads=[tok.decode([t]) for t in reads],
    )
