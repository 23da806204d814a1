"""Models and kernels: the Llama family, paged attention backends, CPU matmul and attention
kernels (C++ in csrc/), the layout of a model cut for tensor and pipeline parallelism, and the
checkpoint loaders (GGUF, Hugging Face folders) with their tokenizers."""
