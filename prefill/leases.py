"""Exported prompt KV held for a decode worker to pull: leased, bounded, and expiring.

A prefill reserves the bytes *before* it computes (so a full table answers RESOURCE_EXHAUSTED
fast, not after the work), then commits the serialized KV under an unguessable lease id. A
lease ends exactly once: pulled (its bytes are freed when the PullKV stream ends, however it
ends), released (ReleaseKV), or expired (a decode that never came). A lease being pulled can't
expire under the stream, and can't be pulled twice.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from splitserve.wire.kv_codec import CHUNK_BYTES, TransferHeader


class LeaseCapacityError(Exception):
    """The table's byte budget is spoken for: RESOURCE_EXHAUSTED."""


@dataclass
class Lease:
    lease_id: str
    header: TransferHeader
    data: bytes | memoryview  # the exported KV's bytes (a view of its tensor)
    expires_at: float
    block_ids: tuple[int, ...] = ()
    pulling: bool = False
    # called once when the lease ends (pulled, released or expired)
    on_end: list[Callable[[], None]] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        return len(self.data)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, memoryview]]:
        """(offset, view) pieces of the KV: views, not copies (wire/kv_chunks.py copies each
        once, into the message it sends)."""
        view = memoryview(self.data)
        for off in range(0, len(view), chunk_bytes):
            yield off, view[off : off + chunk_bytes]


class Reservation:
    """Bytes promised to one prefill; `commit` turns them into a lease, `cancel` frees them."""

    def __init__(self, table: LeaseTable, num_bytes: int) -> None:
        self.table = table
        self.num_bytes = num_bytes
        self.done = False

    def commit(
        self, header: TransferHeader, data: bytes | memoryview, block_ids: tuple[int, ...] = ()
    ) -> Lease:
        self._end()
        return self.table._add(header, data, block_ids)

    def cancel(self) -> None:
        if not self.done:
            self._end()

    def _end(self) -> None:
        if self.done:
            raise RuntimeError("reservation already ended")
        self.done = True
        self.table._reserved_bytes -= self.num_bytes
        self.table._changed()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class LeaseTable:
    def __init__(
        self,
        max_bytes: int,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._on_change = on_change
        self._leases: dict[str, Lease] = {}
        self._lease_bytes = 0
        self._reserved_bytes = 0

    @property
    def num_bytes(self) -> int:
        """Bytes held or promised: what the budget is checked against."""
        return self._lease_bytes + self._reserved_bytes

    def __len__(self) -> int:
        return len(self._leases)

    def reserve(self, num_bytes: int) -> Reservation:
        if self.num_bytes + num_bytes > self.max_bytes:
            raise LeaseCapacityError(
                f"KV lease table is full ({self.num_bytes} of {self.max_bytes} bytes held); "
                "retry on another prefill worker or later"
            )
        self._reserved_bytes += num_bytes
        self._changed()
        return Reservation(self, num_bytes)

    def begin_pull(self, lease_id: str) -> Lease | None:
        """The lease for a PullKV stream, or None if unknown, gone or already being pulled."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.pulling:
            return None
        lease.pulling = True
        return lease

    def release(self, lease_id: str) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._lease_bytes -= lease.num_bytes
        self._changed()
        for callback in lease.on_end:
            callback()
        return True

    def expire(self) -> int:
        """Drop leases past their time that nobody is pulling; returns how many."""
        now = self._clock()
        stale = [i for i, x in self._leases.items() if x.expires_at <= now and not x.pulling]
        for lease_id in stale:
            self.release(lease_id)
        return len(stale)

    def _add(self, header: TransferHeader, data: bytes, block_ids: tuple[int, ...]) -> Lease:
        lease_id = secrets.token_urlsafe(18)  # unguessable: a lease id is a capability
        lease = Lease(lease_id, header, data, self._clock() + self.ttl_s, block_ids)
        self._leases[lease_id] = lease
        self._lease_bytes += lease.num_bytes
        self._changed()
        return lease

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._lease_bytes)
