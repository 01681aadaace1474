"""Model shapes (Qwen2-family, random weights), HF checkpoint names/order, vLLM's fused runtime layout
as the bench derives it independently of the engine (for checks and runtime-coordinate patches), and
the generated HF folder a vLLM engine starts from."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wsync.transfer.encodings import SparsePatch
from wsync.transfer.meta import TensorMeta


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    max_pos: int = 32768
    rope_theta: float = 1000000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {s.name: s for s in (
    Shape("tiny", 256, 4, 4, 2, 768, 8192, True, 1024, 10000.0),  # wsync's embedded model
    Shape("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, True),
    Shape("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, True),
    Shape("qwen2.5-3b", 2048, 36, 16, 2, 11008, 151936, True),
    Shape("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False),
)}

# HF leaf module -> (vLLM fused module, shard index); shards are stacked along dim 0 in this order.
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def get_shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None


def hf_param_shapes(s: Shape) -> list[tuple[str, list[int]]]:
    """Every stored parameter of Qwen2ForCausalLM, in transformers' named_parameters order."""
    h, q, kv, ff = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [s.vocab, h])]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", [q, h]), (p + "self_attn.q_proj.bias", [q]),
                (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.k_proj.bias", [kv]),
                (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.v_proj.bias", [kv]),
                (p + "self_attn.o_proj.weight", [h, q]),
                (p + "mlp.gate_proj.weight", [ff, h]), (p + "mlp.up_proj.weight", [ff, h]),
                (p + "mlp.down_proj.weight", [h, ff]),
                (p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h])]
    out.append(("model.norm.weight", [h]))
    if not s.tied:
        out.append(("lm_head.weight", [s.vocab, h]))
    return out


def hf_metas(s: Shape, dtype: str = "bfloat16") -> list[TensorMeta]:
    return [TensorMeta(n, dtype, shape) for n, shape in hf_param_shapes(s)]


def total_bytes(metas: Iterable[TensorMeta]) -> int:
    return sum(m.nbytes for m in metas)


def make_weights(metas: list[TensorMeta], device: torch.device, seed: int,
                 std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights on `device` (norm weights 1.0), in metas order."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for m in metas:
        if m.name.endswith("norm.weight"):
            out[m.name] = torch.ones(m.shape, dtype=m.torch_dtype, device=device)
        else:
            t = torch.randn(m.shape, generator=gen, device=device, dtype=torch.float32).mul_(std)
            out[m.name] = t.to(m.torch_dtype)
    return out


# ---- vLLM runtime layout (derived from names and HF shapes only) -------------------------------
def runtime_layout(metas: list[TensorMeta], tied: bool) -> dict[str, list[tuple[str, int, int]]]:
    """{runtime name: [(hf name, first row, rows), ...]} in shard order; a tied lm_head is dropped."""
    shards: dict[str, list[tuple[int, str, int]]] = {}
    for m in metas:
        if tied and m.name.startswith("lm_head."):
            continue
        parts = m.name.split(".")
        fused = FUSED.get(parts[-2]) if len(parts) >= 2 else None
        rt = ".".join(parts[:-2] + [fused[0], parts[-1]]) if fused else m.name
        shards.setdefault(rt, []).append((fused[1] if fused else 0, m.name, m.shape[0] if m.shape else 1))
    layout = {}
    for rt, parts in shards.items():
        first, rows = 0, []
        for _, name, n in sorted(parts):
            rows.append((name, first, n))
            first += n
        layout[rt] = rows
    return layout


def runtime_shapes(layout: dict, metas: list[TensorMeta]) -> dict[str, list[int]]:
    by_name = {m.name: m for m in metas}
    out = {}
    for rt, parts in layout.items():
        shape = list(by_name[parts[0][0]].shape)
        if shape:
            shape[0] = sum(n for _, _, n in parts)
        out[rt] = shape
    return out


def fused_tensors(weights: dict[str, torch.Tensor], layout: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(runtime name, tensor as vLLM holds it): fused shards concatenated along dim 0."""
    for rt, parts in layout.items():
        if len(parts) == 1:
            yield rt, weights[parts[0][0]]
        else:
            yield rt, torch.cat([weights[name] for name, _, _ in parts], dim=0)


def runtime_patches(patches: list[SparsePatch], layout: dict, shapes: dict[str, list[int]]) -> list[SparsePatch]:
    """HF-coordinate patches -> one patch per runtime parameter (flat runtime indices, ascending)."""
    where = {name: (rt, first) for rt, parts in layout.items() for name, first, _ in parts}
    merged: dict[str, list[tuple[int, SparsePatch]]] = {}
    for p in patches:
        rt, first = where[p.name]
        merged.setdefault(rt, []).append((first, p))
    out = []
    for rt, items in merged.items():
        shape = shapes[rt]
        row = 1
        for d in shape[1:]:
            row *= d
        items.sort(key=lambda x: x[0])
        idx = torch.cat([p.indices + first * row for first, p in items]).to(torch.int32)
        out.append(SparsePatch(rt, idx, torch.cat([p.values for _, p in items])))
    return out


# ---- generated HF folder (config + random safetensors + the tiny model's tokenizer) ------------
def hf_config(s: Shape, tokenizer_dir: Path) -> dict:
    cfg = json.loads((tokenizer_dir / "config.json").read_text())
    cfg.update({
        "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "num_hidden_layers": s.layers, "vocab_size": s.vocab,
        "head_dim": s.head_dim, "tie_word_embeddings": s.tied, "max_position_embeddings": s.max_pos,
        "max_window_layers": s.layers, "layer_types": ["full_attention"] * s.layers,
        "rope_theta": s.rope_theta, "rope_parameters": {"rope_theta": s.rope_theta, "rope_type": "default"},
        "wsync_bench_shape": asdict(s),
    })
    return cfg


def tokenizer_size(tokenizer_dir: Path) -> int:
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    return len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))


def write_hf_folder(s: Shape, dest: Path, device: torch.device, seed: int = 1234) -> Path:
    """A loadable HF folder of shape `s` with random bf16 weights (reused when already complete)."""
    from safetensors.torch import save_file

    from wsync.models.tiny import ensure_default_model

    tiny = Path(ensure_default_model())
    if s.vocab < tokenizer_size(tiny):
        raise ValueError(f"{s.name}: vocab {s.vocab} < tokenizer size {tokenizer_size(tiny)}")
    cfg = hf_config(s, tiny)
    dest.mkdir(parents=True, exist_ok=True)
    done = dest / ".complete"
    if done.exists() and json.loads((dest / "config.json").read_text()) == cfg:
        return dest
    done.unlink(missing_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(tiny / f, dest / f)
    weights = make_weights(hf_metas(s), device, seed)
    save_file({n: t.cpu().contiguous() for n, t in weights.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    done.write_text("ok\n")
    return dest


def build_reference_lm(s: Shape, device: torch.device):
    """transformers Qwen2ForCausalLM of shape `s` on `device` in bf16, storage uninitialized (the first
    dense sync overwrites it): the reference engine's model, as wsync.engines.hf would hold it."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from wsync.models.tiny import ensure_default_model

    cfg = dict(hf_config(s, Path(ensure_default_model())))
    cfg.pop("wsync_bench_shape", None)
    config = Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lm = lm.to_empty(device=device)
    if s.tied:
        lm.tie_weights()
    return lm.eval()
