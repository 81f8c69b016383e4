"""Prompt encoding shared by every backend: the Qwen3 chat template, tokenization and the feature layers."""

from __future__ import annotations

from pathlib import Path

import torch

FEATURE_LAYERS = (9, 18, 27)  # hidden_states indices (0 = embeddings): outputs of decoder layers 9, 18 and 27
MAX_LENGTH = 512  # the reference CUDA path pads every prompt to 512 tokens; the DiT attends to all of them


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"missing tokenizer files in {path} (tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(path)


def format_prompt(tokenizer, prompt: str) -> str:
    """The user turn with thinking disabled, as the text encoder saw in training."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def tokenize(tokenizer, prompts: list[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids, attention_mask: int64 [B, max_length], right-padded, truncated at max_length."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def stack_features(hidden_states, layers=FEATURE_LAYERS) -> torch.Tensor:
    """hidden_states tuple (each [B, S, H]) -> [B, S, len(layers) * H], per token [h9 | h18 | h27]."""
    return torch.cat([hidden_states[i] for i in layers], dim=-1)
