"""Choosing the next token from logits."""

from __future__ import annotations

import torch


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """logits (V,) fp32 -> token id. temperature 0 is greedy (argmax, lowest id on ties)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
