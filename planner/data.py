"""Every number the planner takes from outside its own arithmetic, each with where it comes from.

A `Cited` is a number (or a low-high range), its unit, and a citation: `source` names a
document in SOURCES and `where` the place in it (the section and the words quoted, or the
datasheet's column). GPUs and built-in models carry the same citation for their whole row.
The plan prints the numbers and their keys (`[gpu.h100]`, `[article.realistic-fraction]`),
never the quotes: `splitserve plan` output is arithmetic, and docs/planning.md lists every key
with its citation (a test keeps that list complete).

Units: GB and TB are decimal (10^9, 10^12 bytes), as GPU datasheets and the article use them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from splitserve.planner.architecture import Architecture

SOURCES = {
    "article": "Distributed LLM Inference: Scaling Beyond One GPU (AI Tools Hub), the article "
    "this project's sizing follows",
    "nvidia-h100": "NVIDIA H100 Tensor Core GPU datasheet",
    "nvidia-h200": "NVIDIA H200 Tensor Core GPU datasheet",
    "nvidia-a100": "NVIDIA A100 Tensor Core GPU datasheet",
    "nvidia-l4": "NVIDIA L4 Tensor Core GPU datasheet",
    "nvidia-l40s": "NVIDIA L40S GPU datasheet",
    "amd-mi300x": "AMD Instinct MI300X accelerator datasheet",
    "hf-hub": "the model's config.json on the Hugging Face Hub",
    "formats": "the number formats' definitions: IEEE 754 binary32, bfloat16, OCP 8-bit "
    "floating point (FP8), two's-complement integers",
    "assumption": "splitserve's own assumption: no source gives this number",
}


@dataclass(frozen=True)
class Cited:
    key: str
    value: float | tuple[float, float]  # a range is (low, high)
    unit: str  # as printed after the number, with its own leading space where one belongs
    source: str  # a key of SOURCES
    where: str
    qualifier: str = ""  # how the source states it: "about", "roughly", "over"

    @property
    def mid(self) -> float:
        """The value, or the middle of a range."""
        return sum(self.value) / 2 if isinstance(self.value, tuple) else self.value

    def __str__(self) -> str:
        if isinstance(self.value, tuple):
            number = "-".join(f"{v:,g}" for v in self.value)
        else:
            number = f"{self.value:,g}"
        return f"{self.qualifier} {number}{self.unit}".strip()


# ---- bytes per value -------------------------------------------------------------------------
DTYPE_BYTES: dict[str, Cited] = {
    c.key.removeprefix("dtype."): c
    for c in (
        Cited("dtype.fp16", 2, " B", "article", "Why You Cannot Just Use One GPU: 'A model "
              "parameter stored in fp16 takes 2 bytes.'"),
        Cited("dtype.bf16", 2, " B", "formats", "bfloat16: 16 bits (8 exponent, 7 fraction)"),
        Cited("dtype.fp8", 1, " B", "formats", "OCP FP8 (E4M3 and E5M2): 8 bits"),
        Cited("dtype.int8", 1, " B", "formats", "8-bit integers"),
        Cited("dtype.int4", 0.5, " B", "formats", "4-bit integers, two to a byte (a plan adds "
              "the group scales and the int8 embedding and lm_head the engine keeps)"),
        Cited("dtype.fp32", 4, " B", "formats", "IEEE 754 binary32: 32 bits"),
    )
}  # fmt: skip
KV_DTYPES = ("fp16", "bf16", "fp8", "int8", "fp32")  # a KV cache is not stored in int4

# ---- the article's rules of thumb ----------------------------------------------------------
REALISTIC_FRACTION = Cited(
    "article.realistic-fraction", (0.30, 0.40), " of the ceiling", "article",
    "Why You Cannot Just Use One GPU: 'Real-world single-GPU throughput on large models lands "
    "60–70 % below that ceiling'",
)  # fmt: skip
MAX_TP = Cited(
    "article.max-tp", 8, " GPUs", "article",
    "Tensor Parallelism: 'use tensor parallelism within a node (typically TP degree 4 or 8 on "
    "an 8-GPU node)'; beyond a node, pipeline stages (Pipeline Parallelism)",
)  # fmt: skip
TP_OVER_PCIE = Cited(
    "article.tp-over-pcie", 0.5, "x the NVLink throughput", "article",
    "Tensor Parallelism, Real number: 'vLLM serving Llama 3 70B with TP=4 on four A100 80 GB "
    "GPUs (NVLink) achieves approximately 1,800 tokens/second at batch size 32. The same model "
    "with TP=4 over PCIe drops to around 900 tokens/second'",
)  # fmt: skip
KV_8BIT_SEQUENCES = Cited(
    "article.kv-8bit", 2, "x the sequences of an fp16 KV cache", "article",
    "KV Cache Optimization, Quantization of KV cache: FP8 or INT8 instead of FP16 'effectively "
    "doubles the number of sequences that fit in VRAM'",
)  # fmt: skip
AWQ_INT4_SAVING = Cited(
    "article.awq-int4-vram", 50, "% less VRAM than fp16", "article",
    "Cost Analysis: 'AWQ INT4 on Llama 3 70B reduces VRAM usage by ~50 %'", "about",
)  # fmt: skip

# ---- the article's figures that a plan recomputes --------------------------------------------
WEIGHTS_70B_FP16 = Cited(
    "article.weights-70b-fp16", 140, " GB", "article",
    "Why You Cannot Just Use One GPU: 'A 70B-parameter model therefore requires roughly 140 GB "
    "just for the weights'", "roughly",
)  # fmt: skip
WEIGHTS_405B_FP16 = Cited(
    "article.weights-405b-fp16", 800, " GB", "article",
    "Why You Cannot Just Use One GPU: 'Llama 3 405B in fp16 requires over 800 GB.'", "over",
)  # fmt: skip
KV_70B_4K_32 = Cited(
    "article.kv-70b-4k-32", (30, 40), " GB", "article",
    "Why You Cannot Just Use One GPU: 'At a 4 K context window with a batch of 32, the KV cache "
    "for Llama 3 70B adds another 30–40 GB on top of the weights.'",
)  # fmt: skip
CEILING_70B_H100 = Cited(
    "article.ceiling-70b-h100", 23, " forward passes/s", "article",
    "Why You Cannot Just Use One GPU: 3.35 TB/s and 'roughly 140 GB of weights per forward "
    "pass, yielding a theoretical ceiling of about 23 forward passes per second'", "about",
)  # fmt: skip


# ---- GPUs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    name: str
    description: str
    memory_gb: float  # HBM/GDDR capacity, decimal GB as marketed
    bandwidth_tbs: float  # memory bandwidth, TB/s
    bf16_tflops: float  # dense (no sparsity) bf16 tensor-core peak
    interconnect: str  # GPU-to-GPU link inside a node
    fast_interconnect: bool  # NVLink-class (TP-friendly) rather than PCIe only
    source: str  # the datasheet, a key of SOURCES
    where: str
    price: Cited  # typical cloud price per GPU-hour

    @property
    def key(self) -> str:
        return f"gpu.{self.name}"

    @property
    def usd_per_hour(self) -> float:
        return self.price.mid


def _price(gpu: str, usd: float | tuple[float, float], source: str, where: str) -> Cited:
    return Cited(f"price.{gpu}", usd, " $/GPU-hour", source, where)


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU(
            "h100", "NVIDIA H100 SXM5 80 GB", 80, 3.35, 989, "NVLink 4 (900 GB/s)", True,
            "nvidia-h100", "H100 SXM: 80 GB HBM3, 3.35 TB/s, BF16 1,979 TFLOPS with sparsity "
            "(989 dense), NVLink 900 GB/s; the article's Hardware Planning quotes the 3.35 TB/s "
            "and 'NVLink 4.0 at 900 GB/s'",
            _price("h100", (8, 10), "article", "Hardware Planning, H100 SXM5: 'Cloud on-demand "
                   "runs $8–10/GPU-hour' (the midpoint)"),
        ),
        GPU(
            "h200", "NVIDIA H200 SXM 141 GB", 141, 4.8, 989, "NVLink 4 (900 GB/s)", True,
            "nvidia-h200", "H200 SXM: 141 GB HBM3e, 4.8 TB/s, BF16 1,979 TFLOPS with sparsity "
            "(989 dense), NVLink 900 GB/s",
            _price("h200", 10.0, "assumption", "a little above the H100's midpoint (the "
                   "article prices no H200)"),
        ),
        GPU(
            "a100-80g", "NVIDIA A100 SXM 80 GB", 80, 2.039, 312, "NVLink 3 (600 GB/s)", True,
            "nvidia-a100", "A100 80GB SXM: 80 GB HBM2e, 2,039 GB/s, BF16 312 TFLOPS dense, "
            "NVLink 600 GB/s; the article's Hardware Planning: 'NVLink 3.0 at 600 GB/s'",
            _price("a100-80g", (3, 4), "article", "Hardware Planning, A100 80 GB SXM: 'on-demand "
                   "$3–4' (the midpoint; 'spot pricing runs $2–3')"),
        ),
        GPU(
            "a100-40g", "NVIDIA A100 SXM 40 GB", 40, 1.555, 312, "NVLink 3 (600 GB/s)", True,
            "nvidia-a100", "A100 40GB SXM: 40 GB HBM2, 1,555 GB/s, BF16 312 TFLOPS dense, "
            "NVLink 600 GB/s",
            _price("a100-40g", 3.0, "assumption", "a little below the A100 80 GB's midpoint "
                   "(the article prices no 40 GB A100)"),
        ),
        GPU(
            "l4", "NVIDIA L4 24 GB", 24, 0.300, 121, "PCIe 4 only", False,
            "nvidia-l4", "L4: 24 GB GDDR6, 300 GB/s, BF16 242 TFLOPS with sparsity (121 "
            "dense), PCIe Gen4 x16, no NVLink",
            _price("l4", 0.80, "article", "Hardware Planning, L4 / L40S: 'costs around "
                   "$0.80/GPU-hour spot' (a spot price, the others are on-demand)"),
        ),
        GPU(
            "l40s", "NVIDIA L40S 48 GB", 48, 0.864, 362, "PCIe 4 only", False,
            "nvidia-l40s", "L40S: 48 GB GDDR6, 864 GB/s, BF16 733 TFLOPS with sparsity (362 "
            "dense), PCIe Gen4 x16, no NVLink",
            _price("l40s", 1.60, "assumption", "twice the L4's (the article prices no L40S)"),
        ),
        GPU(
            "mi300x", "AMD Instinct MI300X 192 GB", 192, 5.3, 1307, "Infinity Fabric (896 GB/s)",
            True,
            "amd-mi300x", "MI300X OAM: 192 GB HBM3, 5.3 TB/s, BF16 1,307 TFLOPS dense, 896 GB/s "
            "Infinity Fabric peer bandwidth; the article's Hardware Planning: '192 GB of HBM3 "
            "memory per GPU'",
            _price("mi300x", 9.0, "assumption", "the H100's midpoint: the article gives no "
                   "price, only 'Cost is competitive with H100' (Hardware Planning)"),
        ),
    )
}  # fmt: skip

# ---- built-in models ---------------------------------------------------------------------------
BUILTIN_MODELS: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama-3-8b", 32, 4096, 14336, 32, 8, 128, 128256, False, False, 8192, "8B",
                     "meta-llama/Meta-Llama-3-8B"),
        Architecture("llama-3-70b", 80, 8192, 28672, 64, 8, 128, 128256, False, False, 8192,
                     "70B", "meta-llama/Meta-Llama-3-70B"),
        # The only 405B is Llama 3.1's (128K context).
        Architecture("llama-3-405b", 126, 16384, 53248, 128, 8, 128, 128256, False, False,
                     131072, "405B", "meta-llama/Llama-3.1-405B"),
        Architecture("llama-2-70b", 80, 8192, 28672, 64, 8, 128, 32000, False, False, 4096,
                     "70B", "meta-llama/Llama-2-70b-hf"),
        # No GQA: 32 KV heads.
        Architecture("llama-2-7b", 32, 4096, 11008, 32, 32, 128, 32000, False, False, 4096, "7B",
                     "meta-llama/Llama-2-7b-hf"),
        Architecture("mistral-7b", 32, 4096, 14336, 32, 8, 128, 32000, False, False, 32768, "7B",
                     "mistralai/Mistral-7B-v0.1"),
        Architecture("qwen2-72b", 80, 8192, 29568, 64, 8, 128, 152064, False, True, 32768, "72B",
                     "Qwen/Qwen2-72B"),
        # The default model (the -Instruct variant has the same config).
        Architecture("smollm2-135m", 30, 576, 1536, 9, 3, 64, 49152, True, False, 8192, "135M",
                     "HuggingFaceTB/SmolLM2-135M"),
    )
}  # fmt: skip


# ---- every citation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Citation:
    key: str
    source: str
    where: str


def citations() -> Iterator[Citation]:
    """Every key the planner can print, with its source and place: the table in
    docs/planning.md."""
    rules = (
        REALISTIC_FRACTION, MAX_TP, TP_OVER_PCIE, KV_8BIT_SEQUENCES, AWQ_INT4_SAVING,
        WEIGHTS_70B_FP16, WEIGHTS_405B_FP16, KV_70B_4K_32, CEILING_70B_H100,
    )  # fmt: skip
    for c in (*DTYPE_BYTES.values(), *rules):
        yield Citation(c.key, c.source, c.where)
    for g in GPUS.values():
        yield Citation(g.key, g.source, g.where)
        yield Citation(g.price.key, g.price.source, g.price.where)
    for a in BUILTIN_MODELS.values():
        yield Citation(a.key, "hf-hub", f"{a.repo}: config.json")
