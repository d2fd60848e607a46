"""Batch planning: which rows each data-parallel rank trains and how they form micro-batches (plan.py), and the
micro-batches' tensors cut from a batch's rows (take, put). Pure (torch and the standard library only): the
learner plans, the policy runs the plan."""

from .partition import balanced_partition
from .plan import (MicroBatch, MicroBatchPlan, attention_quadratic, plan_micro_batches, plan_summary, put, row_cost,
                   row_lengths, take)

__all__ = ["MicroBatch", "MicroBatchPlan", "attention_quadratic", "balanced_partition", "plan_micro_batches",
           "plan_summary", "put", "row_cost", "row_lengths", "take"]
