"""A stand-in trainer for tests/test_lifeline.py: starts every kind of child the real trainer starts, through the
real code that starts them, makes each one busy, prints their pids and waits to be killed.

    python -m tests.standins.trainer OUT_DIR
"""

import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

from megatron_sapo import lifeline


class SlowEngine:
    """An engine whose generation never ends (the engine process busy mid-call, reading no pipe)."""

    def generate(self, *args):
        time.sleep(3600)


def _fork_again():
    multiprocessing.get_context("fork").Process(target=time.sleep, args=(3600,)).start()
    time.sleep(3600)


def main(out: Path) -> None:
    from megatron_sapo.policy.checkpoint import _arm_megatron_writer_manager
    from megatron_sapo.policy.parallel import free_port
    from megatron_sapo.rewards.config import RewardConfig
    from megatron_sapo.rewards.pool import RewardPool
    from megatron_sapo.rollout.engine_process import EngineProcess
    from megatron_sapo.rollout.sglang import SGLangServer

    lifeline.install()
    pids = {}
    pool = RewardPool(RewardConfig(function="tests.rewards.helpers:scripted", num_workers=2, timeout_s=3600))
    threading.Thread(target=pool.score, args=([("hang", "1", {}), ("hang", "1", {})],), daemon=True).start()
    engine = EngineProcess(SlowEngine)
    threading.Thread(target=engine.generate, args=([], 1, None), daemon=True).start()
    pids["engine"] = engine._process.pid
    forked = multiprocessing.get_context("fork").Process(target=_fork_again)
    forked.start()
    pids["forked"] = forked.pid
    _arm_megatron_writer_manager()
    server = SGLangServer("model", free_port(), python=sys.executable, log_path=out / "server.log",
                          env={"PYTHONPATH": str(Path(__file__).parent)}, startup_timeout=60)
    server.start()
    pids["server"] = server.process.pid
    # the control: a spawned child that nothing arms, which must outlive this process (the test can see survivors)
    control = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(3600,))
    control.start()
    pids["control"] = control.pid
    time.sleep(1.0)  # the reward calls and the generation are running
    print(json.dumps(pids), flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
