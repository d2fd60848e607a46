"""Prompt text for the rollout engine: the tokenizer's chat template when it has one (and it is wanted), the raw
prompt otherwise."""

from __future__ import annotations

from .datasets import PromptRecord


def render_prompt(record: PromptRecord, tokenizer=None, *, apply_chat_template: bool = True,
                  system_prompt: str | None = None) -> str:
    messages = [{"role": "user", "content": record.prompt}] if isinstance(record.prompt, str) \
        else [dict(m) for m in record.prompt]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if apply_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(record.prompt, str):
        return (system_prompt + "\n" if system_prompt else "") + record.prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
