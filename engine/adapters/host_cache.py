"""The host tier: parsed adapters by version digest, shared by the fetcher (writer) and the step loop (reader).

Why a lock here: the fetcher adds adapters from the event loop while the step thread looks them up; every
method is a short dictionary operation under one lock. ``users`` counts live requests naming a key, so an
adapter cannot be removed from under a request that still needs it.
"""

from __future__ import annotations

import threading

from loraplex.engine.adapters.host import HostAdapter
from loraplex.registry.errors import FailedPrecondition


class HostTier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._adapters: dict[str, HostAdapter] = {}
        self._users: dict[str, int] = {}

    def add(self, key: str, adapter: HostAdapter) -> None:
        with self._lock:
            self._adapters[key] = adapter

    def get(self, key: str) -> HostAdapter | None:
        with self._lock:
            return self._adapters.get(key)

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._adapters

    def remove(self, key: str) -> None:
        """Drop ``key``; ``FailedPrecondition`` while a live request uses it (removing an absent key is a no-op)."""
        with self._lock:
            users = self._users.get(key, 0)
            if users:
                raise FailedPrecondition(f"adapter {key} is in use by {users} request(s)", reason="ADAPTER_IN_USE")
            self._adapters.pop(key, None)

    def add_user(self, key: str) -> None:
        with self._lock:
            self._users[key] = self._users.get(key, 0) + 1

    def drop_user(self, key: str) -> None:
        with self._lock:
            left = self._users.get(key, 0) - 1
            if left > 0:
                self._users[key] = left
            else:
                self._users.pop(key, None)

    def users(self, key: str) -> int:
        with self._lock:
            return self._users.get(key, 0)

    def snapshot(self) -> dict[str, int]:
        """key -> bytes of every host-resident adapter."""
        with self._lock:
            return {key: adapter.nbytes for key, adapter in self._adapters.items()}
