"""Batch planning: which rows each data-parallel rank trains and how they form micro-batches. Pure (torch and the
standard library only): the learner is to plan and the policy to run the plan (issue 24; not wired in yet: the
learner still pads every mini-batch to its longest row)."""

from .partition import balanced_partition
from .plan import MicroBatch, MicroBatchPlan, plan_micro_batches, row_lengths

__all__ = ["MicroBatch", "MicroBatchPlan", "balanced_partition", "plan_micro_batches", "row_lengths"]
