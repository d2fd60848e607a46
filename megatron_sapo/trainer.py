"""The RL loop: the only place that knows the order of one step's stages.

    prompts -> rollouts (n per prompt) -> rewards -> advantages -> old log-probs -> mini-batch updates
    -> weight sync -> evaluation (every trainer.eval_every steps) -> checkpoint -> log

Who does what under torchrun / srun: every rank holds its part of the Megatron policy and takes part in the
old-log-prob forwards, the updates, the HF export and the checkpoint (collectives). Global rank 0 alone drives the
rollout engine, the reward pool and MLflow, and broadcasts each step's batch (token ids, masks, advantages, the
engine's log-probs: one broadcast_object_list) to the others. Every mini-batch is padded with empty rows to a
multiple of data-parallel size x micro-batch size, and each data-parallel rank trains on every dp-th row.

The old log-probs of all mini-batches are computed before the first update, so the later updates of a rollout batch
are off-policy: that is where SAPO's gate acts. The engine's own log-probs travel as rollout_log_probs for the
mismatch metrics and, when loss.rollout_correction is set, the TIS / MIS correction.

Resuming: a checkpoint holds the policy (weights, optimizer, scheduler, RNG) and, in its manifest, the loop's state
(step, prompt sampler position, MLflow run id), so a restart continues the same step count and the same MLflow run.
SIGTERM or SIGUSR1 (Slurm's warning before the time limit) ends the loop after the current step with a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import TrainConfig, dump_yaml, flatten, save_config, to_dict
from .data import PromptSampler, fill_groups, load_prompts, render_prompt
from .losses import compute_advantages, metric_reduction, reduce_metrics
from .policy import parallel
from .policy.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .policy.hf_weights import write_hf_folder
from .policy.policy import Policy, PolicyBatch
from .progress import Progress
from .rewards import RewardPool
from .rollout.batch import RolloutBatch, collate, mini_batches
from .signals import shielded_children
from .tracking import Tracker, find_run_id

log = logging.getLogger("megatron_sapo.trainer")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _check_inputs(cfg: TrainConfig) -> None:
    """Name a missing model or data file before anything heavy starts."""
    model = Path(cfg.policy.model_path) if cfg.policy.model_path else None
    if model is None or not (model / "config.json").is_file():
        raise ValueError(f"policy.model_path {cfg.policy.model_path!r} is not a Hugging Face model folder "
                         "(no config.json)")
    if not cfg.data.train_files:
        raise ValueError("data.train_files is empty: give at least one JSONL or Parquet prompt file")
    for key in ("train_files", "eval_files"):
        missing = [f for f in getattr(cfg.data, key) if not Path(f).is_file()]
        if missing:
            raise ValueError(f"data.{key}: no such file {missing[0]}")


# how the policy's own step metrics combine over the updates of an RL step (the loss library's declare theirs)
UPDATE_REDUCTIONS = {"loss": "mean", "grad_norm": "mean", "lr": "mean", "skipped": "sum"}


def update_reduction(key: str) -> str:
    """The reduction over an RL step's updates of a train_step metric: declared here, in losses.METRICS, or, for
    Megatron's MoE diagnostics (moe/*, per-update averages over the MoE layers), the mean."""
    if key in UPDATE_REDUCTIONS:
        return UPDATE_REDUCTIONS[key]
    if key.startswith("moe/"):
        return "mean"
    return metric_reduction(key)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        _check_inputs(cfg)
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        parallel.init_distributed()
        self.is_main = dist.get_rank() == 0
        self.progress = Progress(cfg.trainer.steps, enabled=self.is_main)
        self.stop_requested = False
        self.engine = self.rewards = self.tracker = self.weight_group = None
        self.step = 0
        self._signals()  # before the slow start-up: a stop request then ends the run before its first step
        self._say(f"loading the policy from {cfg.policy.model_path} ({dist.get_world_size()} processes)")
        self.policy = Policy(cfg.policy)
        state = self._resume()
        try:
            if self.is_main:
                self._setup_main(state)
            self.weights = self._export()
            if self.is_main:
                self.engine = self._start_engine(self.weights)
        except BaseException:  # no orphaned reward workers or SGLang servers; the MLflow run marked FAILED
            self.close("FAILED")
            raise

    # ---- set-up -------------------------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.is_main:
            self.progress.message(text)

    def _resume(self) -> dict:
        if not self.cfg.trainer.resume:
            return {}
        path = latest_checkpoint(self.out / "checkpoints")
        if path is None:
            return {}
        self._say(f"resuming from {path}")
        state = load_checkpoint(self.policy, path)
        self.step = int(state.get("trainer_step", 0))
        return state

    def _setup_main(self, state: dict) -> None:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # weight reloads every step would print bars
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / "config.yaml")
        print(dump_yaml(cfg), end="", flush=True)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.policy.model_path)
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {cfg.policy.model_path} has neither a pad nor an EOS token")
        records, report = load_prompts(cfg.data.train_files, cfg.data)
        if report.malformed:
            self._say(f"skipped {report.malformed} malformed prompt rows, e.g. {report.examples[0]}")
        self.sampler = PromptSampler(records, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        self.eval_records = load_prompts(cfg.data.eval_files, cfg.data)[0][:cfg.trainer.eval_prompts] \
            if cfg.data.eval_files else []
        self.rewards = RewardPool(cfg.rewards)
        if cfg.tracking.enabled:
            # a resumed run continues its MLflow run, also one created after its checkpoint was written
            run_id = state.get("mlflow_run_id") or (find_run_id(self.out) if state else None)
            self.tracker = Tracker(cfg.tracking, self.out, run_id=run_id)
            self.tracker.log_params(flatten(to_dict(cfg)))
            self.tracker.log_artifact(self.out / "config.yaml")

    def _signals(self) -> None:
        def request_stop(signum, _frame):
            self.stop_requested = True
            self._say(f"received {signal.Signals(signum).name}: checkpointing after this step, then stopping")
        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)

    def _start_engine(self, weights: Path):
        rc = self.cfg.rollout
        version = str(self.step)
        if rc.engine == "embedded":
            from .rollout import EmbeddedEngine

            return EmbeddedEngine(weights, version, max_batch_prompts=rc.embedded_batch_prompts)
        from .policy.parallel import free_port
        from .rollout.sglang import SGLangEngine, SGLangServer

        sc = rc.sglang
        python = sc.python or os.environ.get("SAPO_SGLANG_PYTHON") or sys.executable
        count = 0 if sc.urls else sc.num_servers
        devices = [{}] * count
        if count and torch.cuda.is_available():
            from .rollout.config import local_server_devices

            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
            devices = [{"CUDA_VISIBLE_DEVICES": d} for d in local_server_devices(
                sc.gpus, count, device_count=torch.cuda.device_count(), trainer_local_ranks=local_ranks,
                visible=os.environ.get("CUDA_VISIBLE_DEVICES"))]
        servers = []
        try:
            for i in range(count):
                server = SGLangServer(weights, free_port(), python=python,
                                      log_path=self.out / "logs" / f"sglang_{i}.log", extra_args=tuple(sc.args),
                                      env={**sc.env, **devices[i]}, startup_timeout=sc.startup_timeout_s)
                self._say(f"starting SGLang server {i} on port {server.port} (log: {server.log_path})")
                servers.append(server)
                server.start()
            engine = SGLangEngine(self.tokenizer, servers=servers, urls=sc.urls, concurrency=sc.concurrency,
                                  retries=sc.retries)
            engine.update_weights(weights, version)  # tags responses with our version (loads ours on attached servers)
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return engine

    # ---- the stages ---------------------------------------------------------------------------------------------

    def _weights_folder(self) -> Path:
        return self.out / "weights" / f"step_{self.step:08d}"

    def _prune_weights(self) -> None:
        for old in sorted((self.out / "weights").glob("step_*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)

    def _export(self) -> Path:
        """Write the policy's weights as versioned HF folder weights/step_XXXXXXXX (collective); keep the last two."""
        folder = self._weights_folder()
        self.policy.export_hf(folder)
        if self.is_main:
            self._prune_weights()
        return folder

    def _prompts(self, records) -> list[str]:
        d = self.cfg.data
        return [render_prompt(r, self.tokenizer, apply_chat_template=d.apply_chat_template,
                              system_prompt=d.system_prompt) for r in records]

    def _sample_and_score(self, records, n: int, params):
        groups = self.engine.generate(self._prompts(records), n, params)
        samples = [(c.text, r.answer, r.extra) for r, group in zip(records, groups) for c in group]
        rewards, stats = self.rewards.score(samples)
        if stats.failed and stats.errors:
            self._say(f"{stats.failed} reward calls failed, e.g. {stats.errors[0]}")
        return groups, torch.tensor(rewards, dtype=torch.float64).view(len(records), n), stats

    def _rollout(self) -> tuple[RolloutBatch, dict[str, float]]:
        """Rank 0: prompts -> completions -> rewards -> advantages, as a padded batch, and the rollout metrics."""
        cfg, d = self.cfg, self.cfg.data
        params = cfg.rollout.sampling(seed=cfg.policy.seed * 100_003 + self.step)
        drawn_rewards, failed = [], 0

        def draw(count: int):
            nonlocal failed
            groups, rewards, stats = self._sample_and_score(self.sampler.take(count), d.samples_per_prompt, params)
            drawn_rewards.append(rewards.flatten())
            failed += stats.failed
            return groups, rewards

        if d.dynamic_sampling:
            groups, rewards, ds_stats = fill_groups(draw, d.prompts_per_step, d.max_fill_rounds)
            if not groups:
                raise RuntimeError(f"dynamic sampling found no group with unequal rewards in {d.max_fill_rounds} "
                                   "rounds: every prompt is solved by all samples or by none")
        else:
            groups, rewards = draw(d.prompts_per_step)
            ds_stats = {}
        completions = [c for group in groups for c in group]
        group_index = torch.arange(len(groups)).repeat_interleave(d.samples_per_prompt)
        advantages = compute_advantages(rewards.flatten(), group_index, cfg.trainer.advantage_estimator)
        batch = collate(completions, advantages, self.tokenizer.pad_token_id
                        if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id)
        all_rewards = torch.cat(drawn_rewards)
        lengths = torch.tensor([len(c.output_ids) for c in completions], dtype=torch.float64)
        stale = sum(c.weight_version != str(self.step) for c in completions)
        metrics = {
            "reward/mean": all_rewards.mean().item(), "reward/std": all_rewards.std(unbiased=False).item(),
            "reward/failed_calls": float(failed),
            "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item(),
            "response/truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "rollout/tokens": float(sum(len(c.prompt_ids) + len(c.output_ids) for c in completions)),
            "rollout/stale_frac": stale / len(completions),
            **{k: float(v) for k, v in ds_stats.items()},
        }
        if stale:
            self._say(f"{stale} of {len(completions)} completions carry another weight version than {self.step}")
        return batch, metrics

    def _update(self, batch: RolloutBatch) -> dict[str, float]:
        """Old log-probs for every mini-batch, then one optimizer step per mini-batch (every rank)."""
        from megatron.core import parallel_state as ps

        cfg = self.cfg
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        temperature = cfg.rollout.temperature
        generator = torch.Generator().manual_seed(cfg.policy.seed * 7919 + self.step)
        count = min(cfg.trainer.mini_batches, batch.num_rows)
        shards = []
        for part in mini_batches(batch, count, generator=generator):
            part = part.padded_to(dp * cfg.policy.micro_batch_size)
            shards.append(part.select(slice(dp_rank, None, dp)))  # interleaved: the padding rows spread out
        old = [self.policy.log_probs(s.input_ids, temperature) for s in shards]
        results = []
        for shard, old_log_probs in zip(shards, old):
            results.append(self.policy.train_step(
                PolicyBatch(shard.input_ids, shard.response_mask, shard.advantages, old_log_probs=old_log_probs,
                            rollout_log_probs=shard.rollout_log_probs), cfg.loss, temperature))
        merged = reduce_metrics(results, update_reduction)
        out = {k: v for k, v in merged.items() if k not in ("loss", "grad_norm", "lr", "skipped")}
        out.update({"train/loss": merged["loss"], "train/grad_norm": merged["grad_norm"], "train/lr": merged["lr"],
                    "train/skipped_updates": merged["skipped"]})
        return out

    def _sync(self) -> None:
        """Hand the updated weights to the engine under version str(step): through a versioned folder, or (SGLang,
        rollout.sglang.weight_sync = distributed) broadcast over a process group with the servers, falling back to
        a folder for this step when the group fails (it is formed anew at the next sync)."""
        sc = self.cfg.rollout.sglang
        if self.cfg.rollout.engine != "sglang" or sc.weight_sync == "disk":
            self.weights = self._export()
            if self.is_main:
                self.engine.update_weights(self.weights, str(self.step))
            return
        state = self.policy.hf_state_dict()  # collective; the full tensors on rank 0
        if not self.is_main:
            return
        from .rollout.sglang import SGLangError

        try:
            if self.weight_group is None:
                self.weight_group = self._weight_group()
            self.weight_group.update(state.items(), str(self.step))
            return
        except SGLangError as err:
            self._say(f"distributed weight sync failed ({err}); syncing through a folder this step")
            if self.weight_group is not None:
                self.weight_group.close()
                self.weight_group = None
        self.weights = self._weights_folder()
        write_hf_folder(state, self.weights, self.cfg.policy.model_path)
        self._prune_weights()
        self.engine.update_weights(self.weights, str(self.step))

    def _weight_group(self):
        from .rollout.weight_sync import WeightUpdateGroup

        sc = self.cfg.rollout.sglang
        return WeightUpdateGroup(self.engine.urls, master_address=sc.master_address or os.environ.get(
            "MASTER_ADDR", "127.0.0.1"), backend="nccl" if torch.cuda.is_available() else "gloo",
            bucket_bytes=sc.bucket_mb << 20, reference_dir=self.weights)

    def evaluate(self) -> dict[str, float]:
        """Rank 0: pass@1 and mean reward on the held-out prompts under the current weights; a sample of the
        completions goes to MLflow."""
        if not self.eval_records:
            return {}
        tc = self.cfg.trainer
        params = self.cfg.rollout.sampling(temperature=tc.eval_temperature, seed=self.cfg.policy.seed + 17)
        groups, rewards, _ = self._sample_and_score(self.eval_records, tc.eval_samples_per_prompt, params)
        metrics = {"eval/pass_at_1": (rewards >= tc.eval_pass_threshold).double().mean().item(),
                   "eval/reward_mean": rewards.mean().item()}
        if self.tracker is not None and tc.log_samples:
            rows = [{"prompt": self._prompts([r])[0], "answer": r.answer, "completion": c.text, "reward": rewards[i, k]
                     .item(), "weight_version": c.weight_version}
                    for i, (r, group) in enumerate(zip(self.eval_records, groups)) for k, c in enumerate(group)]
            self.tracker.log_text(json.dumps(rows[:tc.log_samples], indent=1), f"samples/step_{self.step:08d}.json")
        self._say(f"eval at step {self.step}: pass@1 {metrics['eval/pass_at_1']:.3f} "
                  f"(reward {metrics['eval/reward_mean']:.3f}, {rewards.numel()} samples)")
        return metrics

    def checkpoint(self) -> Path:
        extra = None
        if self.is_main:
            extra = {"trainer_step": self.step, "sampler": self.sampler.state_dict(),
                     "mlflow_run_id": self.tracker.run_id if self.tracker else None}
        with shielded_children():  # Megatron's writer starts processes, one of them kept for later saves
            path = save_checkpoint(self.policy, self.out / "checkpoints", extra, number=self.step)
        if self.is_main:
            for old in sorted((self.out / "checkpoints").glob("step_*"))[:-self.cfg.trainer.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            self._say(f"checkpoint {path}")
        return path

    def _log(self, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.step)

    # ---- the loop -----------------------------------------------------------------------------------------------

    def _broadcast(self, obj):
        if dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=parallel.cpu_world_group())  # pickled in host memory
        return box[0]

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)], device=self.policy.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def train_step(self) -> dict[str, float]:
        began = time.monotonic()
        batch, metrics = self._rollout() if self.is_main else (None, None)
        batch, metrics = self._broadcast((batch, metrics))
        rolled = time.monotonic()
        metrics.update(self._update(batch))
        trained = time.monotonic()
        self.step += 1
        self._sync()
        synced = time.monotonic()
        if metrics["train/skipped_updates"]:
            self._say(f"step {self.step}: {metrics['train/skipped_updates']:.0f} update(s) skipped "
                      "(non-finite loss or gradient norm)")
        metrics.update({"time/rollout_s": rolled - began, "time/train_s": trained - rolled,
                        "time/sync_s": synced - trained, "time/step_s": synced - began,
                        "throughput/tokens_per_s": metrics["rollout/tokens"] / max(synced - began, 1e-9)})
        return metrics

    def run(self) -> int:
        """Train to trainer.steps (from the resumed step); returns the last step reached."""
        tc = self.cfg.trainer
        if self.step >= tc.steps:
            self._say(f"already at step {self.step} of {tc.steps}: nothing to do")
            self.close()
            return self.step
        self.progress.restart(self.step)
        if self._stop_agreed():  # asked to stop while starting up: nothing new to save
            self._say(f"stopped before step {self.step + 1} on request; resume with the same command")
            self.close("KILLED")
            return self.step
        if self.is_main and tc.eval_every and self.step == 0:
            self._log(self.evaluate())
        status = "FINISHED"
        try:
            while self.step < tc.steps:
                metrics = self.train_step()
                last = self.step == tc.steps
                if self.is_main and tc.eval_every and (self.step % tc.eval_every == 0 or last):
                    eval_began = time.monotonic()
                    metrics.update(self.evaluate())
                    metrics["time/eval_s"] = time.monotonic() - eval_began
                self._log(metrics)
                if self.is_main:
                    self.progress.update(self.step, {
                        "reward": f"{metrics['reward/mean']:.3f}",
                        "tok/s": f"{metrics['throughput/tokens_per_s']:.0f}"})
                stop = self._stop_agreed()
                if last or stop or (tc.checkpoint_every and self.step % tc.checkpoint_every == 0):
                    self.checkpoint()
                if stop:
                    status = "KILLED"
                    self._say(f"stopped at step {self.step} on request; resume with the same command")
                    break
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self.close(status)
        return self.step

    def close(self, status: str = "FINISHED") -> None:
        self.progress.close()
        if self.weight_group is not None:
            self.weight_group.close()
            self.weight_group = None
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.rewards is not None:
            self.rewards.close()
            self.rewards = None
        if self.is_main and status == "FINISHED" and (self.out / "metrics.jsonl").is_file():
            history = self._history()
            self._summary(history)
            if self.tracker is not None:
                self._log_plots(history)
        if self.tracker is not None:
            self.tracker.close(status)
            self.tracker = None

    def _history(self) -> dict[str, list[tuple[int, float]]]:
        """Every metric's (step, value) series from metrics.jsonl; a step redone after a resume keeps its last value."""
        by_step: dict[str, dict[int, float]] = {}
        with (self.out / "metrics.jsonl").open() as f:
            for line in f:
                row = json.loads(line)
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                        by_step.setdefault(key, {})[row["step"]] = float(value)
        return {key: sorted(values.items()) for key, values in by_step.items()}

    def _summary(self, history) -> None:
        rewards = [v for _, v in history.get("reward/mean", [])]
        if len(rewards) >= 2:
            k = min(5, len(rewards) // 2)
            first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
            self._say(f"reward/mean: first {k} steps {first:.3f}, last {k} steps {last:.3f} ({last - first:+.3f})")
        passes = history.get("eval/pass_at_1", [])
        if len(passes) >= 2:
            self._say(f"eval pass@1: step {passes[0][0]} {passes[0][1]:.3f}, step {passes[-1][0]} {passes[-1][1]:.3f}")

    def _log_plots(self, history) -> None:
        try:
            from .plots import plot_history
        except ImportError as err:
            log.warning("no training plots: %s", err)
            return
        try:
            paths = plot_history(history, self.out / "plots")
        except (ImportError, ValueError) as err:
            log.warning("no training plots: %s", err)
            return
        for path in paths:
            self.tracker.log_artifact(path, "plots")
