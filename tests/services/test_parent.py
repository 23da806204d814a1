"""A service dies with the launcher that started it, even a launcher killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

from splitserve.launcher.supervisor import child_env
from splitserve.services.parent import PARENT_PID_ENV

# The launcher: starts a child the way the supervisor does, prints its pid, then waits.
LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys, time
    from splitserve.launcher.supervisor import child_env
    child = "from splitserve.services.parent import follow_launcher; follow_launcher(); " + (
        "import os, time; print('grandchild env', os.environ.get('SPLITSERVE_PARENT_PID'), "
        "flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], env=child_env({}))
    print(proc.pid, flush=True)
    time.sleep(120)
    """
)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by init, perhaps not at once)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _gone_with(launcher: subprocess.Popen, child: int) -> bool:
    """SIGKILL the launcher; did `child` go within 20 s? (Killed here if not.)"""
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(10)
    try:
        return _gone(child, 20)
    finally:
        if _running(child):
            os.kill(child, signal.SIGKILL)


def test_a_child_dies_when_its_launcher_is_sigkilled():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    child = int(launcher.stdout.readline())
    assert launcher.stdout.readline().split() == ["grandchild", "env", "None"]  # not passed on
    assert not _gone(child, 0.5)  # alive while the launcher is
    assert _gone_with(launcher, child), "the child outlived its SIGKILLed launcher"


def test_only_the_main_thread_asks_for_it():
    assert child_env({})[PARENT_PID_ENV] == str(os.getpid())
    seen: list[dict[str, str]] = []
    t = threading.Thread(target=lambda: seen.append(child_env({PARENT_PID_ENV: "1"})))
    t.start()
    t.join()
    assert PARENT_PID_ENV not in seen[0]  # a thread may end before we do: never tie a child to it


def test_a_child_whose_launcher_is_already_gone_exits():
    code = "from splitserve.services.parent import follow_launcher; follow_launcher()"
    env = {**os.environ, PARENT_PID_ENV: "1"}  # not our parent: it died before we looked
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert done.returncode == 1


def test_a_program_that_is_not_ours_dies_with_the_launcher_too():
    """llama-server under `bench serve --compare`: started through services.parent's wrapper."""
    launcher_code = textwrap.dedent(
        """
        import subprocess, sys, time
        from splitserve.launcher.supervisor import child_env
        from splitserve.services.parent import wrapped
        proc = subprocess.Popen(wrapped(["sleep", "120"]), env=child_env({}))
        print(proc.pid, flush=True)
        time.sleep(120)
        """
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, text=True
    )
    assert launcher.stdout is not None
    child = int(launcher.stdout.readline())
    deadline = time.monotonic() + 20
    while _comm(child) != "sleep":  # the wrapper execs the program in the same process
        assert time.monotonic() < deadline, _comm(child)
        time.sleep(0.05)
    assert _gone_with(launcher, child), "the program outlived its SIGKILLed launcher"


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_the_wrapper_without_a_program_is_a_one_line_error():
    done = subprocess.run(
        [sys.executable, "-m", "splitserve.services.parent"], capture_output=True, text=True
    )
    assert done.returncode == 1 and done.stderr.strip().startswith("usage:")
