"""transformers helpers shared by the trainer and the reference engine (greedy generation, loading)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.device("cuda:0")
    return torch.device(device)


def set_cpu_threads(device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("WSYNC_TORCH_THREADS", "1"))))


def load_causal_lm(model: str, dtype: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype]).to(device)
    lm.eval()
    return lm, tokenizer


@torch.inference_mode()
def greedy_generate(lm, tokenizer, prompts: Sequence[str], max_new_tokens: int, device: torch.device) -> list[dict]:
    """Greedy decoding, one prompt at a time (as vLLM's reference example does on the trainer)."""
    out = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        gen = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)
        new_ids = gen[0, inputs["input_ids"].shape[1]:].tolist()
        out.append({"token_ids": new_ids, "text": tokenizer.decode(new_ids, skip_special_tokens=False)})
    return out


def named_params(lm) -> dict[str, torch.Tensor]:
    """Parameters by name; tied weights appear once (under their first name), as in vLLM's example."""
    return {name: p for name, p in lm.named_parameters()}
