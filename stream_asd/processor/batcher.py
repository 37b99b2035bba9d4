"""Micro-batching of ready windows from many devices: up to ``max_size`` windows, waiting at
most ``max_wait`` seconds after the first one arrived. The bounded queue is the back-pressure:
when scoring falls behind, intake waits (Kafka keeps the rest)."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(self, max_size: int, max_wait_s: float, max_pending: int = 1024):
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.max_size = max_size
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize=max_pending)

    async def put(self, item: T) -> None:
        await self._queue.put(item)

    def pending(self) -> int:
        return self._queue.qsize()

    async def next_batch(self) -> list[T]:
        """Wait for the first item, then gather more until full or ``max_wait`` has passed."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    def drain_nowait(self) -> list[T]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return out
