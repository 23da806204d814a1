"""What crosses between pipeline stages, as protobuf messages over raw bytes (never pickle).

- a step's `StepWire`: its int64 tensor as little-endian bytes;
- hidden states and logits: `StageTensor` (dtype name, shape, bytes), checked against the shape
  the receiver expects before anything is allocated;
- a stage's layout (`StageLayout`): model, layer range, KV pool; compared field by field in the
  handshake, so a stage started with other flags is refused with every difference named;
- KV blocks of one stage's layers: the prefill -> decode transfer's header and chunks
  (wire/kv_codec.py), reused as is.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence

import torch

from splitserve.engine.config import ModelConfig
from splitserve.v1 import pb
from splitserve.wire.kv_codec import (
    KVAssembler,
    TransferHeader,
    bytes_to_tensor,
    dtype_name,
    parse_dtype_name,
    split_transfer,
    tensor_bytes,
)
from splitserve.wire.step_wire import StepWire

if sys.byteorder != "little":  # the wire format is little-endian and copied without swapping
    raise ImportError("pipeline stages need a little-endian machine")

# One message carries a whole micro-batch: hidden states of up to max_num_batched_tokens tokens
# or the logits of its sampled rows (49152 floats each for SmolLM2), well past gRPC's 4 MiB.
MAX_STAGE_MESSAGE_BYTES = 1 << 30
STAGE_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_STAGE_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_STAGE_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
ACTIVATION_DTYPES = ("float32", "bfloat16", "float16")


# ---- tensors --------------------------------------------------------------------------------
def tensor_message(t: torch.Tensor) -> pb.StageTensor:
    return pb.StageTensor(dtype=dtype_name(t.dtype), shape=list(t.shape), data=tensor_bytes(t))


def message_tensor(msg: pb.StageTensor, shape: Sequence[int]) -> torch.Tensor:
    """The tensor, if it is a float tensor of exactly `shape`; ValueError otherwise."""
    if msg.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"stage tensor dtype {msg.dtype!r} is not one of {ACTIVATION_DTYPES}")
    if tuple(msg.shape) != tuple(shape):
        raise ValueError(f"stage tensor of shape {tuple(msg.shape)}, expected {tuple(shape)}")
    return bytes_to_tensor(msg.data, parse_dtype_name(msg.dtype), shape)


def wire_bytes(wire: StepWire) -> bytes:
    return wire.to_tensor().numpy().tobytes()


def bytes_wire(data: bytes) -> StepWire:
    if len(data) % 8:
        raise ValueError(f"a step wire of {len(data)} bytes is not whole int64s")
    return StepWire.from_tensor(torch.frombuffer(bytearray(data), dtype=torch.int64))


# ---- layouts --------------------------------------------------------------------------------
def model_config_json(cfg: ModelConfig) -> str:
    return json.dumps(cfg.to_hf(), sort_keys=True)


def layout_message(
    cfg: ModelConfig,
    layers: tuple[int, int],
    num_blocks: int,
    block_size: int,
    dtype: str,
    tp_size: int,
) -> pb.StageLayout:
    return pb.StageLayout(
        model=cfg.name,
        model_config_json=model_config_json(cfg),
        first_layer=layers[0],
        last_layer=layers[1],
        num_blocks=num_blocks,
        block_size=block_size,
        dtype=dtype,
        tensor_parallel_size=tp_size,
    )


def layout_differences(expected: pb.StageLayout, actual: pb.StageLayout) -> list[str]:
    """Human-readable differences, one per field; empty when the two agree."""
    out = []
    for field in pb.StageLayout.DESCRIPTOR.fields:
        want, got = getattr(expected, field.name), getattr(actual, field.name)
        if want == got:
            continue
        if field.name == "model_config_json":
            a, b = json.loads(want or "{}"), json.loads(got or "{}")
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            out.append("model config differs in " + ", ".join(keys))
        else:
            out.append(f"{field.name} {got!r} (expected {want!r})")
    return out


# ---- KV blocks of one stage -----------------------------------------------------------------
def kv_chunks(kv: torch.Tensor, fmt: str | None = None) -> Iterator[pb.KVChunk]:
    """A stage's KV `(layers, 2, n, block_size, kv_heads, head_dim)` as chunks; the first one
    carries the header. `fmt`: the packed format a byte tensor holds (kv_codec)."""
    header, chunks = split_transfer(kv, num_tokens=0, fmt=fmt)
    first = True
    for offset, data in chunks:
        chunk = pb.KVChunk(offset=offset, data=data)
        if first:
            chunk.header.CopyFrom(
                pb.KVHeader(
                    dtype=header.dtype,
                    shape=list(header.shape),
                    total_bytes=header.total_bytes,
                    crc32=header.crc32,
                )
            )
            first = False
        yield chunk


def kv_assembler(header: pb.KVHeader, dtype: torch.dtype | str, pool: Sequence[int]) -> KVAssembler:
    """Receives chunks into a tensor that must fit `pool` (the stage's cache shape)."""
    h = TransferHeader(header.dtype, tuple(header.shape), 0, header.total_bytes, header.crc32)
    return KVAssembler(h, dtype, pool)
