"""A small GRPO-style RL loop whose trainer is YOUR process, publishing to an engine after every step.

The engine samples rollouts (with logprobs) from the prompts; a verifiable toy reward scores them
(1 when the completion's first token continues the prompt's last word, i.e. decodes WITHOUT a
leading space: rare at first, so the reward has room to rise); the trainer
computes the policy-gradient loss with group-normalized advantages, steps its own AdamW, and publishes
its weights (auto: sparse where cheaper, dense otherwise). Right after each sync the engine and the
trainer score the step's sampled tokens again: with the reference engine the difference is exactly 0.

    python examples/rl_loop.py --steps 8 --out r.json            # embedded tiny Qwen2, CPU
    python examples/rl_loop.py --model /path/to/hf/folder --steps 20
    python examples/rl_loop.py --url http://127.0.0.1:8321        # a running service (its engines)

Default (service mode): a wsync service is started as a child process (wsync_client.local.LocalServer;
--url uses a running one instead), it launches reference engines (--engine-kind vllm on a GPU), and this
process is the trainer: wsync_client.publisher.Publisher registers the model and publishes after every
step (the service pauses the engines, has them join this process's group, verifies, records the sync).
Rollouts come from the engine through the service (POST /v1/engines/{id}/sample), stamped with the
version that produced them. The logprob difference is measured on the rollouts sampled right after each
sync: the engine's logprobs against this process's (same [n, L] batch, same kernels).

--local: the example itself hosts the engine (wsync's ReferenceEngineCore, in process) and the
publisher core sends to it over a real gloo group, exactly the wire the service's engines receive.

--out FILE writes JSON: steps, rewards (mean per step), logprob_max_abs_diff (per step),
syncs (per step: mode, wire_bytes, total_ms, verified), plus versions and fallbacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for sub in ("service", "clients"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

from wsync.engines.contract import DenseUpdate, SparseUpdate
from wsync.engines.hf import load_causal_lm
from wsync.engines.reference import ReferenceEngineCore
from wsync.engines.sampling import sample, sequence_logprobs
from wsync.models import resolve_model
from wsync.publish import Plan, Publisher
from wsync.transfer.group import Rendezvous, free_port, open_group
from wsync.transfer.meta import TensorMeta
from wsync_client import Client
from wsync_client._core import APICall
from wsync_client.local import LocalServer
from wsync_client.publisher import Publisher as ServicePublisher

PROMPTS = ["The cat sat on the", "Beautiful is better than", "Simple is better", "In the face of ambiguity",
           "Now is better than never", "Errors should never pass", "Flat is better than", "Readability"]


def reward(tokenizer, token_ids: list[int]) -> float:
    """Verifiable: 1 when the completion's first token continues the word (decodes without a leading space)."""
    text = tokenizer.decode(token_ids[:1])
    return 1.0 if text and not text[0].isspace() else 0.0


class LocalEngine:
    """An in-process reference engine on the other end of a real gloo group (rank 1)."""

    def __init__(self, model: str, dtype: str, rdv: Rendezvous) -> None:
        self.core = ReferenceEngineCore(model, "cpu", {"dtype": dtype})
        self.version: str | None = None
        self.pool = ThreadPoolExecutor(1)
        self.rdv = rdv
        self.pending = None

    def join(self):
        return self.pool.submit(self.core.join_group, self.rdv.to_dict(), 1, "gloo", 60.0)

    def metas(self) -> list[TensorMeta]:
        return list(self.core.param_metas())

    def announce(self, plan: Plan) -> None:
        """What the service does on POST publish: pause, post the receive for this plan."""
        self.core.pause()
        self.version = None  # unknown until verified
        if plan.mode == "dense":
            upd = DenseUpdate(metas=plan.dense_metas, bucket_bytes=plan.bucket_bytes)
            self.pending = self.pool.submit(self.core.recv_dense, upd)
        else:
            self.pending = self.pool.submit(self.core.recv_sparse, SparseUpdate(metas=list(plan.sparse_metas or [])))

    def finish(self, version: str, fingerprints: dict[str, str]) -> bool:
        """Wait for the receive, verify against the publisher's fingerprints, resume; True when verified."""
        self.pending.result(timeout=300)
        ok = self.core.fingerprint(list(fingerprints)) == fingerprints
        self.version = version if ok else None
        self.core.resume()
        return ok


def train_step(lm, opt, tok, rollouts: list[dict]) -> tuple[list[float], torch.Tensor]:
    """One GRPO-style step on ``rollouts`` (group-normalized advantages per prompt); returns rewards, loss."""
    lm.train()
    opt.zero_grad(set_to_none=True)
    rewards, loss = [], torch.zeros(())
    for r in rollouts:
        rs = torch.tensor([reward(tok, t) for t in r["token_ids"]])
        rewards += rs.tolist()
        adv = (rs - rs.mean()) / (rs.std() + 1e-4)
        ids = torch.tensor([r["prompt_ids"] + t for t in r["token_ids"]])
        lp = sequence_logprobs(lm, ids, len(r["prompt_ids"]))
        loss = loss + -(adv.unsqueeze(1) * lp).sum(1).mean() / len(rollouts)
    loss.backward()
    opt.step()
    lm.eval()
    return rewards, loss.detach()


@torch.no_grad()
def logprob_diff(lm, rollouts: list[dict]) -> float:
    """max |this process's logprob - the engine's| over the sampled tokens (same [n, L] batch per prompt,
    one torch thread like the engine actors, so equal weights give equal numbers on CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("WSYNC_TORCH_THREADS", "1")))
    try:
        diff = 0.0
        for r in rollouts:
            ids = torch.tensor([r["prompt_ids"] + t for t in r["token_ids"]])
            mine = sequence_logprobs(lm, ids, len(r["prompt_ids"]))
            diff = max(diff, float((mine - torch.tensor(r["logprobs"], dtype=mine.dtype)).abs().max()))
        return diff
    finally:
        torch.set_num_threads(threads)


def run_service(args) -> dict:
    """The trainer is this process; engines, versions, syncs and rollouts go through a wsync service."""
    torch.manual_seed(args.seed)
    model_path = resolve_model(args.model)
    lm, tok = load_causal_lm(model_path, args.dtype, torch.device("cpu"))
    lm.eval()
    opt = torch.optim.AdamW(lm.parameters(), lr=args.lr, weight_decay=0.0)
    prompts = PROMPTS[:args.prompts]
    out = {"steps": [], "rewards": [], "logprob_max_abs_diff": [], "syncs": [], "versions": [], "fallbacks": []}
    server = LocalServer() if args.url is None else None
    if server is not None:
        server.__enter__()
    try:
        with Client(args.url or server.url) as c:
            engine = c.engines.launch(args.engine_kind, model=model_path, dtype=args.dtype,
                                      **({"sync_route": "direct"} if args.engine_kind == "vllm" else {}))
            eid = engine.id

            def rollouts(step: int) -> tuple[list[dict], str | None]:
                body = {"prompts": prompts, "n": args.group, "max_new_tokens": args.max_new_tokens,
                        "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed * 1000 + step}
                got = c._call(APICall("POST", f"/v1/engines/{eid}/sample", body=body))
                return got["samples"], got["version"]

            try:
                with ServicePublisher(c, lm, name=args.trainer_name, host="127.0.0.1" if args.url is None else None,
                                      bucket_bytes=args.bucket_bytes) as pub:
                    # the engine starts from the checkpoint: publish it once so it serves version 0
                    assert pub.publish("dense", engine_ids=[eid], version=0).verified, "initial sync not verified"
                    batch, stamped = rollouts(1)
                    for step in range(1, args.steps + 1):
                        rewards, loss = train_step(lm, opt, tok, batch)
                        t0 = time.perf_counter()
                        res = pub.publish("auto", engine_ids=[eid], version=step)
                        total_ms = (time.perf_counter() - t0) * 1e3
                        nxt, served = rollouts(step + 1)  # right after the sync, from the new weights
                        diff = logprob_diff(lm, nxt)
                        _record(out, step, rewards, diff, res.report.mode, res.report.stats.wire_bytes, total_ms,
                                res.verified, {"rollouts": stamped, "published": res.report.version, "engine": served},
                                res.report.fallback, loss, args.quiet)
                        batch, stamped = nxt, served
            finally:
                c.engines.delete(eid)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    return out


def _record(out: dict, step: int, rewards: list[float], diff: float, mode: str, wire_bytes: int, total_ms: float,
            verified: bool, versions: dict, fallback: str | None, loss: torch.Tensor, quiet: bool) -> None:
    out["steps"].append(step)
    out["rewards"].append(sum(rewards) / len(rewards))
    out["logprob_max_abs_diff"].append(diff)
    out["syncs"].append({"mode": mode, "wire_bytes": wire_bytes, "total_ms": round(total_ms, 2), "verified": verified})
    out["versions"].append(versions)
    out["fallbacks"].append(fallback)
    if not quiet:
        print(f"step {step}: reward {out['rewards'][-1]:.3f} loss {float(loss):+.4f} sync {mode} {wire_bytes} B "
              f"{total_ms:.0f} ms verified={verified} logprob diff {diff}", flush=True)


def run(args) -> dict:
    """--local: the engine lives in this process (no service)."""
    torch.manual_seed(args.seed)
    model_path = resolve_model(args.model)
    lm, tok = load_causal_lm(model_path, args.dtype, torch.device("cpu"))
    opt = torch.optim.AdamW(lm.parameters(), lr=args.lr, weight_decay=0.0)
    rdv = Rendezvous("127.0.0.1", free_port(), 2, "gloo", "rl-loop")
    engine = LocalEngine(model_path, args.dtype, rdv)
    pub = Publisher(lm, engine_metas=engine.metas(), bucket_bytes=args.bucket_bytes)
    joined = engine.join()
    group = open_group(rdv, 0, "cpu", timeout_s=60.0)
    joined.result(timeout=300)
    prompts = PROMPTS[:args.prompts]
    out = {"steps": [], "rewards": [], "logprob_max_abs_diff": [], "syncs": [], "versions": [], "fallbacks": []}
    # the engines start from the checkpoint: publish it once (dense) so they serve version 0 and the
    # publisher holds its baseline
    first = pub.dense(group, version=0, announce=engine.announce)
    assert engine.finish(first.version, first.fingerprints), "initial sync not verified"
    for step in range(1, args.steps + 1):
        rollouts = sample(engine.core.lm, tok, prompts, args.group, args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, seed=args.seed * 1000 + step)
        stamped = engine.version  # rollouts carry the version the engine served
        rewards, loss = train_step(lm, opt, tok, rollouts)
        t0 = time.perf_counter()
        rep = pub.auto(group, engine.version, version=step, announce=engine.announce)
        verified = engine.finish(rep.version, rep.fingerprints)
        total_ms = (time.perf_counter() - t0) * 1e3
        diff = 0.0
        with torch.no_grad():
            for r in rollouts:
                ids = torch.tensor([r["prompt_ids"] + t for t in r["token_ids"]])
                mine = sequence_logprobs(lm, ids, len(r["prompt_ids"]))
                theirs = sequence_logprobs(engine.core.lm, ids, len(r["prompt_ids"]))
                diff = max(diff, float((mine - theirs).abs().max()))
        _record(out, step, rewards, diff, rep.mode, rep.stats.wire_bytes, total_ms, verified,
                {"rollouts": stamped, "published": rep.version, "engine": engine.version}, rep.fallback, loss,
                args.quiet)
    group.close()
    engine.pool.submit(engine.core.leave_group).result(timeout=60)
    engine.pool.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--model", default=None, help="HF folder (default: the embedded tiny Qwen2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group)")
    p.add_argument("--max-new-tokens", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bucket-bytes", type=int, default=16 << 20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local", action="store_true",
                   help="host the engine in this process (no service); default: through a wsync service")
    p.add_argument("--url", default=None, help="a running wsync service (default: start one as a child process)")
    p.add_argument("--engine-kind", default="reference", choices=["reference", "vllm"])
    p.add_argument("--trainer-name", default="rl-policy", help="the trainer slot this process holds")
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = run(args) if args.local else run_service(args)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
