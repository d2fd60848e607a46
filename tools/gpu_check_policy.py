#!/usr/bin/env python
"""The GPU check's Megatron-Core step (tools/gpu_check.sh runs it): the tiny Qwen3-MoE of tools/tiny_models.py through
megatron_sapo's own Policy on one GPU, bf16, an NCCL world of one, Megatron's distributed optimizer. It proves, on the
GPU code paths that the CPU test suite cannot reach:

  cuda_kernels             the fused ops' CUDA library can launch here, so the policy's log-probs and loss run on it
                           (GPU only)
  logprobs_match_hf        Policy.log_probs against transformers: its error to an fp32 reference is within bf16's
                           (at most 2x transformers-in-bf16's own error, + 0.02 max / 0.005 mean)
  steps_finite             3 SAPO steps (Policy.train_step) on fixed old log-probs, so steps 2-3 are off-policy:
                           finite loss and grad norm, none skipped
  weights_move             every weight tensor changed over the 3 steps
  checkpoint_restores      save_checkpoint, then load_checkpoint into a new Policy: weights equal tensor for tensor
  checkpoint_next_step     the next off-policy step after the load gives the saving policy's loss, grad norm and
                           updated weights (within the GPU's run-to-run noise)
  export_exact             export_hf writes exactly the policy's weights
  export_reloads           transformers loads the export with no missing / unexpected / mismatched tensor, and its own
                           save_pretrained writes the same tensors back
  export_logprobs_match    the reloaded transformers model's log-probs against the policy's, within bf16's error
  routing_replay_r2        MoE routing replay (policy.routing_replay=r2, Megatron's RouterReplay): two updates of a
                           new policy, in which every router uses exactly the experts its old-log-prob forward
                           picked (read back from its routing map), with routing/replay_agree 1 in the first
  packed_logprobs_match_hf sequence packing (policy.pack_sequences: rows of uneven length back to back in THD
                           micro-batches under a token budget; attention through TE's THD path, or PyTorch's
                           variable-length flash attention with the local layers, reported as `attention`): the
                           packed old-log-prob forward against transformers, within bf16's error
  packed_step_matches      a packed SAPO step against the padded path's on the same weights and rows: loss and grad
                           norm within bf16 noise (2e-2 relative)

Prints one JSON object (also written to --json); exit status 1 when a check fails. A phase that raises is reported
(check PHASE_completed false, its traceback's end under "errors") and the later phases still run.

    python tools/gpu_check_policy.py --out /tmp/policy_check --json policy.json
    python tools/gpu_check_policy.py --out /tmp/policy_check --cpu    # the same on CPU in fp32, to work on this script
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

STEPS = 3


def reference_log_probs(hf_model, ids):
    """Per-token log-probs [B, S-1] of a transformers model on the CPU, the log-softmax in float64. The references
    stay on the CPU, where the test suite checks them, so that only our code runs on the GPU."""
    import torch

    ids = ids.cpu()
    with torch.no_grad():
        logits = hf_model(ids).logits.double()
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def bf16_agreement(ours, peer, truth) -> dict:
    """How far `ours` (a bf16 run) is from `truth` (fp32), judged against a bf16 peer's own distance to it: a
    low-precision path is fine when its error is of the size the plain bf16 path makes."""
    ours_err, peer_err = (ours.cpu().double() - truth).abs(), (peer.double() - truth).abs()
    out = {"max_abs_err": ours_err.max().item(), "mean_abs_err": ours_err.mean().item(),
           "peer_max_abs_err": peer_err.max().item(), "peer_mean_abs_err": peer_err.mean().item()}
    out["ok"] = bool(out["max_abs_err"] <= 2 * out["peer_max_abs_err"] + 0.02
                     and out["mean_abs_err"] <= 2 * out["peer_mean_abs_err"] + 0.005)
    return out


def make_batch(vocab: int, seed: int, device):
    """8 sequences of 33 tokens, responses starting at different positions, one ending early (right padding)."""
    import torch

    from megatron_sapo.policy.policy import PolicyBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (8, 33), generator=g)
    mask = torch.zeros(8, 32, dtype=torch.bool)
    for row, start in enumerate((4, 8, 6, 10, 5, 12, 7, 9)):
        mask[row, start:] = True
    mask[3, 25:] = False
    return PolicyBatch(ids.to(device), mask.to(device), torch.randn(8, generator=g).to(device))


def update_distance(a: dict, b: dict, base: dict) -> float:
    """||a - b|| / ||b - base|| over all tensors: how far apart two updates of the weights `base` ended."""
    apart = sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b)
    update = sum(((b[k].double() - base[k].double()) ** 2).sum().item() for k in b)
    return math.sqrt(apart / update) if update else math.inf


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def layer_spec_of(module) -> str:
    return "transformer_engine" if any("transformer_engine" in type(m).__module__ for m in module.modules()) \
        else "local"


def uneven_batch(vocab: int, device):
    """16 rows of 14 to 96 tokens (prompt 4-11, the rest response), right-padded to 96: packing's shape."""
    import torch

    from megatron_sapo.policy.policy import PolicyBatch

    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(14, 97, (16,), generator=g).tolist()
    ids = torch.randint(0, vocab, (16, 96), generator=g)
    mask = torch.zeros(16, 95, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, 3 + row % 8:n - 1] = True
    return PolicyBatch(ids.to(device), mask.to(device), torch.randn(16, generator=g).to(device))


def attention_path(policy, on_gpu: bool) -> str:
    """Which attention a packed micro-batch goes through (policy/packing.py)."""
    if layer_spec_of(policy.module) == "transformer_engine":
        return "transformer_engine THD"
    from megatron_sapo.policy.packing import _varlen

    return "torch varlen_attn" if on_gpu and _varlen() is not None else "blocks (local attention, block-diagonal masks)"


class PolicyCheck:
    """The phases in order; each adds its numbers to `result` and its verdicts to `checks`."""

    def __init__(self, out: Path, on_gpu: bool):
        import torch
        import tiny_models

        from megatron_sapo.policy.config import PolicyConfig

        self.out, self.on_gpu = out, on_gpu
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.hf = tiny_models.build("qwen3_moe", out / "model", seed=0)
        self.vocab = self.hf.config.vocab_size
        # Megatron's bf16 optimizer takes only CUDA parameters: the CPU run (for working on this script) stays in fp32
        self.cfg = PolicyConfig(model_path=str(out / "model"), params_dtype="bfloat16" if on_gpu else "float32",
                                use_distributed_optimizer=on_gpu, micro_batch_size=2, lr=1e-3, clip_grad=1.0, seed=1)
        self.result: dict = {"seconds": {}}
        self.checks: dict[str, bool] = {}

    def run_phase(self, name: str) -> None:
        """Run one phase; an exception fails it (and what depends on it) but not the phases after it, so that one
        GPU session learns as much as it can."""
        import torch

        began = time.perf_counter()
        try:
            getattr(self, name)()
            if self.on_gpu:
                torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - reported, and the next phase still runs
            self.checks[f"{name}_completed"] = False
            self.result.setdefault("errors", {})[name] = traceback.format_exc().splitlines()[-12:]
            traceback.print_exc()
        self.result["seconds"][name] = round(time.perf_counter() - began, 2)

    def build(self) -> None:
        import torch

        from megatron_sapo.ops.kernel_library import launch_problem
        from megatron_sapo.policy.policy import Policy

        self.policy = Policy(self.cfg)
        self.result.update(
            device=torch.cuda.get_device_name() if self.on_gpu else "cpu", params_dtype=self.cfg.params_dtype,
            layer_spec=layer_spec_of(self.policy.module), optimizer=type(self.policy.optimizer).__name__,
            use_distributed_optimizer=self.cfg.use_distributed_optimizer,
            world_size=torch.distributed.get_world_size(), backend=torch.distributed.get_backend())
        if self.on_gpu:  # else the fused ops would run their torch path, with one warning
            self.result["cuda_kernels_problem"] = launch_problem(self.device)
            self.checks["cuda_kernels"] = self.result["cuda_kernels_problem"] is None

    def logprobs(self) -> None:
        import torch

        self.batch = make_batch(self.vocab, 0, self.device)
        ids = self.batch.input_ids
        self.batch.old_log_probs = self.policy.log_probs(ids)
        peer = reference_log_probs(copy.deepcopy(self.hf).to(torch.bfloat16), ids)
        self.result["logprobs"] = bf16_agreement(self.batch.old_log_probs, peer, reference_log_probs(self.hf, ids))
        self.checks["logprobs_match_hf"] = self.result["logprobs"]["ok"]

    def train(self) -> None:
        from megatron_sapo.losses import LossConfig

        start = self.policy.hf_state_dict()
        steps = []
        for _ in range(STEPS):
            m = self.policy.train_step(self.batch, LossConfig(loss_type="sapo"))
            steps.append({k: m[k] for k in ("loss", "grad_norm", "skipped", "lr", "ratio/mean", "gate/weight_mean")
                          if k in m})
        self.result["steps"] = steps
        self.checks["steps_finite"] = all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"])
                                          and s["skipped"] == 0 for s in steps)
        self.trained = self.policy.hf_state_dict()
        changes = [(self.trained[k].float() - v.float()).abs().max().item() for k, v in start.items()]
        self.result["weights"] = {"tensors": len(start), "changed": sum(c > 0 for c in changes),
                                  "max_abs_change": max(changes)}
        self.checks["weights_move"] = all(c > 0 for c in changes)

    def checkpoint(self) -> None:
        """Save, take one more off-policy step; a new Policy loads the checkpoint and takes the same step."""
        import torch

        from megatron_sapo.losses import LossConfig
        from megatron_sapo.policy.checkpoint import load_checkpoint, save_checkpoint
        from megatron_sapo.policy.policy import Policy

        path = save_checkpoint(self.policy, self.out / "checkpoints")
        noise = 0.3 * torch.randn(8, 32, generator=torch.Generator().manual_seed(2)).to(self.device)
        nxt = make_batch(self.vocab, 1, self.device)
        nxt.old_log_probs = self.policy.log_probs(nxt.input_ids) + noise
        saving = self.policy.train_step(nxt, LossConfig(loss_type="sapo"))
        saving_after = self.policy.hf_state_dict()
        del self.policy
        self.policy = Policy(self.cfg)
        load_checkpoint(self.policy, path)
        self.checks["checkpoint_restores"] = (same_tensors(self.policy.hf_state_dict(), self.trained)
                                              and self.policy.step == STEPS)
        again = self.policy.train_step(nxt, LossConfig(loss_type="sapo"))
        after = self.policy.hf_state_dict()
        apart = update_distance(after, saving_after, self.trained)
        bitwise = saving["loss"] == again["loss"] and same_tensors(after, saving_after)
        self.result["checkpoint"] = {"loss": [saving["loss"], again["loss"]], "update_distance": apart,
                                     "grad_norm": [saving["grad_norm"], again["grad_norm"]],
                                     "bitwise_same_next_step": bitwise}
        # not bit for bit: the MoE token dispatcher's scatter-add on a GPU adds in a varying order. Moments that were
        # not restored change the Adam update itself (zeroed ones: update_distance 1.1 on the CPU), far beyond 0.1
        self.checks["checkpoint_next_step"] = (
            math.isclose(saving["loss"], again["loss"], rel_tol=1e-3, abs_tol=1e-5)
            and math.isclose(saving["grad_norm"], again["grad_norm"], rel_tol=1e-2) and apart <= 0.1)

    def export(self) -> None:
        import torch
        import transformers

        from megatron_sapo.policy.hf_weights import read_safetensors

        self.policy.export_hf(self.out / "export")
        exported = read_safetensors(self.out / "export")
        self.checks["export_exact"] = same_tensors(exported, self.policy.hf_state_dict())
        reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            self.out / "export", dtype=next(iter(exported.values())).dtype, output_loading_info=True)
        problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
        reloaded.save_pretrained(self.out / "resaved")
        resaved = read_safetensors(self.out / "resaved")
        unequal = [k for k in exported.keys() & resaved.keys() if not torch.equal(exported[k], resaved[k])]
        self.checks["export_reloads"] = not problems and not unequal and exported.keys() == resaved.keys()
        resave = {"missing": sorted(exported.keys() - resaved.keys())[:8],
                  "extra": sorted(resaved.keys() - exported.keys())[:8],
                  "unequal": {k: f"{exported[k].dtype} {list(exported[k].shape)} vs {resaved[k].dtype} "
                                 f"{list(resaved[k].shape)}" for k in sorted(unequal)[:8]}}
        reloaded.eval()
        ids = self.batch.input_ids
        agreement = bf16_agreement(self.policy.log_probs(ids), reference_log_probs(reloaded, ids),
                                   reference_log_probs(copy.deepcopy(reloaded).float(), ids))
        self.result["export"] = {"tensors": len(exported), "loading_problems": problems, "resaved": resave,
                                 "logprobs": agreement}
        self.checks["export_logprobs_match"] = agreement["ok"]


    def routing(self) -> None:
        import dataclasses

        import torch

        from megatron_sapo.losses import LossConfig
        from megatron_sapo.policy.policy import Policy

        policy = Policy(dataclasses.replace(self.cfg, routing_replay="r2"))
        used = []

        def keep(module, inputs, output):
            used.append(output[1].to(torch.int32).topk(module.topk, dim=-1).indices.sort(-1).values.to(torch.int16))
        for router in policy.routes.routers:
            router.register_forward_hook(keep)
        held, agree = [], []
        for seed in (3, 4):
            batch = make_batch(self.vocab, seed, self.device)
            batch.old_log_probs, batch.old_routes = policy.old_log_probs(batch.input_ids)
            used.clear()
            metrics = policy.train_step(batch, LossConfig(loss_type="grpo"))
            recorded = [ids for micro in batch.old_routes for ids in micro]
            held.append(len(used) == len(recorded) > 0 and all(torch.equal(a, b) for a, b in zip(used, recorded)))
            agree.append(metrics["routing/replay_agree"])
        self.result["routing"] = {"routes_held": held, "replay_agree": agree}
        self.checks["routing_replay_r2"] = all(held) and agree[0] == 1.0

    def packing(self) -> None:
        """A packed policy on the model's own weights: its old log-probs against transformers, and a SAPO step
        against the padded path's (the same Policy: the plan is the batch's, the weights do not move at lr 0)."""
        import dataclasses

        import torch

        from megatron_sapo.batching import plan_micro_batches, row_lengths
        from megatron_sapo.losses import LossConfig
        from megatron_sapo.policy.policy import Policy, PolicyBatch

        policy = Policy(dataclasses.replace(self.cfg, lr=0.0, max_tokens_per_micro_batch=256, pack_sequences=True))
        batch = uneven_batch(self.vocab, self.device)
        plans, _ = plan_micro_batches(row_lengths(batch.response_mask.cpu()), dp=1, max_tokens=256,
                                      **policy.plan_layout())
        plan = plans[0]
        rows = torch.tensor(plan.rows, device=self.device)
        ids, mask, adv = batch.input_ids[rows], batch.response_mask[rows], batch.advantages[rows]
        packed_old, _ = policy.old_log_probs(ids, micro_batches=plan.micro_batches)
        reference = reference_log_probs(self.hf, ids)
        peer = reference_log_probs(copy.deepcopy(self.hf).to(torch.bfloat16), ids)
        keep = mask.cpu()
        agreement = bf16_agreement(packed_old.cpu()[keep], peer[keep], reference[keep])
        old = packed_old + 0.3 * torch.randn(packed_old.shape, generator=torch.Generator().manual_seed(6)).to(
            self.device) * mask
        loss = LossConfig(loss_type="sapo")
        padded = policy.train_step(PolicyBatch(ids, mask, adv, old_log_probs=old), loss)
        packed = policy.train_step(PolicyBatch(ids, mask, adv, old_log_probs=old, micro_batches=plan.micro_batches),
                                   loss)
        self.result["packing"] = {
            "attention": attention_path(policy, self.on_gpu), "micro_batches": len(plan),
            "rows_per_micro_batch": [len(mb.rows) for mb in plan.micro_batches], "logprobs": agreement,
            "loss": [padded["loss"], packed["loss"]], "grad_norm": [padded["grad_norm"], packed["grad_norm"]]}
        self.checks["packed_logprobs_match_hf"] = agreement["ok"]
        self.checks["packed_step_matches"] = (
            packed["skipped"] == padded["skipped"] == 0
            and math.isclose(packed["loss"], padded["loss"], rel_tol=2e-2, abs_tol=1e-4)
            and math.isclose(packed["grad_norm"], padded["grad_norm"], rel_tol=2e-2))


def run(out: Path, on_gpu: bool, layer_spec: str) -> dict:
    import torch

    if layer_spec == "local":
        # Policy picks TransformerEngine's layers whenever TE imports; hiding it checks the local spec, which is what
        # clusters without TE run
        sys.modules["transformer_engine"] = None
    if on_gpu != torch.cuda.is_available():  # the policy uses CUDA whenever it is there
        raise SystemExit("no CUDA GPU: this check runs on one (--cpu runs it on the CPU)" if on_gpu else
                         "--cpu is for machines without a GPU: the policy uses CUDA whenever it is there")
    check = PolicyCheck(out, on_gpu)
    for name in ("build", "logprobs", "train", "checkpoint", "export", "routing", "packing"):
        check.run_phase(name)
    return {**check.result, "checks": check.checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder: model, checkpoints, export")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--layer-spec", choices=["local", "te"], default="local",
                        help="Megatron's local layers, or TransformerEngine's (needs TE)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (gloo, fp32, no distributed optimizer)")
    args = parser.parse_args()
    if args.layer_spec == "te":
        import importlib.util

        if importlib.util.find_spec("transformer_engine") is None:
            raise SystemExit("--layer-spec te needs TransformerEngine, which is not importable")
    import torch.distributed as dist

    try:
        result = run(args.out, not args.cpu, args.layer_spec)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    failed = [name for name, ok in result["checks"].items() if not ok]
    if failed:
        sys.exit(f"failed checks: {', '.join(failed)}")


if __name__ == "__main__":
    main()
