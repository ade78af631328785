"""Which expert sits in which device slot: pure bookkeeping, no tensors, no CUDA.

Kept apart from data movement so the cache policies, the simulator and CPU tests all
run this exact code.

Not for: choosing victims (eviction.py) or copying (device_cache.py).
"""

from __future__ import annotations

from expert_store.keys import ExpertKey


class Residency:
    def __init__(self, n_slots: int):
        if n_slots < 1:
            raise ValueError("the device cache needs at least one slot")
        self.n_slots = n_slots
        self._slot_of: dict[ExpertKey, int] = {}
        self._key_of: list[ExpertKey | None] = [None] * n_slots

    def lookup(self, key: ExpertKey) -> int | None:
        return self._slot_of.get(key)

    def free_slot(self) -> int | None:
        for slot, key in enumerate(self._key_of):
            if key is None:
                return slot
        return None

    def place(self, key: ExpertKey, slot: int) -> None:
        if self._key_of[slot] is not None:
            raise RuntimeError(f"slot {slot} still holds {self._key_of[slot]}")
        if key in self._slot_of:
            raise RuntimeError(f"{key} is already resident in slot {self._slot_of[key]}")
        self._key_of[slot] = key
        self._slot_of[key] = slot

    def release(self, key: ExpertKey) -> int:
        slot = self._slot_of.pop(key)
        self._key_of[slot] = None
        return slot

    def resident(self) -> list[ExpertKey]:
        return list(self._slot_of)

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)
