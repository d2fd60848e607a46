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
    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> list[list[Completion]]:
        check_prompts(prompts, n)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            out.extend(self._generate_batch(prompts[start:start + self.max_batch_prompts], n, params))
        return out

    def _generate_batch(self, prompts, n, params):
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        steps = _StepLogProbs(params.temperature)
        handle = self.model.register_forward_hook(steps, with_kwargs=True)
        try:
            sequences = self.model.generate(
                **enc, do_sample=True, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k or None, max_new_tokens=params.max_new_tokens, num_return_sequences=n,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                stop_strings=list(params.stop) or None, tokenizer=tok if params.stop else None,
            )
        finally:
            handle.remove()
        prompt_len = enc["input_ids"].shape[1]
        generated = sequences[:, prompt_len:]
        logprobs = steps.finish(generated[:, -1:])  # [B*n, steps]
        completions = []
        for row in range(generated.shape[0]):
            prompt_index = row // n
            prompt_ids = enc["input_ids"][prompt_index][enc["attention_mask"][prompt_index].bool()].tolist()
            ids, reason = self._trim(generated[row].tolist(), params)
            completions.append(Completion(
                prompt_ids=prompt_ids, output_ids=ids, output_logprobs=logprobs[row, :len(ids)].tolist(),
                text=tok.decode(ids, skip_special_tokens=True), finish_reason=reason, weight_version=self.version,
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
