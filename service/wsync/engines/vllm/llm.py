"""vLLM calls on the engine side (no state): creating and shutting down a `vllm.LLM`, sampling
parameters, the GPU's UUID, and vLLM's own receive sequences for the native route. `engine.py`'s
VLLMEngineCore drives these."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .detect import VLLMApi, _vllm, check_packed
from .payloads import dense_update_info, sparse_update_info


# ---- vLLM calls on the engine side ------------------------------------------------------------
def create_llm(model: str, **kwargs):
    return _vllm("vllm").LLM(model=model, **kwargs)


def greedy_params(max_tokens: int):  # temperature 0 = greedy
    return _vllm("vllm").SamplingParams(temperature=0.0, max_tokens=int(max_tokens))


def sampling_params(n: int, max_tokens: int, temperature: float, top_k: int, seed: int):
    """n completions of exactly ``max_tokens`` tokens each, with the sampled token's logprob."""
    return _vllm("vllm").SamplingParams(n=int(n), temperature=float(temperature), top_k=int(top_k) or -1,
                                        seed=int(seed), max_tokens=int(max_tokens), min_tokens=int(max_tokens),
                                        ignore_eos=True, logprobs=0)


def shutdown_llm(llm) -> None:
    getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", lambda: None)()
    with contextlib.suppress(Exception):
        ps = _vllm("vllm.distributed.parallel_state")
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


def gpu_uuid() -> str | None:
    """"GPU-<uuid>" of the GPU this process computes on (cuda:0: Ray's CUDA_VISIBLE_DEVICES), None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def native_recv_dense(api: VLLMApi, llm, metas: list, packed: bool, plan: dict) -> None:
    if plan["dense"] == "extension":  # e.g. a dense reseed of a 'sparse_nccl' engine (Gen B-D)
        if packed:
            check_packed(api, plan)
        llm.collective_rpc("wsync_recv_dense", kwargs=dense_update_info(metas))
        return
    _start(api, llm, checkpoint_format=True)
    _update(llm, dense_update_info(metas, packed, api))


def native_recv_sparse(api: VLLMApi, llm, metas: list, plan: dict) -> None:
    if not metas:
        return  # nothing is broadcast for an empty patch set (vLLM rejects an empty num_updates_list)
    if plan["sparse"] == "extension":
        llm.collective_rpc("wsync_recv_sparse", kwargs=sparse_update_info(metas))
        return
    _start(api, llm, checkpoint_format=False)
    _update(llm, sparse_update_info(metas, api))


def _start(api: VLLMApi, llm, checkpoint_format: bool) -> None:
    if api.start_takes_checkpoint_format:  # Gen A
        llm.start_weight_update(is_checkpoint_format=checkpoint_format)
    else:
        llm.start_weight_update()


def _update(llm, update_info: dict) -> None:
    """update_weights, then finish. When update_weights raises, the 0.24 worker has already closed the
    session (calling finish would raise a second, misleading error), so finish only on success."""
    llm.update_weights({"update_info": update_info})
    llm.finish_weight_update()


def _default_max_len(model: str, wanted: int | None) -> int:
    """options["max_model_len"], else min(1024, the model's max_position_embeddings) for a local folder."""
    if wanted:
        return int(wanted)
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
        return min(1024, int(cfg.get("max_position_embeddings") or 1024))
    except (OSError, ValueError, TypeError):
        return 1024


def _as_dict(m) -> dict:
    return m.to_dict() if hasattr(m, "to_dict") else dict(m)
