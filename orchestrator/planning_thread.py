"""Any prefetcher on a worker thread: its predictions and plans stay off the engine's critical path.

`PlanningThread(inner)` is itself a Prefetcher. `begin_step` and `after_layer` hand the call (with its view,
a frozen snapshot) to the worker and return at once; the worker runs `inner` on the calls in order. A plan
comes back through `poll()`, which the engine calls at each layer: the newest finished plan, older
unexecuted ones dropped (each plan covers everything the prefetcher wants from its view on, so the newest
supersedes the rest). The cache executes it as it executes any plan, skipping what the cache has overtaken
since the view (a fetched key already resident, an evicted key now in use): a late plan may cost a copy or a
hit, never correctness. This is how a prefetcher in another process behaves too.

The worker stops on `close()` (the loaded model closes its policy), after the calls already queued. The only
state both threads touch is what a prefetcher hands the cache by reference (its eviction policy's `use` ranking,
a hot set), rebound whole by the worker, never changed in place.

Not for: the prefetching logic itself (any Prefetcher), or anything the simulator runs (it calls prefetchers
directly, on its modelled clock).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Sequence

import numpy as np

from expert_store.plan import CacheView, Plan
from orchestrator.prefetcher import LayerRoutes, Prefetcher, StepRequest
from predictor.base import RequestId


class PlanningThread(Prefetcher):
    def __init__(self, inner: Prefetcher) -> None:
        self.inner = inner
        self.name = inner.name
        self.eviction = inner.eviction
        self.wants_speculation = inner.wants_speculation
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._ready: tuple[int, Plan] | None = None  # (call number, plan) of the newest finished plan
        self._taken = -1  # call number of the last plan handed out
        self._error: BaseException | None = None
        self.calls = 0  # calls handed to the worker
        self.done = 0  # calls the worker has finished
        self.dropped = 0  # finished plans superseded before the engine took them
        self._thread = threading.Thread(target=self._work, name=f"{inner.name}-planner", daemon=True)
        self._thread.start()

    def begin_step(self, requests: Sequence[StepRequest], view: CacheView) -> Plan | None:
        self._submit(self.inner.begin_step, requests, view)
        return self.poll()

    def after_layer(self, routed: LayerRoutes, view: CacheView) -> Plan | None:
        self._submit(self.inner.after_layer, routed, view)
        return self.poll()

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        self._submit(self.inner.finish, list(request_ids))

    @property
    def lag(self) -> int:
        """Calls handed over but not yet finished: how far the worker is behind the engine."""
        return self.calls - self.done

    def poll(self) -> Plan | None:
        if self._error is not None:
            raise RuntimeError(f"the {self.name} planner thread failed: {self._error}") from self._error
        with self._lock:
            if self._ready is None or self._ready[0] <= self._taken:
                return None
            number, plan = self._ready
            self._taken = number
        return plan

    def schedule(self, waiting, config, neutral):
        return self.inner.schedule(waiting, config, neutral)

    def route_estimate(self, request_id: RequestId) -> np.ndarray | None:
        # Read from the engine's thread while the worker may be refining one of the array's rows: an estimate
        # either way, and the scheduler only ranks requests with it.
        return self.inner.route_estimate(request_id)

    def close(self) -> None:
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join()
        self.inner.close()

    def _submit(self, method, *args) -> None:
        if not self._thread.is_alive():
            raise RuntimeError(f"the {self.name} planner thread is closed")
        self.calls += 1
        self._calls.put((self.calls, method, args))

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            number, method, args = call
            if self._error is not None:
                self.done = number
                continue  # keep draining until close(); the engine sees the error at its next poll
            try:
                plan = method(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the engine's thread, which raises it
                self._error = e
                self.done = number
                continue
            self.done = number
            if plan:
                with self._lock:
                    if self._ready is not None and self._ready[0] > self._taken:
                        self.dropped += 1
                    self._ready = (number, plan)
