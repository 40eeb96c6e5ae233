"""Offline teacher-KV extraction (`kvdistill extract`): run one teacher over a dataset and write a cache.

Which records: every record training can ask the teacher for, i.e. the eval split followed by the train split
of the data config (its records in load order; `data.eval_size` does not change them).

Order of work, fixed by the data alone:
    1. sort the records by text length, longest first (ties by id), so a batch holds neighbours in length
       and an out-of-memory batch size fails at once, not hours in;
    2. cut the sorted list into batches of `batch_size`;
    3. batch k belongs to shard k mod num_shards (round robin keeps the parts' work about equal).
The batches never depend on what is already stored: a resumed run recomputes a batch that was only partly
stored and keeps the missing samples, so every sample is computed in the same batch (same padding) as in one
uninterrupted run, and parts merged with `merge_parts` hold what one run would.

What is stored per sample is `samples_from_capture` of the capture the online teacher would make
(`capture_teacher`: right padding; for rkv the answer-row importance from hooked queries, or eager attentions
for families without a query projection) under the teacher's `compression`, with the rkv query mask from
`answer_query_mask`: the selection code is the one `compress_capture` runs online. K/V are computed
in half precision on GPU (the teacher's `dtype`, auto: bfloat16) and float32 on CPU, and stored in
`compression.dtype`. A teacher with a `logits` section (`TeacherConfig.logits`) also stores its top-k
log-probabilities at every real token (`kvdistill.teachers.logits`, computed from the same
forward's logits); their temperatures are the section's, or those of the run's losses.logit_kd.

What an extraction knows of its teacher (`TeacherSpec`: id, KV geometry, built compression, stored layers) is
derived once, from config.json and the teacher config (`teacher_spec`), before any weights load, and handed to
every step below: loading, the meta, the tokenize thread, the capture and the host copy of every batch.

The cache's meta is `kvdistill.cache.meta.expected_meta`: teacher id and geometry, tokenizer fingerprint,
compression, and the dataset fingerprint. Training from the cache
(`kvdistill.cache.reader.open_teacher_cache`) rebuilds the same meta from the run's config, without loading
the teacher's weights, and refuses a cache that differs, naming the field.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvdistill.cache.meta import TeacherSpec, dataset_records, expected_meta, teacher_spec
from kvdistill.config import DataConfig, LogitKDConfig, TeacherConfig
from kvdistill.device import default_device
from kvdistill.errors import KvdistillError

if TYPE_CHECKING:
    from kvdistill.compress import Compression
    from kvdistill.models.geometry import KVGeometry
    from kvdistill.teachers.logits import LogitSpec

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- work plan
def plan_batches(records: list[dict], batch_size: int) -> list[list[dict]]:
    """Records sorted by text length (longest first, ties by id), cut into batches of `batch_size`."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise KvdistillError(f"--batch-size {batch_size!r} must be a positive integer", "e.g. --batch-size 8")
    ordered = sorted(records, key=lambda r: (-len(r["text"]), str(r["id"])))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def _check_shards(shard_index: int, num_shards: int) -> None:
    if not isinstance(num_shards, int) or num_shards < 1:
        raise KvdistillError(f"--num-shards {num_shards!r} must be 1 or more", "e.g. --num-shards 8")
    if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise KvdistillError(
            f"--shard-index {shard_index!r} is outside 0..{num_shards - 1} (--num-shards {num_shards})",
            "pass the SLURM array index, e.g. --shard-index $SLURM_ARRAY_TASK_ID with --array=0-N-1",
        )


def load_teacher(teacher_cfg: TeacherConfig, spec: TeacherSpec, device: str):
    """(model, tokenizer) in half precision on GPU, float32 on CPU (unless the teacher's dtype says
    otherwise); sdpa where the model supports it, eager attention when rkv needs the attention probabilities
    (families whose queries cannot be hooked, see `kvdistill.models.queries.supports_queries`)."""
    from kvdistill.models.load import load_model
    from kvdistill.models.queries import supports_queries

    on_gpu = torch.device(device).type == "cuda"
    dtype = teacher_cfg.dtype if teacher_cfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    if spec.compression.kind == "rkv" and not supports_queries(spec.geometry):
        return load_model(teacher_cfg.model, dtype=dtype, device=device)
    try:
        return load_model(teacher_cfg.model, dtype=dtype, device=device, attn_implementation="sdpa")
    except KvdistillError:
        return load_model(teacher_cfg.model, dtype=dtype, device=device)


def _check_model(model, spec: TeacherSpec, name: str) -> None:
    """A model handed to `extract` must be the teacher its config names (same geometry as its config.json)."""
    from kvdistill.models.geometry import geometry_of

    if geometry_of(model, name=spec.id).to_dict() != spec.geometry.to_dict():
        raise KvdistillError(
            f"the model passed to extract() is not teacher '{name}' (its geometry differs)",
            "pass the model loaded from teacher_cfg.model, or leave model=None",
        )


# ---------------------------------------------------------------------------------------------- extract
def extract(
    teacher_cfg: TeacherConfig,
    data_cfg: DataConfig,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    device: str | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    shard_size: int = 256,
    progress: bool = True,
    model=None,
    tokenizer=None,
    only_ids: set[str] | None = None,
    logit_kd: LogitKDConfig | None = None,
) -> dict[str, Any]:
    """Run one teacher over `data_cfg` and write (or resume) its cache in `out_dir`; with a `logits` section,
    its top-k log-probabilities too (temperatures: the section's, else those of `logit_kd`).

    `only_ids`: store only these records (e.g. the ones an experiment's runs will read); the cache is still
    the cache of `data_cfg` (the same meta), and a run that asks it for another record gets a CacheError
    naming it.

    With num_shards > 1 this writes part `shard_index` (`manifest.part-{i}.json`); `merge_parts` combines the
    parts once all have finished. `model` / `tokenizer`: the teacher already loaded (it must be
    `teacher_cfg.model`; its dtype and device are then used as they are).

    Returns {out_dir, part, teacher, records (this part's), stored (this call), skipped (already stored),
    tokens (this call), seconds, tokens_per_s, complete}.
    """
    from kvdistill.cache.writer import CacheWriter

    _check_shards(shard_index, num_shards)
    plan_batches([], batch_size)  # a bad batch size fails before anything slow
    if (model is None) != (tokenizer is None):
        raise KvdistillError(
            "pass both model and tokenizer, or neither", "extract(..., model=m, tokenizer=t)"
        )
    records = dataset_records(data_cfg)
    spec = teacher_spec(teacher_cfg, logit_kd)  # config.json only: bad layers fail before the weights load
    stored = records
    if only_ids is not None:
        unknown = sorted(set(only_ids) - {str(r["id"]) for r in records})
        if unknown:
            raise KvdistillError(
                f"only_ids names {len(unknown)} records the data does not hold, e.g. {unknown[:3]}",
                "pass ids of the data config's records",
            )
        stored = [r for r in records if str(r["id"]) in only_ids]
    if model is None:
        model, tokenizer = load_teacher(teacher_cfg, spec, default_device(device))
    else:
        _check_model(model, spec, teacher_cfg.model)
    meta = expected_meta(teacher_cfg, data_cfg, records=records, tokenizer=tokenizer, spec=spec)
    batches = [b for k, b in enumerate(plan_batches(stored, batch_size)) if k % num_shards == shard_index]
    part = None if num_shards == 1 else shard_index
    desc = f"extract {spec.id}" + (f" part {part}/{num_shards}" if part is not None else "")

    start = time.perf_counter()
    with (
        CacheWriter(out_dir, meta, shard_size=shard_size, part=part, background=True) as writer,
        _Sink(writer, batches, start, desc=desc, progress=progress) as sink,
    ):
        run_pipeline(
            model,
            tokenizer,
            sink.todo,
            sink,
            max_length=data_cfg.max_length,
            compression=spec.compression,
            layers=spec.layers,
            geometry=spec.geometry,
            batch_size=batch_size,
            logits=spec.logits,
        )
    seconds = time.perf_counter() - start
    result = {
        "out_dir": str(out_dir),
        "part": part,
        "teacher": spec.id,
        "records": sink.total,
        "stored": sink.stored,
        "skipped": sink.skipped,
        "tokens": sink.tokens,
        "seconds": seconds,
        "tokens_per_s": sink.tokens / seconds if seconds > 0 else None,
        "complete": True,
    }
    log.info("extract: %s", result)
    return result


class _Sink:
    """`consume` of `run_pipeline` for `extract` (on the host thread, in batch order): adds each sample the
    writer does not hold yet, counts samples and tokens, and moves the progress bar (closed on exit).
    `todo`: the batches with a sample still to store."""

    def __init__(self, writer, batches: list[list[dict]], start: float, *, desc: str, progress: bool):
        from tqdm.auto import tqdm

        self.writer, self.start, self.done = writer, start, writer.done_ids()
        self.total = sum(len(b) for b in batches)
        self.skipped = sum(str(r["id"]) in self.done for b in batches for r in b)
        self.todo = [b for b in batches if any(str(r["id"]) not in self.done for r in b)]
        self.stored = self.tokens = 0
        self.bar = tqdm(
            total=self.total,
            initial=self.skipped,
            unit="sample",
            desc=desc,
            disable=not progress,
            dynamic_ncols=True,
        )

    def __call__(self, batch: list[dict], samples: list[dict]) -> None:
        new = 0
        for rec, sample in zip(batch, samples, strict=True):
            if str(rec["id"]) not in self.done:
                self.writer.add(str(rec["id"]), sample, copy=False)
                new += 1
                self.tokens += int(sample["token_ids"].shape[0])
        self.stored += new
        seconds = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tok_s=f"{self.tokens / seconds:,.0f}", refresh=False)
        self.bar.update(new)

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def run_pipeline(
    model,
    tokenizer,
    batches: list[list[dict]],
    consume,
    *,
    max_length: int | None,
    compression: Compression,
    layers: list[int],
    geometry: KVGeometry | None = None,
    batch_size: int | None = None,
    depth: int = 2,
    logits: LogitSpec | None = None,
) -> None:
    """Capture and compress `batches` in order, calling `consume(batch, samples)` (samples: `host_samples`)
    for each, with the host work off the main thread:

        tokenize thread   prepare_teacher(batch n + 1)             tokens, spans, rkv query mask; pinned
        main thread       forward + selection + gather of batch n  then one async device -> host copy
        host thread       host_samples(batch n - 1), consume(...)  waits for its copy, cuts it into samples

    `compression` / `layers` (`compression.resolve_layers`) / `geometry` (default `geometry_of(model)`):
    derived once by the caller and used for every batch; `logits`: also keep the top-k log-probabilities
    (`LogitSpec`). At most `depth` batches wait for the host thread (the main
    thread blocks beyond that). An error on either thread is raised in the main thread, at the latest once the
    batches in flight are done.
    """
    from kvdistill.cache.batch import capture_to_host, host_samples
    from kvdistill.models.geometry import geometry_of
    from kvdistill.teachers import prepare_teacher

    if not batches:
        return
    geometry = geometry if geometry is not None else geometry_of(model)
    spec = TeacherSpec(geometry.name, geometry, compression, layers, logits)
    pin = next(model.parameters()).device.type == "cuda"

    def prepare(batch):
        return prepare_teacher(
            tokenizer, batch, geometry=geometry, max_length=max_length, compression=compression, pin=pin
        )

    def finish(batch, host):
        consume(batch, host_samples(host))

    in_flight: deque = deque()
    with (
        ThreadPoolExecutor(1, thread_name_prefix="kvdistill-tokenize") as tokenize_pool,
        ThreadPoolExecutor(1, thread_name_prefix="kvdistill-host") as host_pool,
    ):
        try:
            upcoming = tokenize_pool.submit(prepare, batches[0])
            for k, batch in enumerate(batches):
                inputs = _result(upcoming, "tokenizing", k, batch)
                if k + 1 < len(batches):
                    upcoming = tokenize_pool.submit(prepare, batches[k + 1])
                cap, query = _capture(model, tokenizer, inputs, spec, max_length, batch_size)
                host = capture_to_host(cap, compression, layers, query, logits)
                del cap, query
                in_flight.append((k, batch, host_pool.submit(finish, batch, host)))
                while len(in_flight) > depth:
                    _result(*_pop(in_flight))
            while in_flight:
                _result(*_pop(in_flight))
        except BaseException:
            tokenize_pool.shutdown(wait=True, cancel_futures=True)
            host_pool.shutdown(wait=True, cancel_futures=True)
            raise


def _pop(in_flight: deque):
    k, batch, future = in_flight.popleft()
    return future, "storing", k, batch


def _result(future: Future, doing: str, k: int, batch: list[dict]):
    """A background step's result; its error, raised in the calling thread, names the batch."""
    try:
        return future.result()
    except KvdistillError:
        raise
    except Exception as err:
        ids = [str(r["id"]) for r in batch]
        raise KvdistillError(
            f"{doing} batch {k} (ids {ids[:3]}{'...' if len(ids) > 3 else ''}) failed on a background "
            "thread: "
            f"{type(err).__name__}: {err}",
            "fix the cause above, then rerun the same command: it resumes",
        ) from err


def _capture(model, tokenizer, inputs, spec: TeacherSpec, max_length: int | None, batch_size: int | None):
    """(cap, query_mask) of the batch `inputs` (`prepare_teacher`) as the online teacher captures it; a GPU
    out-of-memory error says which flag to lower."""
    from kvdistill.teachers import capture_teacher

    batch = inputs.records
    try:
        return capture_teacher(
            model,
            tokenizer,
            batch,
            max_length=max_length,
            compression=spec.compression,
            layers=spec.layers,
            inputs=inputs,
            geometry=spec.geometry,
            logits=spec.logits is not None,
        )
    except torch.cuda.OutOfMemoryError:
        longest = max(len(r["text"]) for r in batch)
        raise KvdistillError(
            f"out of GPU memory on a batch of {len(batch)} texts of up to {longest} characters "
            f"(--batch-size {batch_size}, max_length {max_length})",
            "lower --batch-size (batches are largest first, so a size that passes the first batch passes "
            "all); "
            "rerun the same command to resume",
        ) from None
