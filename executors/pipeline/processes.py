"""Stage processes a pipeline starts itself: what each is told, and making sure none outlives us.

`spawn_stage` runs `python -m splitserve.executors.pipeline.stage --spec-json ...` with everything
the stage needs to build exactly its part of the model (the engine config, its layer range, the
pool's block count, and, for random weights, the architecture and seed). The child binds a free
loopback port and writes it to a file once its weights are loaded; `wait_address` waits for that
file (or for the child's early death). The child also watches our pid and exits when we are
gone, so even a killed worker leaves no stage behind; `stop_stages` is the orderly way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from splitserve.engine.config import EngineConfig, ModelConfig

SPAWN_POLL_S = 0.05
STOP_GRACE_S = 10.0


class StageStartError(RuntimeError):
    """A stage process exited or never came up."""


@dataclass(frozen=True)
class StageSpec:
    """Everything a stage process is built from."""

    index: int
    first_layer: int
    last_layer: int
    num_blocks: int
    engine: EngineConfig
    # The architecture, when the weights are drawn from the seed rather than loaded.
    random_model: ModelConfig | None = None

    def to_json(self) -> str:
        engine = dataclasses.asdict(self.engine)
        doc: dict[str, Any] = {
            "index": self.index,
            "first_layer": self.first_layer,
            "last_layer": self.last_layer,
            "num_blocks": self.num_blocks,
            "engine": engine,
        }
        if self.random_model is not None:
            doc["random_model"] = {
                "config": self.random_model.to_hf(),
                "name": self.random_model.name,
            }
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> StageSpec:
        doc = json.loads(text)
        engine = dict(doc["engine"])
        for name in ("pipeline_layers", "pipeline_stage_addresses"):
            if engine.get(name) is not None:
                engine[name] = tuple(engine[name])
        random_model = None
        if doc.get("random_model"):
            rm = doc["random_model"]
            random_model = ModelConfig.from_hf(rm["config"], name=rm["name"])
        return cls(
            index=int(doc["index"]),
            first_layer=int(doc["first_layer"]),
            last_layer=int(doc["last_layer"]),
            num_blocks=int(doc["num_blocks"]),
            engine=EngineConfig(**engine),
            random_model=random_model,
        )


class StageProcess:
    """One child stage: the process and the file its port arrives in."""

    def __init__(self, spec: StageSpec, host: str = "127.0.0.1") -> None:
        self.spec = spec
        self.host = host
        self._dir = tempfile.mkdtemp(prefix=f"splitserve-stage{spec.index}-")
        self.port_file = os.path.join(self._dir, "port")
        cmd = [
            sys.executable,
            "-m",
            "splitserve.executors.pipeline.stage",
            "--spec-json",
            spec.to_json(),
            "--host",
            host,
            "--port",
            "0",
            "--port-file",
            self.port_file,
            "--parent-pid",
            str(os.getpid()),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Logs go where ours go (the worker's log); stdin is nobody's.
        # A session of its own: signals meant for our process group (a launcher stopping us,
        # Ctrl-C) must not stop a stage before we are done with it; we stop it ourselves, and
        # it exits by itself if we die.
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        """The exit code, waiting up to `wait_s` for one; None while it runs."""
        try:
            return self.proc.wait(wait_s) if wait_s > 0 else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def wait_address(self, deadline: float) -> str:
        """host:port once the stage serves; StageStartError if it dies or time runs out."""
        while True:
            code = self.proc.poll()
            if code is not None:
                raise StageStartError(
                    f"pipeline stage {self.spec.index} exited with code {code} while starting "
                    "(its log is above)"
                )
            if os.path.exists(self.port_file):
                with open(self.port_file) as f:
                    text = f.read().strip()
                if text.isdigit():
                    return f"{self.host}:{text}"
            if time.monotonic() > deadline:
                raise StageStartError(f"pipeline stage {self.spec.index} did not start in time")
            time.sleep(SPAWN_POLL_S)

    def cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


def stop_stages(procs: list[StageProcess], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every stage, wait up to `grace_s` in all, then SIGKILL what is left."""
    for p in procs:
        if p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.proc.kill()
            p.proc.wait()
        p.cleanup()
