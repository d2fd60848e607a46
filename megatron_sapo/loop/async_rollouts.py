"""Asynchronous rollouts (trainer.max_staleness = K > 0): a producer thread on rank 0 makes the batches ahead of
training, so the engine generates while the policy trains (the embedded engine in a process of its own, SGLang in
its servers); the trainer waits only for what generation takes beyond training.

The pipeline is deterministic: the batch of step index j is sampled by weight version max(0, j - K), exactly.
- The producer makes batch j once the engine serves version j - K (at the start, whatever it serves).
- Publishing version u waits until the batches that version u - 1 is due to sample (up to j = u - 1 + K) are made,
  then loads it between two batches (never during one).
- A checkpoint first drains: it waits until every batch the current weights are due to sample is made, and saves
  those batches with the checkpoint (the sampler position is past them), so a resumed run trains the same batches
  and samples the next ones from the same weights as an uninterrupted one: it neither loses nor repeats a step.
  The producer does not stop at trainer.steps: the last checkpoint holds the next K batches too, so a run extended
  later (a larger trainer.steps) continues exactly as one that had been given the larger number from the start;
  this costs generating K batches that a run never extended does not use.
With K = 1 this is the one-step-off pipeline: step k + 1's batch is generated while step k trains.

Memory: at most K + 1 batches (token ids, masks, engine log-probs: about 13 bytes per token each) wait on rank 0.
Errors: an error in the producer (a generation that failed after the engine's own retries and restarts, a reward
pool that broke) is raised by the trainer's next call, with its own type and traceback.
"""

from __future__ import annotations

import threading
import time

from .rollouts import Rollout, Rollouts


class AsyncRollouts(Rollouts):
    separate_engine_process = True  # the embedded engine generates in its own process, beside training

    def __init__(self, cfg, out, weights, version: int, *, say=lambda text: None):
        self.max_staleness = cfg.trainer.max_staleness
        self._cond = threading.Condition()
        self._next_index = 0  # the next batch the producer makes
        self._busy = False  # making a batch now
        self._error: BaseException | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        super().__init__(cfg, out, weights, version, say=say)

    def begin(self, resumed) -> None:
        super().begin(resumed)
        self._next_index = max(self._ready, default=resumed.step - 1) + 1
        self._thread = threading.Thread(target=self._produce, name="rollout-producer", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._closing or self.version >= self._next_index - self.max_staleness)
                    if self._closing:
                        return
                    index, self._busy = self._next_index, True
                rollout = self._make(index)
                with self._cond:
                    self._ready[index] = rollout
                    self._next_index, self._busy = index + 1, False
                    self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - handed to the trainer's thread
            with self._cond:
                self._error, self._busy = err, False
                self._cond.notify_all()

    def _wait(self, done) -> None:
        """Wait until `done()` (under the condition's lock); raise the producer's error instead if it failed."""
        self._cond.wait_for(lambda: self._error is not None or done())
        if self._error is not None and not done():
            raise self._error

    def _made_up_to(self, index: int):
        """Whether every batch before `index` is made and the producer idles."""
        return lambda: self._next_index >= index and not self._busy

    def next(self, index: int) -> Rollout:
        with self._cond:
            self._wait(lambda: index in self._ready)
            rollout = self._ready.pop(index)
        if index - rollout.version > self.max_staleness:  # the pipeline's invariant: never trained on
            raise RuntimeError(f"the batch of step {index + 1} was sampled by weight version {rollout.version}, "
                               f"more than trainer.max_staleness={self.max_staleness} behind")
        return rollout

    def load_weights(self, version: int, apply) -> float:
        began = time.monotonic()
        with self._cond:
            self._wait(self._made_up_to(version + self.max_staleness))
            waited = time.monotonic() - began
            with self._engine_lock:
                apply(self.engine)
            self.version = version
            self._cond.notify_all()
        return waited

    def state(self) -> tuple[dict, dict]:
        with self._cond:
            if self._busy:
                self.say(f"waiting for the batch of step {self._next_index + 1}, in generation, to keep it with the "
                         "checkpoint")
            self._wait(self._made_up_to(self.version + self.max_staleness + 1))
            return super().state()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        super().close()  # stops a generation in progress (its error is not raised: nobody waits for it)
        if self._thread is not None:
            self._thread.join(timeout=60)
