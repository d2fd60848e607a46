"""The embedded rollout engine: transformers generation in the trainer's own process, from an exported HF folder.
The CPU default (no server to start); the same output contract as the SGLang engine, log-probs included.

Prompts are left-padded into one batch and each is sampled n times (num_return_sequences). Log-probs are taken from
the raw logits of each step divided by the temperature (engine.py's convention), so they do not depend on top-p /
top-k, and gathered step by step (`_StepLogProbs`, a forward hook on the model): each decoding step's input is the
token sampled from the step before's logits. Memory: one step's [rows, V] log-probs beside the model's own
logits of that step, independent of the number of generated tokens (asking generate for output_logits would hold
[rows, tokens, V]: 79 GB for 512 rows x 256 tokens at V = 151,936). Sampling follows only the call's parameters:
the model folder's generation_config (a repetition penalty, other defaults) is not applied, since the trainer's
log-probs know nothing of it. Updating weights reloads the model from a new folder and tags later completions with
its version.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .engine import Completion, SamplingParams, check_prompts


class EmbeddedEngine:
    def __init__(self, model_dir: str | Path, version: str = "0", *, max_batch_prompts: int = 64,
                 dtype: torch.dtype = torch.float32):
        self.dtype, self.max_batch_prompts = dtype, max_batch_prompts
        self._load(model_dir, version)

    def _load(self, model_dir, version: str) -> None:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()  # a reload at every step would print a bar each time

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).eval()
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load the model in {model_dir}: {err}") from err
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.generation_config = transformers.GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                                pad_token_id=tokenizer.pad_token_id)
        tokenizer.padding_side = "left"
        self.tokenizer, self.model, self.version, self.model_dir = tokenizer, model, version, model_dir

    def update_weights(self, model_dir: str | Path, version: str) -> None:
        self._load(model_dir, version)

    def shutdown(self) -> None:
        self.model = None

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, params: SamplingParams,
                 return_routes: bool = False) -> list[list[Completion]]:
        check_prompts(prompts, n)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            out.extend(self._generate_batch(prompts[start:start + self.max_batch_prompts], n, params, return_routes))
        return out

    def _generate_batch(self, prompts, n, params, return_routes: bool):
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        steps = _StepLogProbs(params.temperature)
        handles = [self.model.register_forward_hook(steps, with_kwargs=True)]
        routes = _StepRoutes(self.model) if return_routes else None
        if routes is not None:
            handles += routes.handles
        try:
            sequences = self.model.generate(
                **enc, do_sample=True, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k or None, max_new_tokens=params.max_new_tokens, num_return_sequences=n,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                stop_strings=list(params.stop) or None, tokenizer=tok if params.stop else None,
            )
        finally:
            for handle in handles:
                handle.remove()
        prompt_len = enc["input_ids"].shape[1]
        generated = sequences[:, prompt_len:]
        logprobs = steps.finish(generated[:, -1:])  # [B*n, steps]
        # [B*n, prompt_len + steps - 1, layers, k]
        fed_routes = routes.finish(generated.shape[0]) if routes is not None else None
        completions = []
        for row in range(generated.shape[0]):
            prompt_index = row // n
            in_prompt = enc["attention_mask"][prompt_index].bool()
            prompt_ids = enc["input_ids"][prompt_index][in_prompt].tolist()
            ids, reason = self._trim(generated[row].tolist(), params)
            row_routes = None
            if fed_routes is not None:  # the prompt's own positions (not the left padding), then the fed outputs
                row_routes = torch.cat([fed_routes[row, :prompt_len][in_prompt],
                                        fed_routes[row, prompt_len:prompt_len + len(ids) - 1]])
            completions.append(Completion(
                prompt_ids=prompt_ids, output_ids=ids, output_logprobs=logprobs[row, :len(ids)].tolist(),
                text=tok.decode(ids, skip_special_tokens=True), finish_reason=reason, weight_version=self.version,
                routes=row_routes,
            ))
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _trim(self, ids: list[int], params: SamplingParams) -> tuple[list[int], str]:
        """Cut the padding after a finished sequence; 'stop' if it ended on EOS or a stop string."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if eos in ids:
            return ids[: ids.index(eos) + 1], "stop"
        if pad != eos:  # a sequence that stopped on a stop string is padded while the others go on
            while ids and ids[-1] == pad:
                ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if any(text.endswith(s) for s in params.stop):
            return ids, "stop"
        return ids, "length"


class _StepLogProbs:
    """A forward hook on the model during generate: the log-probs under softmax(logits / temperature) of each
    sampled token. A call's input (with the KV cache, the one new token per row) was sampled from the previous call's
    last-position logits, so each call gathers the previous one's log-probs at its input and keeps its own for the
    next; `finish` gathers the last step's at the final tokens. Holds one step's [rows, V] log-probs at a time."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # [rows, V]
        self.gathered: list[torch.Tensor] = []  # [rows, 1] per step

    def __call__(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        if self.previous is not None:
            self.gathered.append(self.previous.gather(-1, ids[:, -1:]))
        logits = output.logits[:, -1, :].float() / self.temperature
        self.previous = torch.log_softmax(logits, dim=-1)

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self.gathered.append(self.previous.gather(-1, last_tokens))
        self.previous = None
        return torch.cat(self.gathered, dim=1)


class _StepRoutes:
    """Forward hooks on the MoE routers of a transformers model during generate: the experts each fed token took,
    per layer (transformers' Qwen3-MoE router returns (logits, weights, top-k ids)). The prompt's forward gives its
    positions, each decoding step one more; `finish` stacks them as [rows, tokens fed, num_layers, k], -1 in layers
    without experts. Memory: k ids per token and layer."""

    def __init__(self, model):
        layers = model.model.layers
        self.num_layers, self.calls = len(layers), {}
        self.topk = model.config.num_experts_per_tok
        self.handles = []
        for index, layer in enumerate(layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(layer.mlp, "experts"):
                self.handles.append(gate.register_forward_hook(self._hook(index)))
        if not self.handles:
            raise ValueError(f"{type(model).__name__} has no MoE routers to read routes from")

    def _hook(self, index: int):
        def keep(module, args, output):
            ids = output[2] if isinstance(output, tuple) and len(output) == 3 else None
            if ids is None or ids.dtype not in (torch.int64, torch.int32) or ids.shape[-1] != self.topk:
                raise ValueError(f"the router of layer {index} ({type(module).__name__}) does not return "
                                 f"top-{self.topk} expert ids as its third output, as transformers' Qwen3-MoE router "
                                 "does")
            self.calls.setdefault(index, []).append(ids.to(torch.int16))
        return keep

    def finish(self, rows: int) -> torch.Tensor:
        """[rows, tokens fed, num_layers, k]: the prompt's call routed rows x prompt_len tokens (row-major), each
        decoding call rows x 1."""
        out = None
        for index, calls in self.calls.items():
            stacked = torch.cat([c.view(rows, -1, self.topk) for c in calls], dim=1)  # [rows, fed, k]
            if out is None:
                out = torch.full((rows, stacked.shape[1], self.num_layers, self.topk), -1, dtype=torch.int16)
            out[:, :, index] = stacked
        self.calls = {}
        return out
