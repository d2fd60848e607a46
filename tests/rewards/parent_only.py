"""A reward module that imports in the test process but not in a pool worker: the pool's start-up failure path."""

import multiprocessing

if multiprocessing.parent_process() is not None:
    raise ImportError("parent_only refuses to load in a child process")


def reward(completion: str, answer: str, **extra) -> float:
    return 1.0
