"""The learner: one RL step's updates on the policy (every rank).

    rollout batch -> mini-batches (shuffled rows) -> old log-probs of every mini-batch -> one optimizer update each

The old log-probs of all mini-batches are computed before the first update, so the later updates of a rollout batch
are off-policy: that is where SAPO's gate acts. With asynchronous rollouts (trainer.max_staleness > 0) the batch was
sampled by older weights still; the old log-probs are recomputed here all the same, so the gate and the GRPO clip see
the true ratio to the policy being trained, and the engine's own log-probs (rollout_log_probs) feed the mismatch
metrics and, when loss.rollout_correction is set, the TIS / MIS correction.

MoE routing (policy.routing_replay, policy/routing.py): the old-log-prob forward of each mini-batch keeps what its
routers picked; under r2 its update replays those experts, under r3 both forwards replay the engine's routes
(which come with the batch); either way the routing agreement metrics compare them.

Micro-batches (megatron_sapo/batching): with policy.max_tokens_per_micro_batch > 0 each mini-batch's rows go to the
data-parallel ranks balanced by their computed work (Karmarkar-Karp on length + attention's quadratic term), and on
each rank into micro-batches of at most that many computed positions, each at its own longest row, or, with
policy.pack_sequences, packed back to back into rows of at most that many tokens; every rank
plans every rank's share from the row lengths alone (no communication; a resumed run plans the same). Without a
budget, every mini-batch is padded with empty rows to a multiple of data-parallel size x micro-batch size, each
data-parallel rank trains on every dp-th row, and every micro-batch is as wide as the mini-batch's longest row.
Either way the loss is normalised by the whole mini-batch's counts. Memory: each rank holds the whole rollout batch
(token ids, masks, engine log-probs: about 13 bytes per token) plus its shards' old log-probs (4 bytes per token);
a budgeted micro-batch's activations are those of at most max_tokens_per_micro_batch positions (or of one row
longer than that, which gets a micro-batch of its own).
Plan metrics: train/token_efficiency (real tokens / computed positions, over the step's updates; the old-log-prob
forwards compute the same micro-batches), train/micro_batches (per rank, summed over the updates) and
train/dp_token_imbalance (the largest rank's computed positions over the mean, averaged over the updates).

Gate diagnostics: at the steps listed in trainer.gate_dump_steps the learner also saves, before each update, the
per-token log-ratios that update's loss sees (analysis/gate_diagnostics.py): one more forward per mini-batch at those
steps, and a file of 4 bytes per response token of this rank's rows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..analysis.gate_diagnostics import GateDump
from ..batching import MicroBatchPlan, plan_micro_batches, plan_summary, row_lengths
from ..losses import metric_reduction, reduce_metrics
from ..policy.policy import PolicyBatch
from ..rollout.batch import RolloutBatch, mini_batches

# how the policy's own train_step metrics combine over the updates of an RL step (the loss library declares its own
# beside their names in losses.METRICS)
UPDATE_REDUCTIONS = {"loss": "mean", "grad_norm": "mean", "lr": "mean", "skipped": "sum",
                     # routing agreement (policy/routing.py): the updates' mean, and the worst layer of any update
                     "routing/replay_agree": "mean", "routing/replay_agree_min_layer": "min",
                     "routing/engine_agree": "mean", "routing/engine_agree_min_layer": "min"}
# their names in the step's metrics
UPDATE_NAMES = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr",
                "skipped": "train/skipped_updates"}
log = logging.getLogger(__name__)


def update_reduction(key: str) -> str:
    """The reduction over an RL step's updates of a train_step metric: declared above, in losses.METRICS, or, for
    Megatron's MoE diagnostics (moe/*, per-update averages over the MoE layers), the mean."""
    if key in UPDATE_REDUCTIONS:
        return UPDATE_REDUCTIONS[key]
    if key.startswith("moe/"):
        return "mean"
    return metric_reduction(key)


class Learner:
    def __init__(self, policy, cfg):
        self.policy, self.cfg = policy, cfg
        self._warned_long = False

    def _shard(self, part: RolloutBatch, dp: int, dp_rank: int):
        """This rank's rows of a mini-batch, its micro-batches (None: the policy's fixed ones) and the plan's numbers
        over every rank."""
        budget, mbs = self.cfg.policy.max_tokens_per_micro_batch, self.cfg.policy.micro_batch_size
        layout = self.policy.plan_layout()
        if not budget:
            part = part.padded_to(dp * mbs)  # interleaved below: the padding rows spread out
            fixed = MicroBatchPlan.fixed(part.num_rows // dp, mbs, part.input_ids.shape[1])
            summary = plan_summary([fixed] * dp, row_lengths(part.response_mask), layout["multiple"])
            return part.select(slice(dp_rank, None, dp)), None, summary
        lengths = row_lengths(part.response_mask)
        plans, too_long = plan_micro_batches(lengths, dp=dp, max_tokens=budget, **layout)
        if too_long and not self._warned_long:
            self._warned_long = True
            log.warning("%d rows of up to %d tokens are longer than policy.max_tokens_per_micro_batch=%d: each gets a "
                        "micro-batch of its own (its activations exceed the budget; said once)", len(too_long),
                        max(lengths[r] for r in too_long), budget)
        mine = plans[dp_rank]
        return part.select(torch.tensor(mine.rows, dtype=torch.long)), mine.micro_batches, \
            plan_summary(plans, lengths, layout["multiple"])

    def update(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """Train on one rollout batch: cfg.trainer.mini_batches optimizer updates (fewer when the batch has fewer
        rows), the mini-batches drawn by a generator seeded from the RL step (a resumed run draws the same)."""
        from megatron.core import parallel_state as ps

        cfg = self.cfg
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        temperature = cfg.rollout.temperature
        generator = torch.Generator().manual_seed(cfg.policy.seed * 7919 + step)
        count = min(cfg.trainer.mini_batches, batch.num_rows)
        shards, plans, summaries = zip(*(self._shard(part, dp, dp_rank)
                                         for part in mini_batches(batch, count, generator=generator)))
        engine = [None if s.routes is None else self.policy.engine_routes(s.routes, s.input_ids, plan)
                  for s, plan in zip(shards, plans)]
        replay_engine = cfg.policy.routing_replay == "r3"
        if replay_engine and any(e is None for e in engine):
            raise ValueError("policy.routing_replay=r3 needs the engine's routes with the batch; the engine sent none")
        old = [self.policy.old_log_probs(s.input_ids, temperature, replay=e if replay_engine else None,
                                         micro_batches=plan)
               for s, e, plan in zip(shards, engine, plans)]
        dump = GateDump(step + 1, cfg.loss) if step + 1 in cfg.trainer.gate_dump_steps else None
        results = []
        for shard, (old_log_probs, old_routes), e, plan in zip(shards, old, engine, plans):
            if dump is not None:  # the log-probs this update's loss sees: the same forward, the same replay
                replay = {"r2": old_routes, "r3": e}.get(cfg.policy.routing_replay)
                current = self.policy.old_log_probs(shard.input_ids, temperature, replay=replay,
                                                    micro_batches=plan)[0]
                dump.add(current - old_log_probs, shard.response_mask, shard.advantages)
            results.append(self.policy.train_step(
                PolicyBatch(shard.input_ids, shard.response_mask, shard.advantages, old_log_probs=old_log_probs,
                            rollout_log_probs=shard.rollout_log_probs, old_routes=old_routes, engine_routes=e,
                            micro_batches=plan),
                cfg.loss, temperature))
        if dump is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0:
            dump.save(Path(cfg.output_dir), dp_rank)  # one file per data-parallel rank: its rows
        merged = reduce_metrics(results, update_reduction)
        out = {UPDATE_NAMES.get(k, k): v for k, v in merged.items()}
        out.update({"train/token_efficiency": sum(s["real"] for s in summaries) / sum(s["computed"] for s in summaries),
                    "train/micro_batches": sum(s["micro_batches"] for s in summaries),
                    "train/dp_token_imbalance": sum(s["imbalance"] for s in summaries) / len(summaries)})
        return out
