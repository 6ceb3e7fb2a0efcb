"""The one thread that runs torch work on the CPU.

Why: torch's CPU kernels use OpenMP (libgomp), and libgomp keeps one thread team per thread that
ever entered a parallel region. As soon as two threads of a process have run torch ops (the main
thread that loaded the model, then `asyncio.to_thread` workers), every later forward pays for it:
on 2 cores a SmolLM2 step went from 55 ms to 86-100 ms, on whichever thread it ran, and
OMP_WAIT_POLICY / GOMP_SPINCOUNT only made it worse. So every piece of CPU model work - loading,
prefill, drafting, verification, the plain baseline - runs on this single long-lived thread, and
the event loop (or Serve's replica threads) only waits for it. One CPU's worth of work is serial
anyway: the OpenMP team already uses every core for each op.

Off the CPU (CUDA) kernels run asynchronously and OpenMP is not involved, so GPU models keep a
thread per call and overlapped drafting really overlaps (`executor_for`).

Lanes: to emulate two nodes on one machine (a drafter on its own cores, the verifier on others),
a model may be put on another lane (`CausalLM.compute_lane`): its own single thread, pinned to its
own CPUs by `pin_lane` (with one torch thread per lane, so no OpenMP team is ever shared). Lane 0
is the default and the only one a normal process uses.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executors: dict[int, ThreadPoolExecutor] = {}
_thread_ids: dict[int, int] = {}  # lane -> its thread's ident
_lane_cpus: dict[int, set[int]] = {}


def _start_lane(lane: int) -> None:
    _thread_ids[lane] = threading.get_ident()
    cpus = _lane_cpus.get(lane)
    if cpus:
        import os

        os.sched_setaffinity(0, cpus)  # on Linux, pid 0 = this thread only


def pin_lane(lane: int, cpus: set[int]) -> None:
    """Pin a lane's thread to `cpus` (before its first use)."""
    with _lock:
        if lane in _executors:
            raise RuntimeError(f"compute lane {lane} already started; pin it before its first use")
        _lane_cpus[lane] = set(cpus)


def compute_executor(lane: int = 0) -> ThreadPoolExecutor:
    """The process-wide single-thread executor of a lane for CPU torch work (created on first use)."""
    with _lock:
        if lane not in _executors:
            _executors[lane] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"specserve-torch-{lane}",
                initializer=functools.partial(_start_lane, lane),
            )
        return _executors[lane]


def on_compute_thread(lane: int | None = None) -> bool:
    """On the compute thread of `lane` (None: of any lane)."""
    me = threading.get_ident()
    return me in _thread_ids.values() if lane is None else _thread_ids.get(lane) == me


def run_sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on the compute thread and wait for it (directly when already there, so nested
    calls never deadlock)."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return compute_executor().submit(fn, *args, **kwargs).result()


def set_compute_threads(threads: int) -> int:
    """Give torch `threads` intra-op threads on the compute thread (0 = every CPU this process may
    run on) and return what torch then uses. OpenMP keeps the thread count per thread, so it is set
    where the forwards run, before the first one."""
    import os

    import torch

    wanted = threads or len(os.sched_getaffinity(0))
    run_sync(torch.set_num_threads, wanted)
    return run_sync(torch.get_num_threads)


def executor_for(device: Any, lane: int = 0) -> Executor | None:
    """The compute thread of `lane` for CPU model work (device None counts as CPU); None (asyncio's
    default thread pool) for accelerator devices and for work that runs no torch kernels ("none")."""
    kind = getattr(device, "type", None) or str(device or "cpu").split(":", 1)[0]
    return compute_executor(lane) if kind == "cpu" else None


_awaited: dict[int, int] = {}  # lane -> jobs awaited through run_async and not finished yet


def lane_busy(lane: int = 0) -> bool:
    """Work awaited through `run_async` is queued or running on the compute thread of `lane`: a
    job submitted now would run after it (one thread, first in, first out)."""
    return _awaited.get(lane, 0) > 0


async def run_async(fn: Callable[..., T], *args: Any, device: Any = None, lane: int = 0, **kwargs: Any) -> T:
    """Await `fn(*args, **kwargs)` run where work on `device` belongs (see module doc)."""
    loop = asyncio.get_running_loop()
    executor = executor_for(device, lane)
    if executor is None:
        return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))
    _awaited[lane] = _awaited.get(lane, 0) + 1
    try:
        return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))
    finally:
        _awaited[lane] -= 1


def on_compute(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: the function always runs on the compute thread (callers wait)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return run_sync(fn, *args, **kwargs)

    return wrapper
