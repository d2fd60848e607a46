"""MoE routing replay (R2, R3) on Megatron-Core's RouterReplay, and the routing diagnostics.

An MoE token's probability depends on the experts its routers pick. When the experts picked while generating (the
rollout engine) or in the old-log-prob forward differ from those a training forward picks, the importance ratio
compares two different functions, and a GRPO-style clip then sees ratios far from 1 that no update caused.
policy.routing_replay:
  none  every forward routes by itself (SAPO's setting in the paper: its gate absorbs the noise)
  r2    a mini-batch's training forward takes the experts of its own old-log-prob forward (the first update's ratios
        are then exactly 1: GRPO-R2, the paper's baseline)
  r3    the old-log-prob forward and the training forward take the experts the rollout engine picked while generating
        (the trainer then computes the engine's function, up to numerics)
Replay is Megatron-Core's own (TransformerConfig.moe_enable_routing_replay: each router holds a RouterReplay,
set here to REPLAY_FORWARD with the micro-batch's ids): a router takes the given top-k ids and gathers its own scores
at them, so the gradient still reaches the router through the probabilities of the replayed experts. Under
activation recompute a router runs again inside the backward; there it replays, first in first out, the routes its
forwards were given (Megatron's REPLAY_BACKWARD), since a pipeline schedule may have run later micro-batches'
forwards in between, and its picks are not filed again. Nothing of Megatron's router is patched; each router's own
instance is driven (not RouterReplay's process-global list), so several models in one process do not mix.

Routes (`Routes`): per micro-batch, per router of this rank (this pipeline stage's MoE layers, in build order), the
top-k expert ids [tokens, k] (int16, sorted) of the tokens that router sees.
Megatron routes a micro-batch as [s, b] flattened, sequence-major, and under sequence parallelism each
tensor-parallel rank routes its own chunk of the padded sequence. An engine's routes per row, [B, S, layers, k]
aligned with input_ids (position t: the experts of token t), are cut into that form by `native_routes`. Memory: 2k
bytes per token and MoE layer of this rank's sequence chunk and stage, kept for each mini-batch of a rollout batch
from its old-log-prob forward to its update.

Diagnostics (`RouteTracker.agreement`), over the tokens that are trained (padding excluded), counts summed over
micro-batches, sequence chunks, data-parallel ranks and stages:
  routing/replay_agree        fraction of (token, MoE layer) top-k sets that a training forward's routers pick by
                              themselves equal to those its old-log-prob forward picked by itself: how far routing
                              drifts within a rollout batch (1 for the first mini-batch)
  routing/engine_agree        the same between the engine's routes and the old-log-prob forward's own picks
  ..._min_layer               the worst MoE layer's fraction
"By themselves": under replay a router's own pick is computed from its logits beside the replayed one (one extra
[tokens, hidden] x [hidden, experts] matmul per MoE layer, without gradient).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

REPLAY_MODES = ("none", "r2", "r3")
UNKNOWN = -1  # an engine route that does not exist: the last token (never fed through the model), padding

Routes = list[list[torch.Tensor]]  # [micro-batch][router] -> [tokens, k] int16


class RouteTracker:
    """Hooks on this rank's routers that keep, per micro-batch, what each router picked by itself, and the switch
    that makes them replay given routes (Megatron's RouterReplay). `begin(i, replay)` before micro-batch i's forward;
    `finish()` after the schedule returns the micro-batches' own picks and switches replay off."""

    def __init__(self, model, num_layers: int):
        from megatron.core.transformer.moe.router import TopKRouter

        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self.num_layers = num_layers
        # a router's global layer (0-based), for per-layer diagnostics over pipeline stages
        self.layers = [router.layer_number - 1 for router in self.routers]
        self.captured: dict[int, list[torch.Tensor | None]] = {}
        self._current: list[torch.Tensor | None] | None = None
        self._replaying = False
        for index, router in enumerate(self.routers):
            router.register_forward_pre_hook(self._choose_replay)
            router.register_forward_hook(partial(self._capture, index))

    def _choose_replay(self, router, inputs) -> None:
        """Activation recompute runs a router again inside the backward, where pipeline schedules (1F1B) may already
        have run later micro-batches' forwards: there it replays, first in first out, the routes each forward of
        it was given (Megatron's REPLAY_BACKWARD list), not the newest ones."""
        if self._replaying and router.router_replay is not None:
            from megatron.core.transformer.moe.router_replay import RouterReplayAction

            action = RouterReplayAction.REPLAY_BACKWARD if _in_backward() else RouterReplayAction.REPLAY_FORWARD
            router.router_replay.set_router_replay_action(action)

    def _capture(self, index: int, module, inputs, output) -> None:
        if self._current is None or _in_backward():  # a recompute: the forward's picks are filed already
            return
        if self._replaying:
            with torch.no_grad():
                ids = torch.topk(module.gating(inputs[0]), module.topk, dim=-1).indices.reshape(-1, module.topk)
        else:  # the k experts of the routing map (topk rather than nonzero: no device sync)
            ids = output[1].to(torch.int32).topk(module.topk, dim=-1).indices
        self._current[index] = ids.sort(dim=-1).values.to(torch.int16)

    def begin(self, micro_batch: int, replay: list[torch.Tensor] | None = None) -> None:
        """Micro-batch `micro_batch` is about to run: file the routers' picks under it, and make them take
        `replay` (one [tokens, k] per router) instead of their own picks, or route by themselves (None)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._current = self.captured.setdefault(micro_batch, [None] * len(self.routers))
        self._replaying = replay is not None
        if replay is None:
            self._stop_replay()
            return
        if len(replay) != len(self.routers):
            raise ValueError(f"routes for {len(replay)} MoE layers, this rank's model has {len(self.routers)}")
        for router, ids in zip(self.routers, replay):
            if router.router_replay is None:
                raise ValueError("replaying routes needs a model built with policy.routing_replay r2 or r3")
            router.router_replay.set_target_indices(ids.to(torch.long))
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def _stop_replay(self) -> None:
        for router in self.routers:
            if router.router_replay is not None:
                router.router_replay.clear_router_replay_action()

    def finish(self) -> Routes:
        """The picks of the micro-batches run since the last finish(), in micro-batch order; replay is switched
        off and the replay instances emptied (Megatron keeps one entry per replayed forward for a recompute)."""
        self._stop_replay()
        for router in self.routers:
            if router.router_replay is not None:
                router.router_replay.clear_indices()
        routes = [self.captured[i] for i in sorted(self.captured)]
        self.captured, self._current, self._replaying = {}, None, False
        return routes

    # ---- diagnostics ----------------------------------------------------------------------------------------------

    def count_agreement(self, mine: Routes, reference: Routes, valid: list[torch.Tensor]) -> torch.Tensor:
        """[num_layers, 2]: per global layer, (top-k sets of `mine` equal to `reference`, sets compared), over the
        valid tokens (`valid`: per micro-batch, [tokens] bool in the routers' order) whose reference is known."""
        counts = None
        for picks, ref, ok in zip(mine, reference, valid):
            for layer, a, b in zip(self.layers, picks, ref):
                if counts is None:  # on the routes' device: summed there, read once (no sync per layer)
                    counts = torch.zeros(self.num_layers, 2, dtype=torch.float64, device=b.device)
                known = ok.to(b.device) & (b >= 0).all(dim=-1)
                same = (a.to(b.device) == b).all(dim=-1) & known
                counts[layer] += torch.stack([same.sum(), known.sum()]).to(torch.float64)
        return counts if counts is not None else torch.zeros(self.num_layers, 2, dtype=torch.float64)

    @staticmethod
    def agreement(counts: torch.Tensor, name: str, device) -> dict[str, float]:
        """routing/<name>_agree and routing/<name>_agree_min_layer from this rank's per-layer counts, summed over
        every rank (collective over the world: sequence chunks and data-parallel ranks add tokens, stages add
        layers; a rank that routes the same tokens as another adds to both counts alike)."""
        counts = counts.to(device)
        if dist.get_world_size() > 1:
            dist.all_reduce(counts)
        counts = counts.cpu()
        seen = counts[:, 1] > 0
        if not seen.any():
            return {}
        per_layer = counts[seen, 0] / counts[seen, 1]
        return {f"routing/{name}_agree": (counts[:, 0].sum() / counts[:, 1].sum()).item(),
                f"routing/{name}_agree_min_layer": per_layer.min().item()}


def _in_backward() -> bool:
    """Whether autograd is running a backward here (a checkpointed forward being recomputed)."""
    return torch._C._current_autograd_node() is not None


def token_order(rows: torch.Tensor, padded_len: int, tp: int, tp_rank: int, sequence_parallel: bool,
                fill) -> torch.Tensor:
    """Per-row values [b, s, ...] in the order a router of this rank sees the tokens: the sequence right-padded to
    `padded_len` with `fill`, this rank's sequence chunk under sequence parallelism, then [s, b] flattened."""
    b, s = rows.shape[:2]
    if padded_len > s:
        rows = torch.cat([rows, rows.new_full((b, padded_len - s, *rows.shape[2:]), fill)], dim=1)
    if sequence_parallel and tp > 1:
        chunk = padded_len // tp
        rows = rows[:, tp_rank * chunk:(tp_rank + 1) * chunk]
    return rows.transpose(0, 1).reshape(-1, *rows.shape[2:])


def native_routes(micro_batches: list[torch.Tensor], layers: list[int], *, tp: int, tp_rank: int,
                  sequence_parallel: bool) -> Routes:
    """An engine's routes cut per micro-batch, each [b, s, num_layers, k] (policy: its rows at its length) ->
    Routes for this rank: per micro-batch, per router (its global layer in `layers`), [tokens, k] in the routers'
    token order (the sequence padded to a multiple of tp, as the policy pads it). Unknown entries stay UNKNOWN."""
    out = []
    for chunk in micro_batches:
        padded_len = -(-chunk.shape[1] // tp) * tp
        ordered = token_order(chunk[:, :, layers], padded_len, tp, tp_rank, sequence_parallel, UNKNOWN)
        out.append([ordered[:, j].to(torch.int16) for j in range(len(layers))])
    return out


def fill_unknown(routes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Routes a router can replay: an UNKNOWN token (the last one of a sequence, padding) takes experts 0..k-1. Such
    a token's output feeds no trained position (it is the last of its row, or padding after it), so any valid
    experts do; the aux loss's padding mask leaves out the padding."""
    out = []
    for ids in routes:
        unknown = (ids < 0).any(dim=-1)
        if unknown.any():
            ids = ids.clone()
            ids[unknown] = torch.arange(ids.shape[-1], dtype=ids.dtype, device=ids.device)
        out.append(ids)
    return out


def check_routes(routes: torch.Tensor, *, rows: int, seq_len: int, num_layers: int, topk: int, num_experts: int,
                 what: str = "the engine's routes") -> None:
    """A clear error for routes that do not fit the batch and the model, before any forward uses them."""
    expected = (rows, seq_len, num_layers, topk)
    if tuple(routes.shape) != expected:
        names = ("rows", "tokens", "layers", "top-k")
        diff = ", ".join(f"{n} {a} vs {b}" for n, a, b in zip(names, routes.shape, expected) if a != b) \
            or f"shape {tuple(routes.shape)} vs {expected}"
        raise ValueError(f"{what} do not fit: [rows, tokens, layers, top-k] = {tuple(routes.shape)}, the batch and "
                         f"model need {expected} ({diff})")
    bad = (routes >= num_experts) | (routes < UNKNOWN)
    if bad.any():
        value = routes[bad][0].item()
        raise ValueError(f"{what} name expert {value}, outside 0..{num_experts - 1} (UNKNOWN is {UNKNOWN})")
