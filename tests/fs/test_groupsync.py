"""``GroupSync``: fsyncs arriving together share one ``Store.sync``, and
none returns before a sync that started after it (adapter level, no mount)."""

from __future__ import annotations

import threading
import time

import trio

from chronicle.fs.groupsync import GroupSync


class _SlowStore:
    """Stands in for a Store: ``sync`` takes a while and records when it started."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds
        self.started: list[float] = []
        self.lock = threading.Lock()
        self.fail_next = False

    def sync(self) -> None:
        with self.lock:
            self.started.append(time.monotonic())
            if self.fail_next:
                self.fail_next = False
                raise OSError(5, "disk on fire")
        time.sleep(self.seconds)


def test_requests_arriving_while_a_sync_runs_share_the_next_one():
    store = _SlowStore()
    group = GroupSync(store, trio.CapacityLimiter(1))
    returned: list[tuple[float, float]] = []

    async def request() -> None:
        arrived = time.monotonic()
        await group.sync()
        returned.append((arrived, time.monotonic()))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await trio.sleep(0.01)                   # the first sync is running now
            for _ in range(10):
                nursery.start_soon(request)

    trio.run(main)
    assert len(returned) == 11
    assert len(store.started) == 2                   # one for the first request, one for the other ten
    for arrived, _done in returned:                  # each waited for a sync that started after it came
        assert any(start >= arrived for start in store.started)


def test_a_failed_sync_raises_in_its_caller_and_the_waiters_sync_again():
    store = _SlowStore()
    group = GroupSync(store, trio.CapacityLimiter(1))
    store.fail_next = True
    errors: list[BaseException] = []

    async def first() -> None:
        try:
            await group.sync()
        except OSError as exc:
            errors.append(exc)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.sleep(0.01)
            nursery.start_soon(group.sync)

    trio.run(main)
    assert len(errors) == 1 and len(store.started) == 2 and group.syncs == 1
