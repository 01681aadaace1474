"""wsync.engines.vllm against a real vLLM on 2 GPUs (skipped elsewhere): a trainer actor (transformers,
GPU 0) syncs into a VLLMEngineCore actor (GPU 1) over vLLM's own NCCL helpers, dense then sparse, once
into an engine receiving through vLLM's engine and once into one started with native_via_extension
(the worker extension's receive), and every runtime tensor is checked by exact fingerprint against the
trainer's (q/k/v and gate/up concatenated the way vLLM fuses them)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2 or importlib.util.find_spec("vllm") is None, reason="needs 2 CUDA GPUs and vLLM")]

PROMPTS = ["The quick brown fox", "Beautiful is better than", "Hello, my name is", "In the face of ambiguity"]


class TrainerSide:
    """A minimal trainer: HF model on its GPU, vLLM's trainer helpers through the adapter."""

    def __init__(self, model: str):
        from transformers import AutoModelForCausalLM

        from wsync.engines import vllm as va

        self.va, self.api = va, va.detect_generation()
        self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to("cuda:0").eval()
        self.params = dict(self.lm.named_parameters())
        self.group, self.patches = None, []

    def api_info(self) -> dict:
        return dataclasses.asdict(self.api)

    def rendezvous(self) -> tuple[str, int]:
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def open(self, host: str, port: int, world_size: int) -> None:
        self.group = self.va.trainer_open_group(self.api, host, port, world_size)

    def close(self) -> None:
        self.va.trainer_close_group(self.group)

    def metas(self) -> list[dict]:
        from wsync.transfer.meta import TensorMeta

        return [TensorMeta.of(n, p) for n, p in self.params.items()]

    @torch.no_grad()
    def perturb(self, seed: int) -> None:
        g = torch.Generator(device="cuda:0").manual_seed(seed)
        for p in self.params.values():
            p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype) * 0.01)

    @torch.no_grad()
    def make_patch(self, rows: int, shift: int) -> list:
        """Rotate `rows` embedding rows (as vLLM's example does), keep the flat int32 patch."""
        emb = self.params["model.embed_tokens.weight"]
        row_ids = torch.arange(shift, shift + rows, device=emb.device)
        emb[row_ids] = emb[row_ids].roll(1, dims=0)
        idx = (row_ids[:, None] * emb.shape[1] + torch.arange(emb.shape[1], device=emb.device)).reshape(-1)
        self.patches = [dataclasses.make_dataclass("P", ["name", "indices", "values"])(
            "model.embed_tokens.weight", idx.to(torch.int32), emb[row_ids].reshape(-1).contiguous())]
        from wsync.transfer.sparse import SparseMeta

        return [SparseMeta(p.name, "bfloat16", list(emb.shape), p.indices.numel(), "flat_int32", p.indices.numel() * 6)
                for p in self.patches]

    def send_dense(self) -> float:
        return self.va.trainer_send_dense(self.api, self.group, list(self.params.items()))

    def send_sparse(self) -> float:
        return self.va.trainer_send_sparse(self.api, self.group, self.patches)

    def runtime_fingerprints(self) -> dict[str, str]:
        """The trainer's weights in vLLM's runtime layout: qkv_proj = cat(q, k, v), gate_up = cat(gate, up)."""
        from wsync.transfer.fingerprint import fingerprint

        fused, out = {}, {}
        for name, p in self.params.items():
            m = re.match(r"(.*)\.(self_attn\.[qkv]|mlp\.gate|mlp\.up)_proj\.(weight|bias)$", name)
            if m is None:
                out[name] = p
                continue
            kind = "self_attn.qkv_proj" if "self_attn" in m.group(2) else "mlp.gate_up_proj"
            fused.setdefault(f"{m.group(1)}.{kind}.{m.group(3)}", {})[m.group(2)] = p
        order = ["self_attn.q", "self_attn.k", "self_attn.v", "mlp.gate", "mlp.up"]
        for name, parts in fused.items():
            out[name] = torch.cat([parts[k] for k in order if k in parts])
        return fingerprint(out.items())


def test_vllm_dense_and_sparse_roundtrip(tmp_path):
    import ray

    from wsync.engines.contract import DenseUpdate, SparseUpdate
    from wsync.engines.vllm.engine import VLLMEngineCore
    from wsync.models.tiny import build_tiny_model

    model = str(build_tiny_model(tmp_path / "tiny"))
    src = str(Path(__file__).resolve().parents[2] / "service")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        trainer = ray.remote(num_gpus=1)(TrainerSide).remote(model)
        api = ray.get(trainer.api_info.remote())
        metas = ray.get(trainer.metas.remote())
        timings = {}
        for i, (label, extra) in enumerate((("vllm", {}), ("extension", {"native_via_extension": True}))):
            engine = ray.remote(num_gpus=1)(VLLMEngineCore).remote(
                model, "cuda", {"gpu_memory_utilization": 0.3, "enforce_eager": True, **extra})
            ready = ray.get(engine.ready.remote())
            print("api", api, "\nready", ready)
            assert ready.extra["generation"] == api["generation"] and ready.kind == "vllm"
            assert ready.transports == ["vllm_native"] and (ready.gpu_uuid or "").startswith("GPU-")
            assert extra or ready.extra["receive"]["sparse"] == "native"
            before = ray.get(engine.generate.remote(PROMPTS, 4))
            runtime = {m.name for m in ray.get(engine.param_metas.remote())}
            assert "model.layers.0.self_attn.qkv_proj.weight" in runtime
            assert "model.layers.0.self_attn.q_proj.weight" not in runtime
            assert ray.get(engine.fingerprint.remote(None)) == ray.get(trainer.runtime_fingerprints.remote())

            host, port = ray.get(trainer.rendezvous.remote())
            rdv = {"host": host, "port": port, "world_size": 2, "backend": "nccl", "name": f"gpu-test-{i}"}
            ray.get(engine.pause.remote())
            ray.get([trainer.open.remote(host, port, 2), engine.join_group.remote(rdv, 1, "vllm_native")])
            ray.get(trainer.perturb.remote(i))
            t0 = time.perf_counter()
            send_ms, recv = ray.get([trainer.send_dense.remote(),
                                     engine.recv_dense.remote(DenseUpdate(metas, bucket_bytes=1 << 26))])
            timings[f"dense_{label}"] = (send_ms, recv.recv_ms, (time.perf_counter() - t0) * 1e3)
            assert ray.get(engine.fingerprint.remote(None)) == ray.get(trainer.runtime_fingerprints.remote()), label
            pm = ray.get(trainer.make_patch.remote(32, 100 + 40 * i))
            send_ms, recv = ray.get([trainer.send_sparse.remote(), engine.recv_sparse.remote(SparseUpdate(pm))])
            timings[f"sparse_{label}"] = (send_ms, recv.recv_ms, recv.bytes)
            assert ray.get(engine.fingerprint.remote(None)) == ray.get(trainer.runtime_fingerprints.remote()), label
            ray.get(engine.resume.remote())
            after = ray.get(engine.generate.remote(PROMPTS, 4))
            print("before", before, "\nafter", after)
            assert all(len(g["token_ids"]) == 4 for g in after)
            ray.get([trainer.close.remote(), engine.leave_group.remote()])
            ray.get(engine.shutdown.remote())
            ray.kill(engine)
        print("timings (send_ms, recv_ms, wall_ms|bytes):", timings)
    finally:
        ray.shutdown()
