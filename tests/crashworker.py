"""Crash injection: run one registry operation in a forked child and SIGKILL it after a delay.

The parent imports torch and the registry once and opens nothing, so each child starts in
milliseconds with no threads or connections inherited; the child opens its own registry. Reads
one JSON request per line on stdin, writes one JSON result per line on stdout:
``{"op", "delay", "catalog", "store", "home", ...}`` -> ``{"outcome": "killed"|"finished"|"busy"|"failed", "elapsed"}`` (busy: a gc found another one running).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from dsreg import Conflict, Registry


def _run(req: dict) -> None:
    with Registry.open(req["catalog"], req["store"], home=req["home"]) as reg:
        op = req["op"]
        if op == "push":
            reg.push(req["path"], req["subject"], base="tiny", energy=req.get("energy", 0.5), device="cpu")
        elif op == "checkout":
            reg.checkout(req["ref"], req["output"], device="cpu")
        elif op == "rm":
            reg.rm(req["ref"])
        elif op == "gc":
            reg.gc(grace=0)
        else:
            raise ValueError(op)


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _run(req)
            except Conflict:  # another gc had the lock (the long mode races one): not a failure
                code = 3
            except BaseException as exc:  # reported as "failed"; the parent checks what it left behind
                print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        outcome = None
        while outcome is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                outcome = {0: "finished", 3: "busy"}.get(os.waitstatus_to_exitcode(status), "failed")
            elif time.monotonic() - start >= req["delay"]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                outcome = "killed"
            else:
                time.sleep(0.001)
        print(json.dumps({"outcome": outcome, "elapsed": time.monotonic() - start}), flush=True)


if __name__ == "__main__":
    main()
