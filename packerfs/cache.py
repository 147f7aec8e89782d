"""A small thread-safe LRU cache, bounded by count or by weight (bytes)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable


class LRU:
    def __init__(
        self,
        limit: int,
        *,
        weigh: Callable[[object], int] = lambda value: 1,
        on_evict: Callable[[object], object] | None = None,
    ):
        """Keep entries whose weights sum to at most `limit`; `on_evict` releases what falls out."""
        self.limit = limit
        self.weigh = weigh
        self.on_evict = on_evict
        self.used = 0
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        weight = self.weigh(value)
        if weight > self.limit:
            return
        evicted = []
        with self.lock:
            old = self.items.pop(key, None)
            if old is not None:
                self.used -= self.weigh(old)
                evicted.append(old)
            self.items[key] = value
            self.used += weight
            while self.used > self.limit:
                _, dropped = self.items.popitem(last=False)
                self.used -= self.weigh(dropped)
                evicted.append(dropped)
        if self.on_evict is not None:
            for value in evicted:
                self.on_evict(value)
