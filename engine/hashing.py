"""Content hashes for KV blocks: one hash chain shared by workers, router and kvstore.

A block's key must name exactly one content, so it covers everything that changes the bytes:
the namespace (model id, KV dtype, block size, layer range, TP shard; built by the caller with
`kv_namespace`), the cache salt (first block only, so tenants never share a prefix), the parent
block's key and the block's token ids. SHA-256 over length-prefixed fields; never Python's
`hash()`, which is salted per process.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes  # 32 bytes of SHA-256


def _field(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def kv_namespace(
    model_id: str,
    kv_dtype: str,
    block_size: int,
    layer_range: tuple[int, int] = (0, -1),
    tp_rank: int = 0,
    tp_size: int = 1,
) -> bytes:
    """Bytes that seed every chain: two caches with different namespaces never share a key."""
    parts = (
        model_id,
        kv_dtype,
        str(block_size),
        f"{layer_range[0]}:{layer_range[1]}",
        f"{tp_rank}/{tp_size}",
    )
    return b"".join(_field(p.encode()) for p in parts)


def hash_block(
    parent: BlockHash | None,
    token_ids: Sequence[int],
    namespace: bytes = b"",
    salt: str | None = None,
) -> BlockHash:
    h = hashlib.sha256()
    h.update(_field(namespace))
    h.update(_field(parent or b""))
    h.update(_field((salt or "").encode()))
    h.update(_field(struct.pack(f"<{len(token_ids)}q", *token_ids)))
    return h.digest()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    namespace: bytes = b"",
    salt: str | None = None,
    start: int = 0,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids`, from block index `start` on.

    `parent` must be the hash of block `start - 1` when `start > 0`; the salt enters the chain
    only at block 0, and every later block inherits it through its parent.
    """
    out: list[BlockHash] = []
    for i in range(start, len(token_ids) // block_size):
        chunk = token_ids[i * block_size : (i + 1) * block_size]
        parent = hash_block(parent, chunk, namespace, salt if i == 0 else None)
        out.append(parent)
    return out
