"""Prompt encoding shared by every backend: the Qwen3 chat template, tokenization and the feature stacking."""

from __future__ import annotations

import torch

from .errors import BonsaiValueError


def format_prompt(tokenizer, prompt: str) -> str:
    """The user turn with thinking disabled, as the text encoder saw in training."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def tokenize(tokenizer, prompts, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids, attention_mask: int64 [B, max_length], right-padded. A prompt longer than max_length tokens
    is refused: the reference pipeline would silently cut it."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, padding="max_length", truncation=False, max_length=max_length)
    for i, ids in enumerate(enc["input_ids"]):
        if len(ids) > max_length:
            raise BonsaiValueError(f"prompt[{i}] is {len(ids)} tokens with the chat template; the text encoder "
                                   f"reads at most {max_length}")
    return torch.tensor(enc["input_ids"], dtype=torch.int64), torch.tensor(enc["attention_mask"], dtype=torch.int64)


def stack_features(hidden_states, layers) -> torch.Tensor:
    """hidden_states tuple (each [B, S, H]) -> [B, S, len(layers) * H], per token [h_l1 | h_l2 | ...]."""
    return torch.cat([hidden_states[i] for i in layers], dim=-1)
