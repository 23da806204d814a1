"""Large transfer buffers kept between transfers, up to a byte budget.

A fresh buffer of tens of MB costs more than the bytes that fill it: the kernel maps, faults
and zeroes every page. The decode worker therefore keeps the receive buffers of streamed pulls
(`kv_codec.ReceiveBuffers`) and the shared-memory files of same-host pulls
(`kv_shm.Segments`) for the next pull. Both follow one policy, written here once: `take` gives
the smallest kept item that holds the bytes asked for (else a new one), `give` keeps an item
while the kept ones fit `keep_bytes`, dropping the smallest first when they do not. An item
comes back only through `give`, once nothing reads or writes it any more; what to do with
one that is dropped (nothing, or deleting its file) is the subclass's.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class KeptBySize(Generic[T]):
    """The policy above; a subclass says how big an item is and how to make, reuse and drop
    one."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[T] = []

    def _size(self, item: T) -> int:
        raise NotImplementedError

    def _new(self, nbytes: int) -> T:
        raise NotImplementedError

    def _reuse(self, item: T) -> T | None:
        """`item` ready for another transfer, or None (it was dropped: make a new one)."""
        return item

    def _drop(self, item: T) -> None:
        """`item` leaves the pool for good."""

    @property
    def kept_bytes(self) -> int:
        return sum(map(self._size, self._free))

    def take(self, nbytes: int) -> T:
        """The smallest kept item that holds `nbytes` (it may be larger), else a new one."""
        fits = [item for item in self._free if self._size(item) >= nbytes]
        if fits:
            item = min(fits, key=self._size)
            self._free.remove(item)
            reused = self._reuse(item)
            if reused is not None:
                return reused
        return self._new(nbytes)

    def give(self, item: T) -> None:
        """Keep `item` for a later transfer if it fits the budget, else drop it; smaller
        items are dropped first when the budget runs over."""
        if self._size(item) > self.keep_bytes:
            self._drop(item)
            return
        self._free.append(item)
        self._free.sort(key=self._size, reverse=True)
        while self.kept_bytes > self.keep_bytes:
            self._drop(self._free.pop())

    def close(self) -> None:
        """Drop every kept item."""
        while self._free:
            self._drop(self._free.pop())
