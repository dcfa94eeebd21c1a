"""Drivers that advance many samples' flows (`SynthRun.sample_flow`) through a backend.

`drive_async` (the `openai` backend's session): every sample is an asyncio task that sends
its next request as soon as its previous result is in; up to `concurrency` samples run, and
a finished one is written at once and replaced. A slow request holds up only its sample.

`drive_batched` (`hf`, `vllm`: engines that take a list and batch it themselves): a chunk
of `concurrency` samples moves in lockstep, all first steps in one call, then all second
steps of those that passed.
"""

from __future__ import annotations

import asyncio
from itertools import islice
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_kaja.synth.pipeline import SynthRun


def drive_async(run: SynthRun, backend, concurrency: int) -> None:
    """Run all samples through `backend.session()`; see the module docstring."""
    asyncio.run(_drive_async(run, backend, concurrency))


async def _drive_async(run: SynthRun, backend, concurrency: int) -> None:
    in_flight = 0
    slot_freed = asyncio.Event()
    errors: list[BaseException] = []
    tasks: set[asyncio.Task] = set()

    async def one(complete, sample) -> None:
        nonlocal in_flight
        flow = run.sample_flow(sample)
        try:
            request = next(flow)
            while True:
                request = flow.send(await complete(request))
        except StopIteration as stop:
            run.record(stop.value)
        except Exception as exc:  # a bug: stop the run and raise it in the caller
            errors.append(exc)
        finally:
            in_flight -= 1
            slot_freed.set()

    async with backend.session() as complete:
        for sample in run.samples():
            # Wait for a free slot, and (with a target) for room under the target.
            while not errors and (in_flight >= concurrency or not run.admit(in_flight)):
                if in_flight == 0:
                    break  # nothing in flight and no room: the target is reached
                slot_freed.clear()
                await slot_freed.wait()
            if errors or not run.admit(in_flight):
                break
            in_flight += 1
            task = asyncio.create_task(one(complete, sample))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    if errors:
        raise errors[0]


def drive_batched(run: SynthRun, backend, concurrency: int) -> None:
    """Run all samples through `backend.generate` in lockstep chunks; see the module docstring."""
    samples = run.samples()
    while True:
        room = concurrency
        if run.cfg.target_count is not None:
            room = min(room, run.cfg.target_count - run.store.accepted_count)
        chunk = list(islice(samples, max(room, 0)))
        if not chunk:
            return
        pending = []
        for sample in chunk:
            flow = run.sample_flow(sample)
            pending.append((flow, next(flow)))
        while pending:
            results = backend.generate([request for _, request in pending])
            still = []
            for (flow, _), result in zip(pending, results, strict=True):
                try:
                    still.append((flow, flow.send(result)))
                except StopIteration as stop:
                    run.record(stop.value)
            pending = still
