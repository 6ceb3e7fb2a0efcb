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
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread_id: int | None = None


def _remember_thread() -> None:
    global _thread_id
    _thread_id = threading.get_ident()


def compute_executor() -> ThreadPoolExecutor:
    """The process-wide single-thread executor for CPU torch work (created on first use)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="specserve-torch", initializer=_remember_thread
            )
        return _executor


def on_compute_thread() -> bool:
    return _thread_id is not None and threading.get_ident() == _thread_id


def run_sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on the compute thread and wait for it (directly when already there, so nested
    calls never deadlock)."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return compute_executor().submit(fn, *args, **kwargs).result()


def executor_for(device: Any) -> Executor | None:
    """The compute thread for CPU model work (device None counts as CPU); None (asyncio's default
    thread pool) for accelerator devices and for work that runs no torch kernels ("none")."""
    kind = getattr(device, "type", None) or str(device or "cpu").split(":", 1)[0]
    return compute_executor() if kind == "cpu" else None


async def run_async(fn: Callable[..., T], *args: Any, device: Any = None, **kwargs: Any) -> T:
    """Await `fn(*args, **kwargs)` run where work on `device` belongs (see module doc)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor_for(device), functools.partial(fn, *args, **kwargs))


def on_compute(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: the function always runs on the compute thread (callers wait)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return run_sync(fn, *args, **kwargs)

    return wrapper
