"""The RL loop: the only place that knows the order of one step's stages.

    rollout (prompts -> completions -> rewards -> advantages) -> learner (old log-probs, mini-batch updates)
    -> weight publisher (the engine gets the new weights) -> evaluation (every trainer.eval_every steps)
    -> run recorder (metrics.jsonl, MLflow) -> checkpointer (every trainer.checkpoint_every steps, and the last)

Each stage is a component of loop/ that owns its state. Who does what under torchrun / srun: every rank holds its
part of the Megatron policy and takes part in the learner's forwards and updates, the weight export and the
checkpoint (collectives). Global rank 0 alone runs the rollout side (the engine and the reward pool) and the run
recorder; the other ranks hold do-nothing stand-ins, and rank 0's batch reaches them as tensors each step
(loop.rollouts.broadcast_rollout: about 13 bytes per token on every rank).

Synchronous by default: each step's batch is sampled by the weights of the step before. With trainer.max_staleness
K > 0 the rollout side generates ahead, beside training (loop/async_rollouts.py): the batch of step n is sampled by
the weights after step n - 1 - K, and the learner recomputes the old log-probs so that the gate sees the true ratio.

Resuming: a checkpoint holds the policy and the loop's state (step, prompt sampler, MLflow run, batches generated
ahead), so a restart continues the same steps, prompts and MLflow run. SIGTERM or SIGUSR1 (Slurm's warning before
the time limit) ends the loop after the current step with a checkpoint.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import lifeline
from .config import TrainConfig
from .loop.checkpointer import Checkpointer, Resumed
from .loop.learner import Learner
from .loop.publisher import WeightPublisher
from .loop.recorder import NoRecorder, RunRecorder
from .loop.rollouts import NoRollouts, Rollouts, broadcast_rollout
from .policy import parallel
from .policy.policy import Policy
from .progress import Progress
from .watchdog import RankWatchdog

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEMO_HINT = ("the demo recipe's inputs are made by `make demo` (which then trains) or `python tools/prepare_demo.py "
             "outputs/demo`")


def check_inputs(cfg: TrainConfig) -> None:
    """Name a missing model or data file before anything heavy starts."""
    model = Path(cfg.policy.model_path) if cfg.policy.model_path else None
    if model is None or not (model / "config.json").is_file():
        raise ValueError(f"policy.model_path {cfg.policy.model_path!r} is not a Hugging Face model folder "
                         f"(no config.json); {DEMO_HINT}")
    if not cfg.data.train_files:
        raise ValueError("data.train_files is empty: give at least one JSONL or Parquet prompt file")
    for key in ("train_files", "eval_files"):
        missing = [f for f in getattr(cfg.data, key) if not Path(f).is_file()]
        if missing:
            raise ValueError(f"data.{key}: no such file {missing[0]}; {DEMO_HINT}")


def make_rollouts(cfg: TrainConfig, out: Path, weights: Path, version: int, *, say):
    if cfg.trainer.max_staleness:
        from .loop.async_rollouts import AsyncRollouts

        return AsyncRollouts(cfg, out, weights, version, say=say)
    return Rollouts(cfg, out, weights, version, say=say)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        check_inputs(cfg)
        lifeline.install()  # what Megatron-Core forks ends with this process, as what we start does (lifeline.py)
        self.cfg = cfg
        out = Path(cfg.output_dir)
        parallel.init_distributed()
        # first thing after the process group: a rank lost from here on ends the job instead of hanging it
        self.watchdog = RankWatchdog(cfg.trainer.rank_timeout_s)
        main = dist.get_rank() == 0
        self.progress = Progress(cfg.trainer.steps, enabled=main)
        self.say = self.progress.message  # the one voice of the run: rank 0's, between progress lines
        self.stop_requested = False
        self.rollouts = self.recorder = None
        self._signals()  # before the slow start-up: a stop request then ends the run before its first step
        self.say(f"loading the policy from {cfg.policy.model_path} ({dist.get_world_size()} processes)")
        self.policy = Policy(cfg.policy)
        tc = cfg.trainer
        self.checkpointer = Checkpointer(self.policy, out / "checkpoints", every=tc.checkpoint_every,
                                         keep=tc.keep_checkpoints, say=self.say)
        resumed = self.checkpointer.resume() if tc.resume else Resumed()
        self.step = resumed.step  # RL steps done
        self.learner = Learner(self.policy, cfg)
        self.publisher = WeightPublisher(self.policy, cfg, out, say=self.say)
        try:
            self.recorder = RunRecorder(cfg, out, resumed, say=self.say) if main else NoRecorder()
            weights = self.publisher.export(self.step)
            self.rollouts = make_rollouts(cfg, out, weights, self.step, say=self.say) if main else NoRollouts()
            self.rollouts.begin(resumed)
        except BaseException:  # no orphaned reward workers or SGLang servers; the MLflow run marked FAILED
            self.close("FAILED")
            raise

    def _signals(self) -> None:
        def request_stop(signum, _frame):
            self.stop_requested = True
            self.say(f"received {signal.Signals(signum).name}: checkpointing after this step, then stopping")
        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)

    # ---- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Train to trainer.steps (from the resumed step); returns the last step reached."""
        tc = self.cfg.trainer
        if self.step >= tc.steps:
            self.say(f"already at step {self.step} of {tc.steps}: nothing to do")
            self.close()
            return self.step
        self.progress.restart(self.step)
        if self._stop_agreed():  # asked to stop while starting up: nothing new to save
            self.say(f"stopped before step {self.step + 1} on request; resume with the same command")
            self.close("KILLED")
            return self.step
        if tc.eval_every and self.step == 0:
            self.recorder.log(0, self.evaluate())
        status = "FINISHED"
        try:
            while self.step < tc.steps:
                metrics = self.train_step()
                last = self.step == tc.steps
                if tc.eval_every and (self.step % tc.eval_every == 0 or last):
                    metrics.update(self.evaluate())
                self.recorder.log(self.step, metrics)
                self.progress.update(self.step, {"reward": f"{metrics['reward/mean']:.3f}",
                                                 "tok/s": f"{metrics['throughput/tokens_per_s']:.0f}"})
                stop = self._stop_agreed()
                if self.checkpointer.due(self.step, last=last, stopping=stop):
                    self.save()
                if stop:
                    status = "KILLED"
                    self.say(f"stopped at step {self.step} on request; resume with the same command")
                    break
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self.close(status)
        return self.step

    def train_step(self) -> dict[str, float]:
        """One RL step: its rollout batch, the updates on it, the new weights to the engine."""
        index = self.step
        began = time.monotonic()
        rollout = self.rollouts.next(index)
        if dist.get_world_size() > 1:
            rollout = broadcast_rollout(rollout, parallel.cpu_world_group())
        rolled = time.monotonic()
        metrics = {**rollout.metrics, **self.learner.update(rollout.batch, index)}
        trained = time.monotonic()
        engine_wait = self.publisher.publish(index + 1, self.rollouts)
        synced = time.monotonic()
        self.step = index + 1
        if metrics["train/skipped_updates"]:
            self.say(f"step {self.step}: {metrics['train/skipped_updates']:.0f} update(s) skipped "
                     "(non-finite loss or gradient norm)")
        # time/sync_s includes time/sync_wait_s: asynchronous, the new weights wait for the batch in generation
        metrics.update({"time/rollout_s": rolled - began, "time/train_s": trained - rolled,
                        "time/sync_s": synced - trained, "time/sync_wait_s": engine_wait, "time/step_s": synced - began,
                        "throughput/tokens_per_s": metrics["rollout/tokens"] / max(synced - began, 1e-9)})
        return metrics

    def evaluate(self) -> dict[str, float]:
        """pass@1 on the held-out prompts under the weights of the current step (rank 0; {} elsewhere)."""
        began = time.monotonic()
        metrics, samples = self.rollouts.evaluate(self.step)
        self.recorder.log_samples(self.step, samples)
        return {**metrics, "time/eval_s": time.monotonic() - began} if metrics else {}

    def save(self) -> Path:
        state, attachments = self.rollouts.state()  # rank 0: waits for the batches in flight
        if state is not None:
            state.update(self.recorder.state())
        return self.checkpointer.save(self.step, state, attachments)

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)], device=self.policy.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def close(self, status: str = "FINISHED") -> None:
        """Stop every component, each even when another fails to. After a failure, a component that fails to close
        too (a full disk fails the tracker's last write as well) is reported, not raised: the error that stopped
        the run is the one to see. The rank watchdog stops last, before this rank can leave: after a normal end it
        tells the others not to wait for this rank; after a failure it goes silent, so they end too."""
        closing = [("the progress line", self.progress.close), ("the weight publisher", self.publisher.close)]
        if self.rollouts is not None:
            closing.append(("the rollout side", self.rollouts.close))
        if self.recorder is not None:
            recorder = self.recorder
            closing.append(("the run recorder", lambda: recorder.close(status)))
        self.rollouts = self.recorder = None
        first = None
        for what, close in closing:  # every one of them, whatever fails: no orphaned servers or workers
            try:
                close()
            except Exception as err:
                if status == "FAILED":
                    self.say(f"while stopping after a failure, closing {what} failed too: {type(err).__name__}: "
                             f"{err}")
                elif first is None:
                    first = err
        self.watchdog.stop(done=status != "FAILED")
        if first is not None:
            raise first
