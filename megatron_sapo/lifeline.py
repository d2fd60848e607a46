"""Nothing outlives its trainer: every process the trainer starts ends when the trainer ends, SIGKILL included.

A SIGKILLed trainer runs no code, so it cannot stop its children: each child has to notice by itself. A child armed
here (`arm(parent)`) watches its parent process from a daemon thread and SIGKILLs itself (or, `group=True`, its
whole process group) within milliseconds of the parent's end:

- The watch is a pidfd of the parent (Linux >= 5.3), which becomes readable when the parent *process* has exited.
  The kernel's parent-death signal (PR_SET_PDEATHSIG) is not used: it fires when the *thread* that started the child
  ends, and the trainer starts children from worker threads (an SGLang restart inside a request's retry, a reward
  worker replaced by the batch's thread), whose end would kill a healthy child. Without pidfd_open (older kernels,
  other systems) the thread polls getppid() every POLL_S seconds instead.
- The race: the parent's pid is handed to the child, not read by it, and checked once the watch is open. A child
  whose parent died before it armed (it has been re-parented, so getppid() differs) dies at once.
- The blocked thread holds no GIL; on the parent's end it needs the GIL for a moment, which a Python main thread
  gives up every few milliseconds.

Which child is covered how (the one place that lists them; a new kind of child gets its row here):

  child                                      started by                         covered by
  SGLang server (launcher, its scheduler,    rollout/sglang.py (Popen, a        the launcher arms with group=True
    detokenizer and resource tracker)          session of its own)                (sglang_launch_shielded.py); its
                                                                                  children share its process group
  embedded engine process (async rollouts)   rollout/engine_process.py (spawn)  arm() first thing in the child
  reward workers                             rewards/pool.py (spawn)            arm() first thing in the child
  Megatron's checkpoint write workers        dist_checkpointing (fork)          install(): every child forked by the
                                                                                  trainer arms (an at-fork hook)
  Megatron's write-results manager           dist_checkpointing (spawn, kept)   started by policy/checkpoint.py with
                                                                                  arm() as its initializer
  multiprocessing resource trackers          multiprocessing (spawn)            end by themselves once every process
                                                                                  holding their pipe has ended
Servers attached by URL (rollout.sglang.urls) are not the trainer's: nothing here touches them.

This module imports only the standard library: the SGLang launcher, run by the servers' own interpreter where
megatron_sapo is not installed, loads it by path.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

POLL_S = 0.2
PARENT_ENV = "SAPO_LIFELINE_PARENT"  # the trainer's pid, for a child started by exec that arms itself (SGLang)

_installed = False
_forking_parent: int | None = None


def arm(parent: int, *, group: bool = False, name: str = "") -> None:
    """Make this process end (SIGKILL) when process `parent`, its parent, ends; `group`: its whole process group too
    (only when this process leads the group, so that a child never kills its parent's group). Returns at once; a
    parent already gone ends this process before arm returns."""
    what = name or f"process {os.getpid()}"

    def die(why: str) -> None:
        print(f"{what}: {why}; ending with it", file=sys.stderr, flush=True)
        if group and os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    try:
        handle = os.pidfd_open(parent)
    except ProcessLookupError:
        die(f"its parent {parent} has already ended")
    except (AttributeError, OSError):  # no pidfd here: poll
        handle = None
    if os.getppid() != parent:  # the pid may be another process's by now: ours is gone
        die(f"its parent {parent} has already ended")

    def watch() -> None:
        if handle is not None:
            watcher = select.poll()  # (select() refuses descriptors past 1023)
            watcher.register(handle, select.POLLIN)
            while not watcher.poll():  # readable once the parent has exited
                pass
        else:
            while os.getppid() == parent:
                time.sleep(POLL_S)
        die(f"its parent {parent} ended")

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def install() -> None:
    """In the trainer: every child forked from now on (processes that Megatron-Core forks, which no code of ours
    runs in), and every child those fork in turn, arms against the process that forked it. Idempotent."""
    global _installed
    if not _installed:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _installed = True


def _before_fork() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _after_fork_in_child() -> None:
    arm(_forking_parent, name=f"child {os.getpid()} forked by {_forking_parent}")


def env_for_exec() -> dict[str, str]:
    """The environment entry that tells a child started by exec, which arms itself from it, whom to watch."""
    return {PARENT_ENV: str(os.getpid())}


def arm_from_env(*, group: bool = False, name: str = "") -> bool:
    """arm() against the pid in $SAPO_LIFELINE_PARENT, if set (and then remove it, so that this process's own
    children do not take the trainer for their parent); whether it was set."""
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent:
        return False
    arm(int(parent), group=group, name=name)
    return True
