"""Policy checkpoints, checked on what they hold: after a load, the weights and Adam's moments (mapped to HF names, so
that any layout compares with any other) equal the saved ones tensor for tensor, and Adam's step and the optimizer
step count are the saved ones; the next off-policy step (old log-probs away from the current ones, so the loss
depends on the weights, and an Adam update that depends on the moments) gives the saving layout's loss, gradient
norm and updated weights. Resuming in the same layout is bit for bit; a checkpoint saved on one process loads under
TP=2, EP=2 and PP=2, and one saved under each of those loads on one process. Another model's or a damaged checkpoint
is a clear error."""

import os

import pytest
import torch

from megatron_sapo.policy.parallel import spawn_local

from megatron_sapo.losses import LossConfig
from megatron_sapo.policy.checkpoint import CheckpointError, _sub_optimizers, latest_checkpoint, load_checkpoint, \
    save_checkpoint
from megatron_sapo.policy.config import PolicyConfig
from megatron_sapo.policy.policy import Policy, PolicyBatch

from .harness import tiny_models

LOSS = LossConfig(loss_type="sapo", loss_agg_mode="seq-mean-token-mean")
LAYOUTS = {"tp2": dict(tensor_model_parallel_size=2), "ep2": dict(expert_model_parallel_size=2),
           "pp2": dict(pipeline_model_parallel_size=2)}


def _batches(n=2):
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


@torch.no_grad()
def observe(policy) -> dict | None:
    """What a checkpoint must carry, independent of the layout (collective; the result on global rank 0): the
    weights and Adam's two moments as full HF-named tensors (each moment is put in its parameter's place and
    exported by the weight-export rules), Adam's step per parameter, the optimizer step count."""
    params = [p for sub in _sub_optimizers(policy) for p in sub.get_parameters()]
    states = {id(p): s.optimizer.state[p] for s in _sub_optimizers(policy) for p in s.get_parameters()}
    out = {"weights": policy.hf_state_dict(), "step": policy.step,
           "adam_steps": sorted({int(states[id(p)]["step"]) for p in params})}
    for name in ("exp_avg", "exp_avg_sq"):
        saved = [p.data for p in params]
        for p in params:
            p.data = states[id(p)][name]
        try:
            out[name] = policy.hf_state_dict()
        finally:
            for p, data in zip(params, saved):
                p.data = data
    return out


def off_policy_step(policy, batch: PolicyBatch) -> dict:
    """One update on `batch` (this data-parallel rank's rows) and what it gave: loss, gradient norm, and the
    updated weights (HF names, on global rank 0)."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(r, None, dp)
    metrics = policy.train_step(PolicyBatch(batch.input_ids[rows], batch.response_mask[rows],
                                            batch.advantages[rows], old_log_probs=batch.old_log_probs[rows]), LOSS)
    assert metrics["skipped"] == 0.0
    return {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "after": policy.hf_state_dict()}


def assert_same_state(got: dict, expected: dict, where: str) -> None:
    assert got["step"] == expected["step"] and got["adam_steps"] == expected["adam_steps"], where
    for part in ("weights", "exp_avg", "exp_avg_sq"):
        assert got[part].keys() == expected[part].keys(), (where, part)
        for key, tensor in expected[part].items():
            assert torch.equal(got[part][key], tensor), (where, part, key)


def assert_same_step(got: dict, expected: dict, where: str) -> None:
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), where
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5), where
    for key, tensor in expected["after"].items():
        torch.testing.assert_close(got["after"][key], tensor, rtol=0, atol=1e-6, msg=f"{where}: {key}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A policy trained 2 steps and checkpointed; its state and an off-policy batch with the step it gives, saved
    for the other processes in expected.pt."""
    root = tmp_path_factory.mktemp("ckpt")
    tiny_models().build("qwen3_moe", root / "model")
    policy = Policy(_config(root / "model"))
    for batch in _batches():
        policy.train_step(batch, LOSS)
    save_checkpoint(policy, root / "checkpoints")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (4, 12), generator=g)
    mask = torch.zeros(4, 11, dtype=torch.bool)
    mask[:, 3:] = True
    mask[1, 9:] = False
    old = policy.log_probs(ids) + 0.3 * torch.randn(4, 11, generator=g)
    batch = PolicyBatch(ids, mask, torch.tensor([1.0, -0.7, 0.4, -1.1]), old_log_probs=old)
    expected = {"state": observe(policy), "batch": vars(batch)}
    expected["step"] = off_policy_step(policy, batch)
    torch.save(expected, root / "expected.pt")
    assert expected["step"]["after"].keys() == expected["state"]["weights"].keys()
    moved = max((expected["step"]["after"][k] - w).abs().max().item() for k, w in expected["state"]["weights"].items())
    assert moved > 1e-4  # the step moves weights by far more than the tolerance it is compared with
    return root, expected


def test_resume_reproduces_the_state_and_the_next_step_exactly(trained):
    root, expected = trained
    policy = Policy(_config(root / "model"))
    path = latest_checkpoint(root / "checkpoints")
    assert path.name == "step_00000002" and (root / "checkpoints" / "latest").read_text().strip() == path.name
    load_checkpoint(policy, path)
    assert_same_state(observe(policy), expected["state"], "same layout")
    step = off_policy_step(policy, PolicyBatch(**expected["batch"]))
    assert step["loss"] == expected["step"]["loss"] and step["grad_norm"] == expected["step"]["grad_norm"]
    assert all(torch.equal(step["after"][k], v) for k, v in expected["step"]["after"].items())  # lr schedule too
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


def _reshard_worker(rank, root):
    """Each 2-process layout loads the 1-process checkpoint, checks state and step against the saving layout, and
    saves the loaded state (before its step) in its own layout for the reverse direction."""
    import torch.distributed as dist

    expected = torch.load(os.path.join(root, "expected.pt"), weights_only=False)
    for name, layout in LAYOUTS.items():
        policy = Policy(_config(os.path.join(root, "model"), **layout))
        load_checkpoint(policy, latest_checkpoint(os.path.join(root, "checkpoints")))
        state = observe(policy)
        save_checkpoint(policy, os.path.join(root, f"saved-{name}"))
        step = off_policy_step(policy, PolicyBatch(**expected["batch"]))
        if dist.get_rank() == 0:
            assert_same_state(state, expected["state"], f"1 process -> {name}")
            assert_same_step(step, expected["step"], f"1 process -> {name}")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_checkpoint_reshards_both_ways(trained):
    root, expected = trained
    spawn_local(_reshard_worker, 2, str(root))
    for name in LAYOUTS:  # each 2-process layout's checkpoint back on one process
        policy = Policy(_config(root / "model"))
        load_checkpoint(policy, latest_checkpoint(root / f"saved-{name}"))
        assert_same_state(observe(policy), expected["state"], f"{name} -> 1 process")
        assert_same_step(off_policy_step(policy, PolicyBatch(**expected["batch"])), expected["step"],
                         f"{name} -> 1 process")


def test_shared_adam_step_counters_are_separated_after_a_load():
    """Megatron-Core 0.16's distributed optimizer (without apex / TE; it needs CUDA, so emulated here with the state
    dict it builds) loads one step tensor into every parameter's Adam state. torch's AdamW then advances that one
    counter once per parameter: the bias correction, and the first update after resuming, go wrong (seen on an H200
    as a 12% different update). checkpoint._own_step_counters gives each parameter its own counter: the next update
    equals the one of an optimizer that never stopped."""
    from types import SimpleNamespace

    from megatron_sapo.policy.checkpoint import _own_step_counters

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(5, generator=g) for _ in range(4)]
    grads = [[torch.randn(5, generator=g) for _ in start] for _ in range(4)]

    def adam(values):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        return params, torch.optim.AdamW(params, lr=0.1, betas=(0.9, 0.999))

    def step(params, opt, k):
        for p, grad in zip(params, grads[k]):
            p.grad = grad.clone()
        opt.step()

    ref_params, ref = adam(start)  # never stopped: 4 steps
    for k in range(4):
        step(ref_params, ref, k)
    saved_params, saved = adam(start)
    for k in range(3):
        step(saved_params, saved, k)
    state = saved.state_dict()
    outcomes = {}
    for fixed in (False, True):
        shared = torch.tensor(3.0)  # what Megatron's DistributedOptimizer.load_state_dict hands torch
        params, opt = adam([p.detach() for p in saved_params])
        # torch keeps the loaded tensors, and steps them in place: each try loads its own copy of the moments
        opt.load_state_dict({"state": {k: {**{n: t.clone() for n, t in v.items()}, "step": shared}
                                       for k, v in state["state"].items()},
                             "param_groups": state["param_groups"]})
        if fixed:
            _own_step_counters(SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt)))
        step(params, opt, 3)
        outcomes[fixed] = params, [float(s["step"]) for s in opt.state.values()]
    params, steps = outcomes[True]
    assert steps == [4.0] * 4
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    # the premise: without the repair the counters run away and the update differs
    params, steps = outcomes[False]
    assert steps == [7.0] * 4 and not all(torch.allclose(a, b) for a, b in zip(params, ref_params))
