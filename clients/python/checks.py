"""The example programs' checking: named steps, checks that end the program with a message
naming the step, and the one way a run reports its failure. Scaffolding of the examples (a
service keeps jobsvc_client.py, not this)."""

import sys

import grpc

from jobsvc_client import error_info


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


_current_step = "start"


def step(name):
    global _current_step
    _current_step = name
    print(f"==> {name}", flush=True)


def run(main):
    """Runs `main`; any failure ends the program with exit status 1 and a line naming the step."""
    try:
        main()
    except Failure as failure:
        sys.exit(f"FAILED at step '{_current_step}': {failure}")
    except grpc.RpcError as err:
        info = error_info(err)
        reason = f" (reason {info.reason})" if info else ""
        sys.exit(f"FAILED at step '{_current_step}': {err.code().name}{reason}: {err.details()}")
