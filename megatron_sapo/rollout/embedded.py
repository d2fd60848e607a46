"""The embedded rollout engine: transformers generation in the trainer's own process, from an exported HF folder.
The CPU default (no server to start); the same output contract as the SGLang engine, log-probs included.

Prompts are left-padded into one batch and each is sampled n times (num_return_sequences). Log-probs are taken from
the raw logits of each step divided by the temperature (engine.py's convention), so they do not depend on top-p /
top-k. Updating weights reloads the model from a new folder and tags later completions with its version.
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
        result = self.model.generate(
            **enc, do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None,
            max_new_tokens=params.max_new_tokens, num_return_sequences=n, return_dict_in_generate=True,
            output_logits=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            stop_strings=list(params.stop) or None, tokenizer=tok if params.stop else None,
        )
        prompt_len = enc["input_ids"].shape[1]
        generated = result.sequences[:, prompt_len:]
        logits = torch.stack(result.logits, dim=1).float() / params.temperature  # [B*n, steps, V]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, generated[..., None])[..., 0]
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
