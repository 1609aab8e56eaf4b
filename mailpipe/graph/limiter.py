"""Per-mailbox request limiter: concurrency cap, sliding request window, and a Retry-After fence.

Exchange Online throttles per app *per mailbox*: 4 concurrent requests and 10,000 requests per
10 minutes. One :class:`MailboxLimiter` per mailbox is shared by everything in the process that
touches that mailbox (delta pages, MIME downloads, retries), so the cap holds across all of them; a
429 on one mailbox raises only that mailbox's fence, never the others'.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class MailboxLimiter:
    def __init__(self, concurrency: int = 4, window_requests: int = 9600, window_seconds: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if concurrency < 1 or window_requests < 1 or window_seconds <= 0:
            raise ValueError("limits must be positive")
        self.concurrency = concurrency
        self.window_requests = window_requests
        self.window_seconds = window_seconds
        self._clock = clock
        self._sem = asyncio.Semaphore(concurrency)
        self._window: deque[float] = deque()
        self._fence = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.fence_waits = 0       # times a request waited for a Retry-After fence
        self.window_waits = 0      # times a request waited for the request window
        self.starts: deque[float] = deque(maxlen=4096)  # start times of recent requests (for tests)

    def fence(self, seconds: float) -> None:
        """No new request to this mailbox starts before ``seconds`` from now (Retry-After)."""
        self._fence = max(self._fence, self._clock() + max(0.0, seconds))

    @property
    def fence_until(self) -> float:
        return self._fence

    async def __aenter__(self) -> MailboxLimiter:
        await self._sem.acquire()
        try:
            while True:
                now = self._clock()
                if now < self._fence:
                    self.fence_waits += 1
                    await asyncio.sleep(self._fence - now)
                    continue
                win = self._window
                while win and win[0] <= now - self.window_seconds:
                    win.popleft()
                if len(win) >= self.window_requests:
                    self.window_waits += 1
                    await asyncio.sleep(win[0] + self.window_seconds - now + 0.001)
                    continue
                win.append(now)
                self.starts.append(now)
                break
        except BaseException:
            self._sem.release()
            raise
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.in_flight -= 1
        self._sem.release()
