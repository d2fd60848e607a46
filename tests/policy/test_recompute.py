"""Activation recompute (policy.recompute, Megatron-Core's own): the gradients are bit for bit those of a step
without it, and the activations a forward saves for the backward shrink as each mode says (measured with autograd's
saved-tensor hooks, tools/bench_train_step.ActivationMeter). Options this build cannot run are refused by name."""

import importlib.util

import pytest
import torch

from megatron_sapo.losses import LossConfig
from megatron_sapo.policy.config import PolicyConfig

from .harness import REPO, tiny_models


def _meter_class():
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "tools" / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ActivationMeter


# (options, largest fraction of the saved activations without recompute)
MODES = [
    (dict(recompute="selective"), 0.85),  # core attention: its scores and probabilities
    (dict(recompute="selective", recompute_modules=["moe"]), 0.85),
    (dict(recompute="full"), 0.1),  # each layer's input only
    (dict(recompute="full", recompute_method="block", recompute_num_layers=1), 0.6),  # the first layer only
]


def test_recompute_keeps_the_gradients_and_frees_activations(tmp_path):
    from megatron_sapo.policy import parallel
    from megatron_sapo.policy.policy import Policy, PolicyBatch

    tiny_models().build("qwen3_moe", tmp_path, num_experts=8)
    parallel.init_distributed()
    meter_class = _meter_class()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (4, 64), generator=g)
    mask = torch.zeros(4, 63, dtype=torch.bool)
    mask[:, 10:] = True
    adv = torch.randn(4, generator=g)
    results = []
    for options, _ in [(dict(), 1.0)] + MODES:
        policy = Policy(PolicyConfig(model_path=str(tmp_path), micro_batch_size=2, lr=0.0, clip_grad=0.0,
                                     moe_aux_loss_coeff=0.0, **options))
        meter = meter_class(policy.module)
        old = policy.log_probs(ids) + 0.1
        with meter.hooks():
            metrics = policy.train_step(PolicyBatch(ids, mask, adv, old_log_probs=old), LossConfig())
        grads = {n: p.main_grad.clone() for n, p in policy.module.named_parameters()}
        results.append((metrics["loss"], grads, meter.peak()))
    loss, grads, saved = results[0]
    for (options, fraction), (got_loss, got_grads, got_saved) in zip(MODES, results[1:]):
        assert got_loss == loss, options
        assert all(torch.equal(got_grads[n], g) for n, g in grads.items()), options
        assert got_saved <= fraction * saved, (options, got_saved / saved)


@pytest.mark.parametrize("options, message", [
    (dict(recompute="sometimes"), "recompute"),
    (dict(recompute="selective", recompute_modules=["moe_act"]), "'moe_act' needs grouped-GEMM experts"),
    (dict(recompute="selective", recompute_modules=["mla_up_proj"]), "'mla_up_proj' needs multi-latent attention"),
    (dict(recompute="selective", recompute_modules=["attention"]), "recompute_modules"),
    (dict(recompute="selective", recompute_modules=[]), "needs at least one of recompute_modules"),
    (dict(recompute="full", recompute_method="all"), "recompute_method"),
    (dict(recompute="full", recompute_num_layers=0), "recompute_num_layers must be an integer >= 1"),
])
def test_recompute_options_are_checked_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        PolicyConfig(model_path="m", **options)


def test_recompute_that_needs_what_is_missing_is_refused(tmp_path):
    from megatron_sapo.policy import cpu_compat
    from megatron_sapo.policy.model import transformer_config
    from megatron_sapo.policy.hf_config import read_hf_config

    tiny_models().build("qwen3_moe", tmp_path)
    arch = read_hf_config(tmp_path)
    with pytest.raises(ValueError, match="recompute_num_layers=3 exceeds the model's 2 layers"):
        transformer_config(arch, PolicyConfig(model_path=str(tmp_path), recompute="full", recompute_num_layers=3))
    if not cpu_compat.uses_transformer_engine():
        with pytest.raises(ValueError, match="'layernorm' needs TransformerEngine"):
            transformer_config(arch, PolicyConfig(model_path=str(tmp_path), recompute="selective",
                                                  recompute_modules=["layernorm"]))
