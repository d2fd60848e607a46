"""Rank 0's rollout reaches the other ranks as tensors (2 real gloo processes), equal to what rank 0 holds, with
and without the engine's MoE routes."""

import json

import pytest
import torch

from megatron_sapo.policy.parallel import spawn_local


def _batch(routes: bool):
    from megatron_sapo.rollout.batch import RolloutBatch

    g = torch.Generator().manual_seed(3)
    mask = torch.rand(5, 10, generator=g) > 0.5
    # MoE routes: 3 layers x top-2, -1 where unknown, ids beyond one byte
    experts = torch.randint(-1, 300, (5, 11, 3, 2), generator=g).to(torch.int16) if routes else None
    return RolloutBatch(torch.randint(0, 151_936, (5, 11), generator=g), mask,
                        torch.randn(5, 10, generator=g) * mask, torch.randn(5, generator=g), experts)


def _rank(rank, out):
    import torch.distributed as dist

    from megatron_sapo.loop.rollouts import Rollout, broadcast_rollout
    from megatron_sapo.policy import parallel

    parallel.init_distributed()
    same = []
    for routes in (False, True):
        sent = Rollout(7, 6, _batch(routes), {"reward/mean": 0.25}) if rank == 0 else None
        got = broadcast_rollout(sent, parallel.cpu_world_group())
        expected = _batch(routes)
        same += [torch.equal(getattr(got.batch, k), getattr(expected, k)) and getattr(got.batch, k).dtype ==
                 getattr(expected, k).dtype for k in ("input_ids", "response_mask", "rollout_log_probs", "advantages")]
        same.append(got.batch.routes is None if not routes else torch.equal(got.batch.routes, expected.routes))
    (out / f"rank{rank}.json").write_text(json.dumps({"same": same, "index": got.index, "version": got.version,
                                                       "metrics": got.metrics}))
    dist.barrier()


@pytest.mark.multiprocess
def test_every_rank_gets_rank_0s_batch(tmp_path):
    spawn_local(_rank, 2, tmp_path)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"same": [True] * 10, "index": 7, "version": 6, "metrics": {"reward/mean": 0.25}}
