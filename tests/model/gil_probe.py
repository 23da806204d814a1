"""Does a call let go of the GIL? A second thread counts while the call runs."""

import sys
import threading
import time

REPEAT_S = 1.0  # half the switch interval below


def ticks_during(call) -> int:
    """How many times another Python thread got to count while `call()` ran.

    The counter waits on an event that is set just before the call, and the switch interval is
    made long, so it can only get the GIL during the call if the call releases it: a call that
    holds the GIL gives 0, exactly, because the counter is told to stop before the interpreter
    would ever force a switch. A call too short for the counter to wake up in (the OS may not
    run it at once on a busy machine) is made again until the counter has ticked or
    REPEAT_S has passed, well inside the switch interval, so a call that holds the GIL still
    gives 0."""
    go, stop = threading.Event(), [False]
    ticks = [0]

    def count() -> None:
        go.wait()
        while not stop[0]:
            ticks[0] += 1
            if ticks[0] % 1000 == 0:
                time.sleep(0)  # hand the GIL back: the call is waiting to return

    old = sys.getswitchinterval()
    sys.setswitchinterval(2.0)  # far longer than `call`: no forced switch
    counter = threading.Thread(target=count)
    try:
        counter.start()
        go.set()
        end = time.monotonic() + REPEAT_S
        call()
        while ticks[0] == 0 and time.monotonic() < end:
            call()
        stop[0] = True
    finally:
        stop[0] = True
        counter.join()
        sys.setswitchinterval(old)
    return ticks[0]
