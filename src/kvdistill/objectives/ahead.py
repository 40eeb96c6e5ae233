"""Teachers one batch ahead: the teachers' K/V of the next batch computed on a worker thread (its own CUDA
stream) while the training process runs the student's step on this one (`train.teachers_ahead`).

A teacher is frozen, so its K/V of a batch depend on the batch alone: computing them a step early changes no
number (the same kernels on the same inputs), only when the work is launched. On a GPU the step is largely
bound by the host (Python and kernel launches), and a second thread launching the teachers' kernels on a
second stream overlaps much of that with the student's forward, backward and optimizer step (the GIL is
released inside every op); where the GPU is full, the two streams still fill each other's gaps.

Safety:
- a teacher is used by one thread at a time (`OnlineTeacher.kv` holds the teacher's lock: its capture hooks
are
  installed on the module for the duration of a call), so an evaluation between steps waits for the pass
  ahead;
- the stream the step runs on waits for the pass's event before it reads a tensor, and every tensor of the
pass
  is recorded on that stream, so the caching allocator does not hand its memory back to the side stream while
  the step's kernels still read it;
- the side stream first waits for everything queued when it is made (the teachers' weights moved to the
device);
- mixed precision: the thread enters the same autocast as the training step (autocast state is per thread).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvdistill.objectives.base import Batch

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def tensors_of(obj) -> Iterator[torch.Tensor]:
    """Every tensor reachable from obj through dataclass fields, dicts, lists and tuples (each once)."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                seen.add(id(x))
                yield x
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            stack.extend(getattr(x, f.name) for f in dataclasses.fields(x))
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list | tuple):
            stack.extend(x)


@dataclasses.dataclass
class Pending:
    """The teachers' K/V of one batch being computed ahead: `take()` waits for them and hands them to the
    stream the caller runs on."""

    future: Future
    stream: torch.cuda.Stream | None

    def take(self) -> list:
        records, event = self.future.result()  # re-raises what the pass raised
        if self.stream is not None:
            current = torch.cuda.current_stream(self.stream.device)
            current.wait_event(event)
            for t in tensors_of(records):
                if t.is_cuda:
                    t.record_stream(current)
        return records


class TeachersAhead:
    """Iterates `batches` (collated micro-batches, in the trainer's order), each handed out with `.ahead` set
    to the `Pending` teachers' pass of it, and the pass of the next batch already submitted: the objective's
    step takes the teachers' part from there instead of running the teachers itself
    (`TrainingObjective.teachers_of`). A batch whose teachers cannot run ahead
    (`TrainingObjective.runs_teachers_ahead`: an on-policy step) is handed out with `.ahead` None.

    objective: the unwrapped `TrainingObjective` (its `teacher_pass` runs on the worker thread);
    mixed_precision: the run's train.mixed_precision, entered as autocast on the thread. `close()` waits for a
    pass still running."""

    def __init__(self, objective, batches: Iterator[Batch], *, device, mixed_precision: str = "no"):
        self.objective, self.batches = objective, batches
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.autocast = AUTOCAST[mixed_precision]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kvdistill-teachers")
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.next: tuple[Batch, Pending] | None = self._submit()

    def _pass(self, batch: Batch):
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        cast = (
            torch.autocast(self.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with stream, cast:
            records = self.objective.teacher_pass(batch)
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        return records, event

    def _submit(self) -> tuple[Batch, Pending | None] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        if not self.objective.runs_teachers_ahead(batch):  # an on-policy step: its teachers run in the step
            return batch, None
        return batch, Pending(self.pool.submit(self._pass, batch), self.stream)

    def __iter__(self) -> TeachersAhead:
        return self

    def __next__(self) -> Batch:
        if self.next is None:
            raise StopIteration
        batch, pending = self.next
        self.next = self._submit()  # the next batch's teachers start now, while this one's step runs
        return dataclasses.replace(batch, ahead=pending)

    def close(self) -> None:
        """Wait for a pass still running (its result is dropped) and stop the thread."""
        self.next = None
        self.pool.shutdown(wait=True)
