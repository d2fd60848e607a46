"""A rollout engine in a process of its own, so that its generation truly runs beside training: the trainer's process
keeps its cores for the updates while the engine's process samples (asynchronous rollouts with the embedded engine).

The child builds the engine from a factory and answers the parent's calls in order over a pipe; every call blocks
the calling thread only (it waits on the pipe without the GIL). An error in the child comes back as the same
exception type when it can be pickled (else a RuntimeError with the child's traceback); a child that dies is an
EngineProcessError naming its exit code. The child is started with the stop signals blocked (signals.py), so a
Slurm warning or a Ctrl-C reaches the trainer and not its engine; it exits when the parent's end of the pipe
closes, and ends with the parent whatever it is doing (lifeline.py).

Memory: the engine's model lives only in the child; a call moves its prompts and completions through the pipe
(pickled: a few bytes per token), never weights: updates name a folder the child loads.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import traceback

from .. import lifeline
from ..signals import shielded_children


class EngineProcessError(RuntimeError):
    pass


def _serve(conn, parent: int, factory, args: tuple, kwargs: dict) -> None:
    lifeline.arm(parent, name=f"rollout engine process {os.getpid()}")  # mid-generation, it reads no pipe
    try:
        engine = factory(*args, **kwargs)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, whatever it is
        conn.send(("error", _portable(err)))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, call_args = conn.recv()
        except EOFError:  # the parent is gone
            return
        try:
            result = getattr(engine, method)(*call_args)
        except BaseException as err:  # noqa: BLE001
            conn.send(("error", _portable(err)))
            continue
        conn.send(("ok", result))
        if method == "shutdown":
            return


def _portable(err: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError("".join(traceback.format_exception(err)))


class EngineProcess:
    """`factory(*args, **kwargs)` run in a spawned child; generate / update_weights / shutdown forwarded to it."""

    def __init__(self, factory, *args, **kwargs):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._lock = threading.Lock()  # one call at a time: answers come back in order
        with shielded_children():
            self._process = context.Process(target=_serve, args=(child, os.getpid(), factory, args, kwargs),
                                            name="rollout-engine", daemon=True)
            self._process.start()
        child.close()
        self._answer("starting the engine")

    def _answer(self, what: str):
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(timeout=5)
            raise EngineProcessError(f"the rollout engine's process died while {what} "
                                     f"(exit code {self._process.exitcode})") from None
        if status == "error":
            raise value
        return value

    def _call(self, method: str, *args):
        with self._lock:
            if not self._process.is_alive():
                raise EngineProcessError(f"the rollout engine's process is gone (exit code {self._process.exitcode})")
            self._conn.send((method, args))
            return self._answer(method)

    def generate(self, prompts, n, params, return_routes: bool = False):
        return self._call("generate", prompts, n, params, return_routes)

    def update_weights(self, model_dir, version: str) -> None:
        self._call("update_weights", model_dir, version)

    def shutdown(self) -> None:
        """Stop the child: asked to when it is idle, killed when a call is still running (the caller of that call
        then gets an EngineProcessError)."""
        if self._lock.acquire(blocking=False):
            try:
                if self._process.is_alive():
                    self._conn.send(("shutdown", ()))
                    self._process.join(timeout=30)
            except OSError:
                pass
            finally:
                self._lock.release()
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
