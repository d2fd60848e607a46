"""Policy checkpoints: resuming reproduces the next step exactly; a checkpoint saved on one process loads under
TP=2, EP=2 and PP=2 and gives the same next step; another model's or a damaged checkpoint is a clear error."""

import os

import pytest
import torch

from megatron_sapo.policy.parallel import spawn_local

from megatron_sapo.losses import LossConfig
from megatron_sapo.policy.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_sapo.policy.config import PolicyConfig
from megatron_sapo.policy.policy import Policy, PolicyBatch

from .harness import tiny_models

LOSS = LossConfig(loss_type="sapo")


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 300, (4, 12), generator=g)
        mask = torch.zeros(4, 11, dtype=torch.bool)
        mask[:, 4:] = True
        out.append(PolicyBatch(ids, mask, torch.randn(4, generator=g)))
    return out


def _config(model_dir, **layout):
    return PolicyConfig(model_path=str(model_dir), micro_batch_size=1, lr=1e-3, lr_warmup_steps=2,
                        lr_decay_steps=10, lr_decay_style="cosine", **layout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A policy trained 2 steps and checkpointed; the metrics of its 3rd step."""
    root = tmp_path_factory.mktemp("ckpt")
    tiny_models().build("qwen3_moe", root / "model")
    policy = Policy(_config(root / "model"))
    batches = _batches()
    for batch in batches[:2]:
        policy.train_step(batch, LOSS)
    save_checkpoint(policy, root / "checkpoints")
    return root, policy.train_step(batches[2], LOSS)


def test_resume_reproduces_the_next_step_exactly(trained):
    root, expected = trained
    policy = Policy(_config(root / "model"))
    path = latest_checkpoint(root / "checkpoints")
    assert path.name == "step_00000002" and (root / "checkpoints" / "latest").read_text().strip() == path.name
    load_checkpoint(policy, path)
    assert policy.step == 2
    assert policy.train_step(_batches()[2], LOSS) == expected  # every metric, bit for bit (lr schedule included)
    assert policy.step == 3


def test_saving_again_replaces_atomically(trained, tmp_path):
    root, _ = trained
    policy = Policy(_config(root / "model"))
    save_checkpoint(policy, tmp_path)
    (tmp_path / ".step_00000000.tmp").mkdir()  # a crashed save's leftover is ignored and cleaned up
    final = save_checkpoint(policy, tmp_path)
    assert final.name == "step_00000000" and not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob(".*old*"))
    assert latest_checkpoint(tmp_path) == final


def test_another_model_is_rejected(trained, tmp_path):
    root, _ = trained
    tiny_models().build("qwen3_moe", tmp_path / "other", num_experts=8)
    other = Policy(_config(tmp_path / "other"))
    with pytest.raises(CheckpointError, match="holds another model .*num_experts: checkpoint 4 vs model 8"):
        load_checkpoint(other, latest_checkpoint(root / "checkpoints"))


def test_damaged_checkpoint_is_rejected(trained, tmp_path):
    import shutil

    root, _ = trained
    damaged = tmp_path / "step_00000002"
    shutil.copytree(latest_checkpoint(root / "checkpoints"), damaged)
    for f in damaged.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    policy = Policy(_config(root / "model"))
    with pytest.raises(CheckpointError, match="cannot load .*step_00000002"):
        load_checkpoint(policy, damaged)
    with pytest.raises(CheckpointError, match="not a megatron_sapo checkpoint"):
        load_checkpoint(policy, tmp_path)
    assert latest_checkpoint(tmp_path / "nothing-here") is None


LAYOUTS = [dict(tensor_model_parallel_size=2), dict(expert_model_parallel_size=2),
           dict(pipeline_model_parallel_size=2)]


def _worker(rank, root, expected_loss):
    from megatron.core import parallel_state as ps

    batch = _batches()[2]
    for layout in LAYOUTS:
        policy = Policy(_config(os.path.join(root, "model"), **layout))
        load_checkpoint(policy, latest_checkpoint(os.path.join(root, "checkpoints")))
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        rows = slice(r * 4 // dp, (r + 1) * 4 // dp)
        part = PolicyBatch(batch.input_ids[rows], batch.response_mask[rows], batch.advantages[rows])
        loss = policy.train_step(part, LOSS)["loss"]
        assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss), (layout, loss, expected_loss)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_checkpoint_loads_under_other_layouts(trained):
    root, expected = trained
    spawn_local(_worker, 2, str(root), expected["loss"])
