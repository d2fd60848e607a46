"""User reward functions for the pool tests, imported by name in the workers ("tests.rewards.helpers:scripted").

One function whose completion says how it misbehaves, so that one pool serves every test."""

import os
import sys
import time

NOT_CALLABLE = 42


def scripted(completion: str, answer: str, **extra) -> float:
    """Returns float(answer), unless the completion asks for a failure mode."""
    if completion == "raise":
        raise ValueError("scripted failure")
    if completion == "exit":
        sys.exit(3)
    if completion == "crash":
        os._exit(7)
    if completion == "hang":
        time.sleep(3600)
    if completion == "slow":
        time.sleep(0.5)  # within the tests' 1 s timeout
    if completion == "nan":
        return float("nan")
    if completion == "inf":
        return float("-inf")
    if completion == "huge":
        return 10**400
    if completion == "text":
        return "high"
    if completion == "bool":
        return True
    return float(answer)
