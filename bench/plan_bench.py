"""Sparse build-step micro-bench (no process group): plan_sparse + encode of every patch of a real delta.

    python bench/plan_bench.py                       # Qwen2.5-0.5B shapes, 290 bf16 tensors (~942 MiB), CPU
    python bench/plan_bench.py --scale 0.1 --iters 5 # first dim of every tensor scaled by 0.1
    python bench/plan_bench.py --device cuda --densities 0.01 --encodings auto

Per density (a real delta: Bernoulli(density) low-mantissa flips, diffed bit-exactly by
`wsync.transfer.delta.diff_patches`, so indices are int32 and ascending) and encoding, the best (min) of
--iters of:
  plan    plan_sparse(patches, specs, encoding, params)
  enc     `encode` of every packed patch into one stream, one call per patch (the pre-batched loop)
  stream  sparse.pack_stream (what send_sparse broadcasts, and bench/proto.build_sparse builds): the
          whole packed stream at once
  build   plan + stream (the sender's build step as send_sparse runs it)
  decode  the receiver's decode of that stream (sparse._decode_stream when present, else per-meta decode)
  apply   apply_patches of the decoded patches into a copy of the old weights
Every iteration wraps the patches in fresh SparsePatch objects with cloned indices, so nothing
cached by an earlier iteration's plan is reused; `enc` and `stream` follow that iteration's plan (as
the sync does). --ops also counts, for one build, the aten ops that launch kernels and the host
syncs a GPU would take (a CPU-side proxy: this bench cannot time a GPU), with the batch sizes a GPU
uses; note that on CPU the decode uses torch.nonzero (counted as a sync) where a GPU uses
nonzero_static (no sync).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if importlib.util.find_spec("wsync") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))

import torch  # noqa: E402

from bench.proto import mutate  # noqa: E402
from bench.shapes import get_shape, hf_metas, make_weights  # noqa: E402
from wsync.transfer import sparse  # noqa: E402
from wsync.transfer.delta import diff_patches  # noqa: E402
from wsync.transfer.encodings import FLAT, SparsePatch, decode, encode  # noqa: E402
from wsync.transfer.meta import TensorMeta  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(fn, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000.0, out


def scaled_metas(shape: str, scale: float) -> list[TensorMeta]:
    metas = hf_metas(get_shape(shape))
    if scale == 1.0:
        return metas
    return [TensorMeta(m.name, m.dtype, [max(1, round(m.shape[0] * scale))] + m.shape[1:]) for m in metas]


def encode_each(patches, metas, params, device: torch.device) -> torch.Tensor:
    """The per-patch build loop (bench/proto.build_sparse's before pack_stream): one `encode` per packed
    patch, copied into the stream at its offset."""
    by_name = {p.name: p for p in patches}
    offsets, total = sparse.stream_layout(metas)
    stream = torch.zeros(total, dtype=torch.uint8, device=device)
    for meta, off in zip([m for m in metas if m.encoding != FLAT], offsets):
        stream[off:off + meta.nbytes].copy_(encode(by_name[meta.name], meta, params.get(meta.name)))
    return stream


def decode_stream(metas, stream: torch.Tensor) -> list[SparsePatch]:
    fast = getattr(sparse, "_decode_stream", None)
    if fast is not None:
        return fast(metas, stream)
    offsets, _ = sparse.stream_layout(metas)
    packed = [m for m in metas if m.encoding != FLAT]
    return [decode(m, stream[o:o + m.nbytes]) for m, o in zip(packed, offsets)]


_SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2")
# ops that launch no kernel (views, metadata, allocation): left out of the launch count
_NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select", "aten::as_strided",
    "aten::detach", "aten::alias", "aten::t", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::split",
    "aten::split_with_sizes", "aten::narrow", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::resize_", "aten::lift_fresh", "aten::result_type", "aten::contiguous", "aten::to", "aten::_to_copy",
    "aten::view_as", "aten::unbind", "aten::chunk", "aten::set_", "aten::is_nonzero", "aten::item",
    "aten::tensor_split", "aten::_unsafe_view", "aten::flatten", "aten::pin_memory", "aten::_pin_memory",
    "aten::is_pinned", "aten::numpy_T", "aten::expand_as", "aten::broadcast_tensors", "aten::clone",
}


def count_ops(fn) -> tuple[int, int]:
    """(kernel-launching aten ops, host syncs on a GPU: item/bool/int/tolist/nonzero...) of one call of
    `fn`, counted on whatever device: a proxy for a GPU's launch and sync counts. Launching ops are the
    innermost aten ops that are not views/allocations (a copy or clone counts through its aten::copy_)."""
    from torch.profiler import ProfilerActivity, profile

    from wsync.transfer.encodings import common as enc_common

    # batch as on a GPU (CPU batches are smaller, to dodge page faults; see encodings.common.kernel_budget)
    as_gpu = {"CHUNK_CPU": "CHUNK_DEVICE", "BITS_CHUNK_CPU": "BITS_CHUNK_DEVICE"}
    budgets = {k: getattr(enc_common, k) for k in as_gpu}
    for k in budgets:
        setattr(enc_common, k, getattr(enc_common, as_gpu[k]))
    tolists = [0]
    orig = torch.Tensor.tolist

    def counting_tolist(self, *a, **k):
        tolists[0] += 1
        return orig(self, *a, **k)

    torch.Tensor.tolist = counting_tolist
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.Tensor.tolist = orig
        for k, v in budgets.items():
            setattr(enc_common, k, v)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    leaves = sum(1 for e in events if e.name not in _NO_KERNEL
                 and not any(c.name.startswith("aten::") and c.name not in _NO_KERNEL for c in e.cpu_children))
    syncs = sum(1 for e in events if e.name in _SYNC_OPS
                and not (e.cpu_parent is not None and e.cpu_parent.name in _SYNC_OPS)) + tolists[0]
    return leaves, syncs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--scale", type=float, default=1.0, help="scale every tensor's first dim (default 1)")
    ap.add_argument("--densities", default="0.001,0.01,0.03")
    ap.add_argument("--encodings", default="flat_int32,gap8,auto")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument("--ops", action="store_true", help="also count aten ops and host syncs of one build")
    ap.add_argument("--no-check", action="store_true", help="skip the bit-exact check of decode + apply")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    metas_t = scaled_metas(args.shape, args.scale)
    specs = {m.name: m for m in metas_t}
    t0 = time.perf_counter()
    synced = make_weights(metas_t, device, args.seed)
    nbytes = sum(m.nbytes for m in metas_t)
    print(f"# {args.shape} x{args.scale}: {len(metas_t)} tensors, {nbytes / 2**20:.0f} MiB on {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(weights in {time.perf_counter() - t0:.1f} s)")
    print(f"{'density':>8} {'encoding':>10} {'changed':>10} {'plan':>8} {'enc':>8} {'stream':>8} {'build':>8} "
          f"{'decode':>8} {'apply':>8} {'B/elem':>7}  encodings")
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    with torch.no_grad():
        for density in [float(d) for d in args.densities.split(",")]:
            current = {n: t.clone() for n, t in synced.items()}
            changed = mutate(current, density, gen)
            patches = diff_patches(current, synced)
            for enc in args.encodings.split(","):
                rows: dict[str, list[float]] = {k: [] for k in ("plan", "enc", "stream", "decode", "apply")}
                for it in range(args.iters + 1):  # +1 warm-up
                    fresh = [SparsePatch(p.name, p.indices.clone(), p.values) for p in patches]
                    t_plan, metas = _ms(lambda: sparse.plan_sparse(fresh, specs, enc, current), device)
                    t_enc, s1 = _ms(lambda: encode_each(fresh, metas, current, device), device)
                    fresh = [SparsePatch(p.name, p.indices.clone(), p.values) for p in patches]
                    metas2 = sparse.plan_sparse(fresh, specs, enc, current)
                    t_stream, s2 = _ms(lambda: sparse.pack_stream(fresh, metas2, current, device), device)
                    t_dec, back = _ms(lambda: decode_stream(metas, s2), device)
                    target = {n: synced[n].clone() for n in {m.name for m in metas if m.encoding != FLAT}}
                    t_apply, _ = _ms(lambda: sparse.apply_patches(target, back), device)
                    if it == 0:
                        assert torch.equal(s1, s2), "per-patch encode and pack_stream differ"
                        if not args.no_check:
                            for name, t in target.items():
                                want = current[name].view(-1).view(torch.int16)
                                assert torch.equal(t.view(-1).view(torch.int16), want), name
                        continue
                    for k, v in zip(rows, (t_plan, t_enc, t_stream, t_dec, t_apply)):
                        rows[k].append(v)
                med = {k: min(v) for k, v in rows.items()}
                ops = ""
                if args.ops:
                    f1 = [SparsePatch(p.name, p.indices.clone(), p.values) for p in patches]
                    f2 = [SparsePatch(p.name, p.indices.clone(), p.values) for p in patches]

                    def build():
                        m = sparse.plan_sparse(f1, specs, enc, current)
                        sparse.pack_stream(f1, m, current, device)

                    def build_each():
                        encode_each(f2, sparse.plan_sparse(f2, specs, enc, current), current, device)
                    (lb, sb), (le, se) = count_ops(build), count_ops(build_each)
                    (ld, sd) = count_ops(lambda: decode_stream(metas, s2))
                    ops = (f"  [ops/syncs: build {lb}/{sb}, plan+encode-each {le}/{se}, decode {ld}/{sd}]")
                wire = sum(m.nbytes for m in metas if m.encoding == FLAT) + sparse.stream_layout(metas)[1]
                counts: dict[str, int] = {}
                for m in metas:
                    counts[m.encoding] = counts.get(m.encoding, 0) + 1
                print(f"{density:>8g} {enc:>10} {changed:>10} {med['plan']:>8.1f} {med['enc']:>8.1f} "
                      f"{med['stream']:>8.1f} {med['plan'] + med['stream']:>8.1f} {med['decode']:>8.1f} "
                      f"{med['apply']:>8.1f} {wire / max(changed, 1):>7.3f}  "
                      + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ops, flush=True)
            current = patches = None  # free before the next density
    print("# ms, best of --iters after one warm-up (min: other work on the machine only adds); "
          "build = plan + stream (send_sparse's build step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
