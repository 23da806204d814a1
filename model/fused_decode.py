"""A decode-sized step's decoder stack as one flat loop of kernel calls (the int8 blocks path).

With int8 activations (`--linear-backend blocks-int8`) SmolLM2's matmuls take ~2.5 ms of a
batch-1 decode step on 2 cores, and the rest of the step was Python: per layer about 25
nn.Module calls and torch dispatches (RMS norm alone is eight ops on CPU), each a few
microseconds, 30 layers deep. This loop calls the kernels directly, nine calls a layer: two
residual adds each with the RMS norm after it, four int8 block matmuls, rotary in place on the
fused QKV rows, the attention backend (which writes the new K/V and attends, as in the module
path; for a step of decodes only, in one C++ call) and silu * up, all but the attention from
model/csrc/block_linear.cpp. For a step of decodes only on the C++ attention backend and
without tensor parallelism, block_linear.cpp's `DecoderStack` runs this same loop in one C++
call (same kernels, same arguments, same order: bit-for-bit the loop's numbers), which takes
out the interpreter between the ~270 calls: 7.1 -> 6.5 ms a batch-1 step on a 2-vCPU Sapphire
Rapids VM (docs/benchmarks.md).

It computes what the modules compute, in float32 with another order of operations (the C++
RMS norm sums in float64, for instance), so it is used only where the numbers are not held
to float32 exactness anyway: a shard whose every linear is a single-part int8 `BlockLinear`
without bias. Steps of more than `MAX_TOKENS` tokens (prefill chunks) keep the module path,
whose torch kernels are multi-threaded and vectorized for long inputs.
"""

from __future__ import annotations

import torch

from splitserve.model import cpu_attention
from splitserve.model.attention import AttentionMetadata
from splitserve.model.block_linear import BlockLinear, load_kernel

MAX_TOKENS = 32


def _block_matmul(m, int8_only: bool) -> tuple | None:
    """(kernel function, (packed, format, rows)) of a single-part BlockLinear without bias
    (int8 unless `int8_only` is False), else None."""
    if not isinstance(m, BlockLinear) or len(m.formats) != 1 or m.bias is not None:
        return None
    if int8_only and not m.int8:
        return None
    return m._matmul, (m.packed, m.fmt, m.out_features)


class FusedDecoder:
    """Runs `model`'s layers for steps of up to MAX_TOKENS tokens; `build` says if it can."""

    MAX_TOKENS = MAX_TOKENS

    def __init__(self, model, layers: list[tuple]) -> None:
        # what it needs of the model, not the model: the model holds this loop (model.fused)
        self.rotary = model.rotary
        self.layers = layers
        self.kernel = load_kernel()
        cfg = model.cfg
        self.eps = cfg.rms_norm_eps
        self.head_dim = cfg.head_dim
        heads = model.heads
        self.num_q, self.num_kv = heads.num_q, heads.num_kv
        self.q_size, self.kv_size = heads.num_q * cfg.head_dim, heads.num_kv * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.comm = model.comm
        self.all_reduce = model.shard.tp_size > 1
        self._caches: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.stack = self._native_stack()  # for a float pool
        self.packed_stacks: dict[int, object] = {}  # KVQuant.code -> the stack for such a pool

    def _native_stack(self, kv_format: int = -1):
        """block_linear.cpp's DecoderStack over these layers: the whole loop below in one C++
        call, for a step of decodes only on the C++ attention backend without tensor
        parallelism (no Python all-reduce between the layers), for a float pool (kv_format -1)
        or a packed one (KVQuant.code). None where it can't be made."""
        attention = cpu_attention.load_kernel()
        if self.all_reduce or attention is None or not hasattr(self.kernel, "DecoderStack"):
            return None
        matmuls = {mat[0] for layer in self.layers for mat in (layer[1], layer[2], *layer[4:])}
        if matmuls == {self.kernel.block_linear_int8}:
            int8 = True
        elif matmuls == {self.kernel.block_linear}:
            int8 = False
        else:
            return None
        packed, fmts, rows = [], [], []
        for layer in self.layers:
            for _, (weight, fmt, n) in (layer[1], layer[2], *layer[4:]):
                packed.append(weight)
                fmts.append(fmt)
                rows.append(n)
        return self.kernel.DecoderStack(
            [layer[0] for layer in self.layers],
            [layer[3] for layer in self.layers],
            packed,
            fmts,
            rows,
            int8,
            self.num_q,
            self.num_kv,
            self.head_dim,
            self.eps,
            self.scale,
            attention.writing_capsule() if kv_format < 0 else attention.packed_writing_capsule(),
            kv_format,
        )

    def _stack_for(self, writing):
        """The native stack that does what `writing` (the backend's decode_writing, or None)
        does: the one for the pool format the writer names (`kv_format`, model/cpu_attention.py);
        None for a writer that names none, or where no native stack can be made."""
        kv_format = getattr(writing, "kv_format", None)
        if kv_format is None or self.stack is None:
            return None
        if kv_format < 0:
            return self.stack
        if kv_format not in self.packed_stacks:
            self.packed_stacks[kv_format] = self._native_stack(kv_format)
        return self.packed_stacks[kv_format]

    @classmethod
    def build(cls, model, int8_only: bool = True) -> FusedDecoder | None:
        """The loop for `model`, or None if a layer does not qualify. `int8_only=False` also
        takes float32 blocks (tests compare the loop with the modules that way)."""
        if next(model.parameters(), torch.empty(0)).device.type != "cpu":
            return None
        layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            mats = [_block_matmul(m, int8_only) for m in linears]
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(m is None for m in mats) or any(w.dtype != torch.float32 for w in norms):
                return None
            layers.append((norms[0].detach(), mats[0], mats[1], norms[1].detach(), *mats[2:]))
        if not layers or model.rotary.cos.dtype != torch.float32:
            return None
        return cls(model, layers)

    def _layer_caches(self, kv_cache: torch.Tensor):
        """Each layer's (K, V) views of the pool, made once per pool rather than per step."""
        if self._caches is None or self._caches[0] is not kv_cache:
            views = [(c[0], c[1]) for c in kv_cache.unbind(0)]
            self._caches = (kv_cache, views)
        return self._caches[1]

    def __call__(
        self,
        x: torch.Tensor,  # (T, hidden) float32, the embedding or the previous stage's output
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend,
        owned: bool,  # whether x may be updated in place
    ) -> torch.Tensor:
        k_ops, eps, hd = self.kernel, self.eps, self.head_dim
        x = x.contiguous() if owned else x.clone(memory_format=torch.contiguous_format)
        t = x.shape[0]
        cos, sin = self.rotary.cos[positions], self.rotary.sin[positions]  # (T, hd), fresh
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        # a step of decodes only, on a backend that writes this step's K/V and attends in one
        # call (model/cpu_attention.py): two torch dispatches and a copy fewer a layer
        writing = getattr(backend, "decode_writing", None) if meta.num_decodes == t else None
        stack = self._stack_for(writing)
        if stack is not None:
            return stack.run(
                x,
                cos,
                sin,
                kv_cache,
                meta.slot_mapping,
                meta.decode_block_tables,
                meta.decode_context_lens,
            )
        reduce = self.comm.all_reduce if self.all_reduce else None
        caches = self._layer_caches(kv_cache)
        # each residual add is done with the RMS norm that follows it (add_rms_norm_); the
        # first layer's input norm has no add before it, the last layer's add no norm after
        h = k_ops.rms_norm(x, self.layers[0][0], eps)
        for i, (layer, (kc, vc)) in enumerate(zip(self.layers, caches, strict=True)):
            _, (qkv_mm, qkv_w), (o_mm, o_w), ln2, (gu_mm, gu_w), (down_mm, down_w) = layer
            qkv = qkv_mm(h, *qkv_w)
            k_ops.rope_(qkv, cos, sin, self.num_q + self.num_kv, hd)
            q = qkv[:, :q_end].view(t, self.num_q, hd)
            if t > 1:
                q = q.contiguous()  # the C++ attention reads q as one dense (T, H, hd) run
            k = qkv[:, q_end:k_end].view(t, self.num_kv, hd)
            v = qkv[:, k_end:].view(t, self.num_kv, hd)
            if writing is not None:
                out = writing(q, k, v, kc, vc, meta, self.scale)
            else:
                out = backend(q, k, v, kc, vc, meta, self.scale)
            o = o_mm(out.reshape(t, self.q_size), *o_w)
            h = k_ops.add_rms_norm_(x, reduce(o) if reduce else o, ln2, eps)
            down = down_mm(k_ops.silu_mul(gu_mm(h, *gu_w)), *down_w)
            if reduce:
                down = reduce(down)
            if i + 1 < len(self.layers):
                h = k_ops.add_rms_norm_(x, down, self.layers[i + 1][0], eps)
            else:
                x.add_(down)
        return x
