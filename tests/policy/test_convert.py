"""`megatron-sapo export`: a checkpoint saved by two gloo processes under EP=2 (after a training step) is exported by
one process and, under torchrun, by two processes in another layout (PP=2); both folders equal the trained weights
bit for bit (gathered from the training processes themselves) and are sharded with an index. Bad inputs are clear
errors: a run with no checkpoint, a missing --checkpoint, a damaged checkpoint, another model's folder, a target
that is not an export, an option that is not a policy option."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sapo.cli import main
from megatron_sapo.policy.hf_export import INDEX
from megatron_sapo.policy.parallel import spawn_local

from .harness import REPO, tiny_models

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
CLI = str(Path(sys.executable).parent / "megatron-sapo")


def _train_and_save(rank, root):
    from safetensors.torch import save_file

    from megatron_sapo.losses import LossConfig
    from megatron_sapo.policy.checkpoint import save_checkpoint
    from megatron_sapo.policy.config import PolicyConfig
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    policy = Policy(PolicyConfig(model_path=os.path.join(root, "src"), expert_model_parallel_size=2, lr=1e-2,
                                 export_shard_mb=1))
    ids = torch.randint(3, policy.arch.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.bool)
    policy.train_step(PolicyBatch(ids, mask, torch.tensor([1.0, -1.0])), LossConfig())
    save_checkpoint(policy, os.path.join(root, "run", "checkpoints"), number=1)
    trained = policy.hf_state_dict()
    if rank == 0:
        save_file(trained, os.path.join(root, "trained.safetensors"))


def _run(*args, torchrun=False):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python") \
        if torchrun else ()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run([*launcher, CLI, "export", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def _error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *map(str, args)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_export_a_two_process_checkpoint_in_one_process_and_under_torchrun(tmp_path, capsys):
    from safetensors.torch import load_file

    from megatron_sapo.policy.hf_weights import read_safetensors

    tiny_models().build("qwen3_moe", tmp_path / "src", num_experts=8)
    spawn_local(_train_and_save, 2, str(tmp_path))
    trained = load_file(str(tmp_path / "trained.safetensors"))
    assert not torch.equal(trained["model.norm.weight"], read_safetensors(tmp_path / "src")["model.norm.weight"])
    run = tmp_path / "run"

    code, log = _run(run, tmp_path / "one", "policy.export_shard_mb=1")
    assert code == 0 and "exporting" in log and "(1 processes" in log, log[-3000:]
    code, log = _run(run, tmp_path / "two", "--checkpoint", run / "checkpoints" / "step_00000001",
                     "policy.pipeline_model_parallel_size=2", torchrun=True)
    assert code == 0 and "(2 processes" in log, log[-3000:]
    for out in ("one", "two"):
        exported = read_safetensors(tmp_path / out)
        assert set(exported) == set(trained), out
        assert all(torch.equal(exported[k], trained[k]) for k in trained), out
        shards = set(json.loads((tmp_path / out / INDEX).read_text())["weight_map"].values())
        assert len(shards) == {"one": 1, "two": 2}[out], (out, shards)  # a small model: one shard per stage

    assert "holds no checkpoint (no checkpoints/latest)" in _error(capsys, tmp_path / "src", tmp_path / "x")
    assert "no such run folder" in _error(capsys, tmp_path / "nowhere", tmp_path / "x")
    assert "--checkpoint" in _error(capsys, run, tmp_path / "x", "--checkpoint", tmp_path / "none")
    assert "only policy.* options" in _error(capsys, run, tmp_path / "x", "trainer.steps=3")
    assert "unknown policy option(s) policy.bogus" in _error(capsys, run, tmp_path / "x", "policy.bogus=1")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert "is not a HF folder" in _error(capsys, run, tmp_path / "notes")
    other = tmp_path / "other"
    tiny_models().build("qwen3_moe", other, num_experts=4)
    assert "holds another model (num_experts: checkpoint 8 vs model 4)" in _error(
        capsys, run, tmp_path / "x", f"policy.model_path={other}")
    damaged = tmp_path / "damaged"
    shutil.copytree(run / "checkpoints" / "step_00000001", damaged)
    for f in damaged.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    assert "cannot load" in _error(capsys, run, tmp_path / "x", "--checkpoint", damaged)
    (damaged / "megatron_sapo.json").unlink()
    assert "is not a megatron_sapo checkpoint" in _error(capsys, run, tmp_path / "x", "--checkpoint", damaged)
    assert not (tmp_path / "x").exists()
