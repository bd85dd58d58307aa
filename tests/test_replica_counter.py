"""The replica counter's one status fetch is shared by every request waiting on it: a
request that is cancelled (its client left) must not cancel it for the others (issue 20,
finding 9: other requests then failed with a CancelledError nobody sent, and Serve's proxy
answered them as disconnected clients)."""

from __future__ import annotations

import asyncio

from serve_app.routing import ServeReplicaCounter


class GatedCounter(ServeReplicaCounter):
    """Its fetch waits for the test to open the gate."""

    def __init__(self) -> None:
        super().__init__(app_name=lambda: "app", max_age_s=0)
        self.fetching = asyncio.Event()
        self.gate = asyncio.Event()

    async def _fetch(self) -> dict[str, int]:
        self.fetching.set()
        await self.gate.wait()
        self._counts = {"model": 1}
        return self._counts


def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch_for_the_others():
    async def main() -> None:
        counter = GatedCounter()
        leaving = asyncio.create_task(counter.running_replicas())
        staying = asyncio.create_task(counter.running_replicas())
        await counter.fetching.wait()
        leaving.cancel()  # its client went away
        await asyncio.sleep(0)
        counter.gate.set()
        assert await staying == {"model": 1}
        assert leaving.cancelled()

    asyncio.run(main())
