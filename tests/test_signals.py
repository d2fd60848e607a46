"""shielded_children: helper processes started inside it outlive the stop signals that Slurm sends to every process
of a job step, those started outside die of them, and the caller's signal mask comes back as it was. Each case runs
in a fresh interpreter, where multiprocessing's resource tracker has not started yet: its start unblocks SIGTERM
behind itself, the trap that shielded_children guards against."""

import subprocess
import sys
import textwrap

import pytest

CHILDREN = textwrap.dedent("""
    import contextlib, multiprocessing, os, signal, sys, time
    from megatron_sapo.signals import shielded_children

    def sleep():
        time.sleep(30)

    if __name__ == "__main__":
        with shielded_children() if sys.argv[1] == "shielded" else contextlib.nullcontext():
            manager = multiprocessing.get_context("spawn").Manager()  # Megatron's checkpoint writer keeps one
            forked = multiprocessing.get_context("fork").Process(target=sleep)
            forked.start()
        children = [manager._process, forked]
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            for child in children:
                os.kill(child.pid, sig)
        time.sleep(0.5)
        print([child.is_alive() for child in children], sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        for child in children:
            child.kill()
""")


@pytest.mark.parametrize("mode, alive", [("shielded", [True, True]), ("plain", [False, False])])
def test_children_outlive_the_stop_signals_only_when_shielded(tmp_path, mode, alive):
    script = tmp_path / "children.py"
    script.write_text(CHILDREN)
    result = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{alive} []"
