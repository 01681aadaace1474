"""Sampled generation with per-token logprobs, for RL rollouts on the reference engine, and the one
function both the engine and a trainer use to score tokens (so their logprobs can be compared bit for bit).

`sequence_logprobs` runs ONE full forward (no KV cache) over prompt + completion and returns the
log-probability of every completion token under the full distribution. `sample` draws completions
(temperature, optional top-k) and then scores them with `sequence_logprobs`, so an engine and a trainer
holding the same weights and calling it on the same [n, L] batch get identical numbers on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["sample", "sequence_logprobs"]


def sequence_logprobs(lm, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[n, L - prompt_len] logprobs of ``ids[:, prompt_len:]`` given what precedes them (differentiable
    unless called under no_grad)."""
    logits = lm(input_ids=ids).logits[:, prompt_len - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample(lm, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int = 0, seed: int = 0, device: torch.device | str = "cpu") -> list[dict]:
    """``n`` sampled completions of exactly ``max_new_tokens`` tokens per prompt (no early stop, so a
    prompt's completions form one [n, L] batch). Per prompt: ``prompt_ids``, ``token_ids`` [n][T],
    ``logprobs`` [n][T] (full-distribution logprobs from `sequence_logprobs`), ``texts``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids[0].tolist()
        ids = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            logits = lm(input_ids=ids).logits[:, -1].float() / max(temperature, 1e-6)
            if top_k:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(device)
            ids = torch.cat([ids, nxt], dim=1)
        lp = sequence_logprobs(lm, ids, len(prompt_ids))
        new = ids[:, len(prompt_ids):].tolist()
        out.append({"prompt_ids": prompt_ids, "token_ids": new, "logprobs": lp.tolist(),
                    "texts": [tokenizer.decode(t) for t in new]})
    return out
