"""The reward pool: order, every failure outcome, timeouts, replacement of dead workers, and its errors.

One 2-worker pool (module scope) serves most tests: each spawned worker costs ~0.2 s to start (the math
reward's ~0.8 s)."""

import os
import signal
import time

import pytest

from megatron_sapo.rewards import RewardConfig, RewardPool, RewardStats
from megatron_sapo.rewards.pool import MAX_ERRORS

TIMEOUT_S = 1.0
FAILURE = -1.0


@pytest.fixture(scope="module")
def pool():
    config = RewardConfig(
        function="tests.rewards.helpers:scripted", num_workers=2, timeout_s=TIMEOUT_S, failure_reward=FAILURE
    )
    with RewardPool(config) as pool:
        yield pool


def echo(values):
    return [("echo", str(v), {}) for v in values]


def test_rewards_keep_input_order(pool):
    rewards, stats = pool.score(echo(range(30)))
    assert rewards == [float(v) for v in range(30)]
    assert (stats.ok, stats.failed, stats.errors) == (30, 0, [])
    assert pool.score([]) == ([], RewardStats())


def test_each_failure_costs_its_sample_and_is_counted(pool):
    samples = [
        ("echo", "1", {}),
        ("raise", "2", {}),
        ("nan", "3", {}),
        ("slow", "4", {}),  # slow but within the timeout
        ("text", "5", {}),
        ("exit", "6", {}),  # sys.exit in a reward function is an exception like any other
        ("inf", "7", {}),
        ("bool", "8", {}),
        ("echo", "9", {"unused": True}),
        ("raise", "10", {}),
        ("huge", "11", {}),
    ]
    rewards, stats = pool.score(samples)
    assert rewards == [1.0, FAILURE, FAILURE, 4.0, FAILURE, FAILURE, FAILURE, 1.0, 9.0, FAILURE, FAILURE]
    assert (stats.ok, stats.raised, stats.invalid, stats.timed_out, stats.crashed) == (4, 3, 4, 0, 0)
    assert MAX_ERRORS == 5
    assert stats.errors == [  # the lowest indices, whatever order the calls finished in
        "sample 1: ValueError: scripted failure",
        "sample 2: returned float nan",
        "sample 4: returned str 'high'",
        "sample 5: SystemExit: 3",
        "sample 6: returned float -inf",
    ]


def test_a_hang_costs_about_the_timeout_and_one_sample(pool):
    pool.score(echo(range(4)))  # both workers started and ready
    samples = echo(range(20))
    samples[7] = ("hang", "7", {})
    start = time.monotonic()
    rewards, stats = pool.score(samples)
    elapsed = time.monotonic() - start
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.0
    assert rewards == [FAILURE if i == 7 else float(i) for i in range(20)]
    assert (stats.ok, stats.timed_out, stats.failed) == (19, 1, 1)
    assert stats.errors == [f"sample 7: timed out after {TIMEOUT_S:g} s"]


def test_pool_keeps_working_when_every_worker_hangs_or_dies(pool):
    samples = [("hang", "0", {}), ("hang", "1", {}), ("crash", "2", {}), ("slow", "3", {})] + echo(range(4, 10))
    rewards, stats = pool.score(samples)
    assert rewards == [FAILURE, FAILURE, FAILURE] + [float(v) for v in range(3, 10)]
    assert (stats.ok, stats.timed_out, stats.crashed, stats.failed) == (7, 2, 1, 3)
    assert "sample 2: worker died (exit code 7)" in stats.errors
    rewards, stats = pool.score(echo(range(10)))
    assert rewards == [float(v) for v in range(10)] and stats.ok == 10


@pytest.mark.fault
def test_a_worker_killed_while_idle_is_replaced_before_the_next_batch(pool, fault_report):
    """A real fault: SIGKILL to an idle worker (as the OOM killer would send) between two batches; the next batch
    completes with every sample scored and none counted as failed."""
    pool.score(echo(range(4)))
    victim = pool._workers[0].process
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=10)
    assert not victim.is_alive()
    rewards, stats = pool.score(echo(range(20)))
    assert rewards == [float(v) for v in range(20)] and (stats.ok, stats.failed) == (20, 0)
    assert pool._workers[0].process is not victim
    fault_report("a reward worker SIGKILLed while idle", 1, 1, 0, "replaced before the next batch")


def test_one_worker_takes_samples_ahead_and_times_each_on_its_own():
    """Samples are sent to a worker ahead of its answers, but each has the whole timeout from the moment its turn
    comes: three slow calls in a row (0.5 s each, 1.5 s together) all pass a 1 s timeout; a hang costs its sample,
    and the samples queued behind it are computed by the replacement."""
    config = RewardConfig(function="tests.rewards.helpers:scripted", num_workers=1, timeout_s=TIMEOUT_S,
                          failure_reward=FAILURE)
    with RewardPool(config) as pool:
        samples = echo(range(12))
        samples[2:5] = [("slow", str(i), {}) for i in (2, 3, 4)]
        samples[7] = ("hang", "7", {})
        rewards, stats = pool.score(samples)
    assert rewards == [FAILURE if i == 7 else float(i) for i in range(12)]
    assert (stats.ok, stats.timed_out) == (11, 1)


def test_workers_ignore_the_signals_meant_for_the_parent(pool):
    """Slurm signals every process of a job step (SIGUSR1 before the time limit, SIGTERM on scancel) and Ctrl-C
    reaches the process group: the trainer decides what they mean, the workers carry on."""
    pool.score(echo(range(4)))
    for worker in pool._workers:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            os.kill(worker.process.pid, sig)
    time.sleep(0.2)
    rewards, stats = pool.score(echo(range(10)))
    assert rewards == [float(v) for v in range(10)] and (stats.ok, stats.crashed) == (10, 0)
    assert all(worker.process.is_alive() for worker in pool._workers)


def test_bad_samples_are_value_errors_and_leave_the_pool_open(pool):
    with pytest.raises(ValueError, match="sample 1 must be a"):
        pool.score([("echo", "1", {}), ("echo", "2")])
    with pytest.raises(ValueError, match="sample 0: completion and answer must be str"):
        pool.score([("echo", 2, {})])
    with pytest.raises(ValueError, match="sample 0: extra must be a mapping"):
        pool.score([("echo", "2", None)])
    assert pool.score(echo([5]))[0] == [5.0]


def test_builtin_reward_with_function_kwargs():
    config = RewardConfig(function="exact_match", function_kwargs={"ignore_case": True}, num_workers=1)
    with RewardPool(config) as pool:
        rewards, stats = pool.score([("The answer is PARIS.", "paris", {}), ("Lyon", "paris", {"id": 3})])
        assert rewards == [1.0, 0.0] and stats.ok == 2
        with pytest.raises(ValueError, match=r"extra keys \['ignore_case'\] are also set"):
            pool.score([("Paris", "paris", {"ignore_case": False})])
    with pytest.raises(RuntimeError, match="closed"):
        pool.score([("Paris", "paris", {})])


def test_math_reward_in_the_pool():
    samples = [
        ("so \\boxed{\\frac{1}{2}}", "0.5", {}),
        ("Expanding: \\boxed{(x+1)^2}", "x^2+2x+1", {"level": 3}),
        ("#### 71", "72", {}),
        ("no idea", "72", {}),
    ]
    with RewardPool(RewardConfig(function="math", num_workers=1)) as pool:
        rewards, stats = pool.score(samples)
    assert rewards == [1.0, 1.0, 0.0, 0.0]
    assert (stats.ok, stats.failed) == (4, 0)


def test_unknown_function_fails_before_any_worker_starts():
    with pytest.raises(ValueError, match="cannot import module"):
        RewardPool(RewardConfig(function="no_such_package.rewards:score"))


def test_worker_that_cannot_load_the_function_is_an_error():
    pool = RewardPool(RewardConfig(function="tests.rewards.parent_only:reward", num_workers=1))
    with pytest.raises(RuntimeError, match="could not load 'tests.rewards.parent_only:reward'.*refuses to load"):
        pool.score(echo([1]))
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(echo([1]))
