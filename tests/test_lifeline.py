"""Nothing outlives its trainer (megatron_sapo/lifeline.py, issue 29): a stand-in trainer starts every kind of child
the real one starts, through the real code that starts them (reward workers in a hung call, the embedded engine's
process mid-generation, a forked child that forks again, Megatron's write-results manager, an SGLang launcher with a
server-shaped process tree), and is SIGKILLed; none of its descendants, identified by pid and start time, may run a
few seconds later. A spawned child that nothing arms is the control: it survives, so the check can see a survivor.
The real trainer SIGKILLed in generation, checkpoints and with its SGLang server is in tests/test_faults.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .runs import alive, process_tree, run_env, time_to_end
from .test_trainer import REPO

pytestmark = pytest.mark.fault


def test_every_child_of_a_sigkilled_trainer_ends_with_it(tmp_path, fault_report):
    trainer = subprocess.Popen([sys.executable, "-m", "tests.standins.trainer", str(tmp_path)], cwd=REPO,
                               env=run_env(), stdout=subprocess.PIPE, text=True)
    tree = control = trackers = {}
    try:
        pids = json.loads(trainer.stdout.readline())
        tree = process_tree(trainer.pid)
        control = {pids["control"]: tree.pop(pids["control"])}
        # reward workers x2, engine, forked + its fork, manager, launcher + its subprocess, resource tracker
        assert len(tree) >= 9 and {pids["engine"], pids["forked"], pids["server"]} <= set(tree), tree
        # multiprocessing's resource tracker ends when every process holding its pipe has: the control too
        trackers = {pid: start for pid, cmd in alive(tree).items() if "resource_tracker" in cmd
                    for start in [tree.pop(pid)]}
        assert trackers
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        took = time_to_end(tree, timeout=5)
        time.sleep(0.5)
        assert alive(control), "the unarmed control child ended too: the check could not see a survivor"
        assert alive(trackers), "the control holds the resource tracker's pipe"
        os.kill(next(iter(control)), signal.SIGKILL)
        time_to_end(trackers, timeout=5)
    finally:
        trainer.kill()
        for pid in alive({**tree, **control, **trackers}):
            os.kill(pid, signal.SIGKILL)  # after a failure: nothing of this test stays behind
    print(f"\n{len(tree)} descendants of the SIGKILLed stand-in trainer ended within {took:.2f} s")
    fault_report("stand-in trainer SIGKILLed: every kind of child it starts", 1, 1, "-",
                 f"{len(tree)} descendants gone in {took:.2f} s")


ARM_LATE = r"""
import os, sys, time
sys.path.insert(0, sys.argv[3])
if sys.argv[2] == "poll":
    del os.pidfd_open  # a system without pidfd: the getppid() poll
from megatron_sapo import lifeline
time.sleep(float(sys.argv[4]))
lifeline.arm(int(sys.argv[1]))
print("armed", flush=True)
time.sleep(3600)
"""

PARENT = r"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(__import__("os").getpid()), *sys.argv[2:]])
print(child.pid, flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("watch", ["pidfd", "poll"])
@pytest.mark.parametrize("parent_ends", ["before arming", "after arming"])
def test_a_child_ends_whether_its_parent_ends_before_or_after_it_arms(tmp_path, watch, parent_ends):
    """The race: a parent that ends while its child is still starting up (before arm) ends the child at arm; and
    the watch itself, by pidfd and by the fallback poll of getppid()."""
    delay = "1.0" if parent_ends == "before arming" else "0"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, ARM_LATE, watch, str(REPO), delay],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    started = process_tree(parent.pid)
    assert child in started
    if parent_ends == "after arming":
        time.sleep(1.5)  # imported and armed by now
    parent.kill()
    parent.wait()
    took = time_to_end(started, timeout=8)
    said = parent.stdout.read()  # the child's output too: it shares the pipe
    if parent_ends == "after arming":
        assert "armed" in said and took < 1.0, (said, took)
    else:  # arm() itself ended it
        assert "armed" not in said, said
