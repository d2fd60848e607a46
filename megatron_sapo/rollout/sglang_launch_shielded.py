"""`sglang.launch_server` with the stop signals shielded: run by the SGLang servers' own interpreter, by path,

    python .../megatron_sapo/rollout/sglang_launch_shielded.py LAUNCH_SERVER_ARGUMENTS...

Under Slurm every process of a job step receives the signals meant for the trainer (SIGUSR1 before the time limit,
SIGTERM on scancel or preemption). A SGLang server that the trainer started itself is in the trainer's step, and
died of them before the trainer's last step and checkpoint were done. The signal mask that shields the trainer's
other helpers (megatron_sapo/signals.py) does not hold here: SGLang's resource tracker unblocks SIGINT and SIGTERM,
and SGLang and uvicorn install handlers of their own. So this launcher ignores SIGINT, SIGTERM and SIGUSR1 and keeps
them ignored: requests to handle them (`signal.signal`, an event loop's `add_signal_handler`) leave them ignored.
The ignored disposition passes to the server's own subprocesses (scheduler, detokenizer), which start with it.

The trainer stops such a server with SIGKILL to its process group (SGLangServer.stop); Slurm ends it with the step.
Ignoring the stop signals must not make it outlive the trainer: when the trainer ends, however it ends (SIGKILL
included), the launcher SIGKILLs its own process group, which holds the server's subprocesses (megatron_sapo/
lifeline.py: the trainer's pid comes in $SAPO_LIFELINE_PARENT).
This file imports nothing of megatron_sapo as a package (the servers' environment need not have it): lifeline.py,
which imports only the standard library, is loaded by path.
"""

import importlib.util
import os
import runpy
import signal
import sys

SHIELDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _shield() -> None:
    """Ignore the shielded signals, and make later handler requests for them no-ops. Runs before SGLang (and uvloop,
    which keeps a reference to signal.signal) is imported: asyncio's and uvloop's add_signal_handler go through
    signal.signal, so their handlers are registered but the signals stay ignored."""
    for sig in SHIELDED:
        signal.signal(sig, signal.SIG_IGN)
    set_handler = signal.signal

    def keep_ignored(sig, handler):
        if sig in SHIELDED:
            return signal.SIG_IGN
        return set_handler(sig, handler)

    signal.signal = keep_ignored


def _lifeline():
    """The module megatron_sapo/lifeline.py, loaded by its path beside this file's folder."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lifeline.py")
    spec = importlib.util.spec_from_file_location("megatron_sapo_lifeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    # run by path, this file's folder comes first on sys.path, and its sglang.py would shadow the sglang package
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    _lifeline().arm_from_env(group=True, name=f"SGLang launcher {os.getpid()}")
    _shield()
    sys.argv[0] = "sglang.launch_server"
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
