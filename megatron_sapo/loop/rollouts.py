"""The rollout side (rank 0): prompts -> completions -> rewards -> advantages -> one RL step's training batch, and
the evaluation on held-out prompts. The other ranks get a do-nothing stand-in (`NoRollouts`): rank 0's batch
reaches them by broadcast, so the loop has no rank branches.

Weight versions: the engine serves version v = the number of RL steps applied to its weights; every completion
carries the version that sampled it. The batch of step index j (0-based: it trains the (j+1)-th step) is sampled by
version j when synchronous (trainer.max_staleness = 0, `Rollouts`: the batch is made when the step asks for it) and
by version max(0, j - K) when asynchronous with K = max_staleness (`AsyncRollouts`: made ahead, beside training).

Per-step rollout metrics: rewards (over every sample drawn, dynamic-sampling rounds included), lengths, tokens,
`rollout/staleness` (weight versions between the sampling weights and the trained policy), `rollout/stale_frac`
(completions that carry another version than the one their batch was sampled for: a weight update that did not
take), the SGLang engine's request retries and server restarts during the batch, and `time/generate_s` (making
the batch, beside training when asynchronous).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..data import PromptSampler, fill_groups, load_prompts, render_prompt
from ..losses import compute_advantages
from ..rewards import RewardPool
from ..rollout.batch import RolloutBatch, collate
from .engines import start_engine, wants_routes

QUEUE_FILE = "rollouts.pt"  # checkpoint attachment: batches generated ahead of training


@dataclass
class Rollout:
    """One RL step's training data as rank 0 made it."""
    index: int  # the step it trains, 0-based
    version: int  # the weight version that sampled it
    batch: RolloutBatch
    metrics: dict[str, float]

    def to_state(self) -> dict:
        return {"index": self.index, "version": self.version, "metrics": dict(self.metrics),
                "batch": {f.name: getattr(self.batch, f.name) for f in fields(self.batch)}}

    @classmethod
    def from_state(cls, state: dict) -> Rollout:
        return cls(state["index"], state["version"], RolloutBatch(**state["batch"]), dict(state["metrics"]))


def broadcast_rollout(rollout: Rollout | None, group) -> Rollout:
    """Global rank 0's rollout on every rank of `group` (a CPU / gloo group holding rank 0, which passes its rollout;
    the others pass None). The batch travels as tensors: one broadcast of its index, version and shape [B, S], then
    one per tensor (the response mask as uint8); only the step's small metrics dict is pickled. Memory: the batch
    once per rank, about 13 bytes per token (token ids 8, mask 1, engine log-prob 4), plus 4 bytes per row, plus
    2 x layers x top-k bytes per token when the engine's MoE routes come with it."""
    import torch.distributed as dist

    main = dist.get_rank() == 0
    routes = rollout.batch.routes if main else None
    route_dims = list(routes.shape[2:]) if routes is not None else [0, 0]
    head = torch.tensor([rollout.index, rollout.version, *rollout.batch.input_ids.shape, *route_dims] if main
                        else [0] * 6)
    dist.broadcast(head, src=0, group=group)
    index, version, rows, seq, layers, topk = head.tolist()
    shapes = {"input_ids": ((rows, seq), torch.long), "response_mask": ((rows, seq - 1), torch.uint8),
              "rollout_log_probs": ((rows, seq - 1), torch.float32), "advantages": ((rows,), torch.float32)}
    if layers:  # int16 travels as its bytes: gloo has no int16
        shapes["routes"] = ((rows, seq, layers, 2 * topk), torch.uint8)
    tensors = {}
    for name, (shape, dtype) in shapes.items():
        tensor = torch.empty(shape, dtype=dtype)
        if main:
            value = getattr(rollout.batch, name).contiguous()
            tensor = value.view(dtype) if name == "routes" else value.to(dtype)
        dist.broadcast(tensor, src=0, group=group)
        tensors[name] = tensor
    tensors["response_mask"] = tensors["response_mask"].bool()
    if "routes" in tensors:
        tensors["routes"] = tensors["routes"].view(torch.int16)
    box = [rollout.metrics if main else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return Rollout(index, version, RolloutBatch(**tensors), box[0])


class NoRollouts:
    """Ranks other than 0: nothing to generate, load, evaluate, save or close; rank 0's rollouts arrive by broadcast."""

    def begin(self, resumed) -> None:
        pass

    def next(self, index: int) -> None:
        return None

    def load_weights(self, version: int, apply) -> float:
        apply(None)  # no engine here, but this rank takes part in what apply does collectively
        return 0.0

    def evaluate(self, step: int) -> tuple[dict[str, float], list[dict]]:
        return {}, []

    def state(self) -> tuple[None, None]:
        return None, None

    def close(self) -> None:
        pass


class EngineOnly:
    """Rank 0's rollout side for publishing weights to an engine without a rollout loop (benchmarks, tests): the
    weights are applied at once."""

    def __init__(self, engine):
        self.engine = engine

    def load_weights(self, version: int, apply) -> float:
        apply(self.engine)
        return 0.0


class Rollouts:
    """Synchronous rollouts (trainer.max_staleness = 0): a step's batch is sampled when the step asks for it, by the
    weights of the step before; the engine runs in the trainer's process (the embedded one) or in SGLang servers."""

    max_staleness = 0
    separate_engine_process = False

    def __init__(self, cfg, out: Path, weights: Path, version: int, *, say=lambda text: None):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # weight reloads every step would print bars
        self.cfg, self.say, self.version = cfg, say, version
        self.engine = self.rewards = None
        self._ready: dict[int, Rollout] = {}  # batches made ahead (asynchronous, or restored from a checkpoint)
        self._engine_lock = threading.Lock()  # one user of the engine and the reward pool at a time
        d = cfg.data
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.policy.model_path)
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {cfg.policy.model_path} has neither a pad nor an EOS token")
        records, report = load_prompts(d.train_files, d)
        if report.malformed:
            say(f"skipped {report.malformed} malformed prompt rows, e.g. {report.examples[0]}")
        self.sampler = PromptSampler(records, seed=d.seed, shuffle=d.shuffle)
        self.eval_records = load_prompts(d.eval_files, d)[0][:cfg.trainer.eval_prompts] if d.eval_files else []
        try:
            self.rewards = RewardPool(cfg.rewards)
            self.engine = start_engine(cfg, weights, version, tokenizer=self.tokenizer, out=out, say=say,
                                       separate_process=self.separate_engine_process)
        except BaseException:  # no orphaned reward workers or servers
            self.close()
            raise

    # ---- the loop's calls -----------------------------------------------------------------------------------------

    def begin(self, resumed) -> None:
        """Continue where a checkpoint left off: its prompt sampler position and the batches it had made ahead
        (those older than max_staleness allows now are dropped, with their prompts)."""
        if "sampler" in resumed.state:
            self.sampler.load_state_dict(resumed.state["sampler"])
        saved = [Rollout.from_state(s) for s in resumed.attachment(QUEUE_FILE, [])]
        usable = [r for r in saved if r.index >= resumed.step and r.index - r.version <= self.max_staleness]
        if len(usable) < len(saved):
            self.say(f"dropped {len(saved) - len(usable)} batches generated ahead by the checkpointed run: they are "
                     f"more than trainer.max_staleness={self.max_staleness} weight versions old; their prompts are "
                     "skipped")
            usable = []
        self._ready = {r.index: r for r in usable}

    def next(self, index: int) -> Rollout:
        """The batch of step index `index`."""
        return self._ready.pop(index, None) or self._make(index)

    def load_weights(self, version: int, apply) -> float:
        """Let `apply(engine)` load the weights of `version` into the engine; returns the seconds it waited for the
        engine first (asynchronous: for the batches the old weights are due to sample). The other ranks call
        apply(None) at once and meet rank 0 in its collectives."""
        with self._engine_lock:
            apply(self.engine)
            self.version = version
        return 0.0

    def evaluate(self, step: int) -> tuple[dict[str, float], list[dict]]:
        """pass@1 and mean reward on the held-out prompts under the engine's current weights, and the completions
        (prompt, answer, completion, reward, weight version)."""
        if not self.eval_records:
            return {}, []
        tc = self.cfg.trainer
        params = self.cfg.rollout.sampling(temperature=tc.eval_temperature, seed=self.cfg.policy.seed + 17)
        groups, rewards, _ = self._sample_and_score(self.eval_records, tc.eval_samples_per_prompt, params)
        metrics = {"eval/pass_at_1": (rewards >= tc.eval_pass_threshold).double().mean().item(),
                   "eval/reward_mean": rewards.mean().item()}
        prompts = self._prompts(self.eval_records)
        rows = [{"prompt": prompts[i], "answer": r.answer, "completion": c.text, "reward": rewards[i, k].item(),
                 "weight_version": c.weight_version}
                for i, (r, group) in enumerate(zip(self.eval_records, groups)) for k, c in enumerate(group)]
        self.say(f"eval at step {step}: pass@1 {metrics['eval/pass_at_1']:.3f} "
                 f"(reward {metrics['eval/reward_mean']:.3f}, {rewards.numel()} samples)")
        return metrics, rows

    def state(self) -> tuple[dict, dict]:
        """The loop state a checkpoint keeps (the sampler position) and its attachments (batches made ahead, when
        there are any)."""
        ahead = [self._ready[i].to_state() for i in sorted(self._ready)]
        return {"sampler": self.sampler.state_dict()}, ({QUEUE_FILE: ahead} if ahead else {})

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.rewards is not None:
            self.rewards.close()
            self.rewards = None

    # ---- making a batch -------------------------------------------------------------------------------------------

    def _prompts(self, records) -> list[str]:
        d = self.cfg.data
        return [render_prompt(r, self.tokenizer, apply_chat_template=d.apply_chat_template,
                              system_prompt=d.system_prompt) for r in records]

    def _sample_and_score(self, records, n: int, params, routes: bool = False):
        prompts = self._prompts(records)
        with self._engine_lock:
            groups = self.engine.generate(prompts, n, params, return_routes=routes)
            samples = [(c.text, r.answer, r.extra) for r, group in zip(records, groups) for c in group]
            rewards, stats = self.rewards.score(samples)
        if stats.failed and stats.errors:
            self.say(f"{stats.failed} reward calls failed, e.g. {stats.errors[0]}")
        return groups, torch.tensor(rewards, dtype=torch.float64).view(len(records), n), stats

    def _make(self, index: int) -> Rollout:
        """Prompts -> completions -> rewards -> advantages, as a padded batch, sampled by the current weights."""
        began = time.monotonic()
        cfg, d = self.cfg, self.cfg.data
        version = self.version  # fixed while this batch is made (load_weights waits for it)
        params = cfg.rollout.sampling(seed=cfg.policy.seed * 100_003 + index)
        engine_stats = dict(getattr(self.engine, "stats", {}))
        drawn_rewards, failed = [], 0

        def draw(count: int):
            nonlocal failed
            groups, rewards, stats = self._sample_and_score(self.sampler.take(count), d.samples_per_prompt, params,
                                                            routes=wants_routes(cfg))
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
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        batch = collate(completions, advantages, pad)
        all_rewards = torch.cat(drawn_rewards)
        lengths = torch.tensor([len(c.output_ids) for c in completions], dtype=torch.float64)
        stale = sum(c.weight_version != str(version) for c in completions)
        metrics = {
            "reward/mean": all_rewards.mean().item(), "reward/std": all_rewards.std(unbiased=False).item(),
            "reward/failed_calls": float(failed),
            "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item(),
            "response/truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "rollout/tokens": float(sum(len(c.prompt_ids) + len(c.output_ids) for c in completions)),
            "rollout/stale_frac": stale / len(completions),
            "rollout/staleness": float(index - version),
            **{k: float(v) for k, v in ds_stats.items()},
            **{f"rollout/engine_{k}": float(v - engine_stats[k]) for k, v in getattr(self.engine, "stats", {}).items()},
        }
        if stale:
            self.say(f"{stale} of {len(completions)} completions carry another weight version than {version}")
        metrics["time/generate_s"] = time.monotonic() - began
        return Rollout(index, version, batch, metrics)
