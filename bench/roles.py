"""The two bench processes. The sender (rank 0, GPU0) runs sections when the driver says so and
drives the receiver (rank 1, GPU1) over a direct pipe; the receiver serves commands until told to
exit. Each sees one GPU (CUDA_VISIBLE_DEVICES), so a vLLM engine in the receiver uses cuda:0 = GPU1."""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

from .proto import CheckError, Peer


def _setup_process(cfg: dict, gpu: str | None) -> Any:
    if cfg["device"] == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (shared hosts)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if cfg["device"] == "cuda":
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    torch.set_num_threads(max(1, int(cfg.get("cpu_threads", 1))))
    return torch.device("cpu")


def _sections() -> dict:
    from .core import SENDER_SECTIONS
    from .vllm_bench import VLLM_SENDER_SECTIONS

    return {**SENDER_SECTIONS, **VLLM_SENDER_SECTIONS}


def _handlers() -> dict:
    from .core import RECEIVER_HANDLERS
    from .vllm_bench import VLLM_RECEIVER_HANDLERS

    return {**RECEIVER_HANDLERS, **VLLM_RECEIVER_HANDLERS}


def _run_section(ctx: Any, fn: Any) -> dict:
    t0, before = time.perf_counter(), ctx.verified
    try:
        res = fn(ctx)
    except CheckError as exc:
        res = {"error": str(exc), "check_failed": True}
    except BaseException as exc:  # noqa: BLE001 - recorded, the driver decides what happens next
        res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
    if not isinstance(res, dict):
        res = {"value": res}
    res["unclean"] = bool(ctx.in_step)
    res["wall_s"] = time.perf_counter() - t0
    res["verified_in_section"] = ctx.verified - before
    return res


def _hard_exit_if_asked(ctx: Any) -> None:
    """After close_vllm: leave now (the OS frees the GPU), without vLLM's or NCCL's teardown."""
    if ctx.extra.get("hard_exit"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def sender_main(driver_conn, peer_conn, cfg: dict) -> None:
    device = _setup_process(cfg, cfg.get("sender_gpu"))
    from .core import Ctx

    ctx = Ctx(cfg, Peer(peer_conn, cfg["peer_timeout_s"]), device)
    sections = _sections()
    try:
        while True:
            msg = driver_conn.recv()
            if msg[0] != "run":
                break
            fn = sections.get(msg[1])
            res = {"error": f"unknown section {msg[1]!r}"} if fn is None else _run_section(ctx, fn)
            driver_conn.send(("section", msg[1], res))
            if res.get("unclean"):
                break
    except EOFError:
        pass
    finally:
        try:
            ctx.peer.send("exit")
        except Exception:  # noqa: BLE001 - the receiver may be gone
            pass
        _hard_exit_if_asked(ctx)
        for g in {id(g): g for g in (ctx.group, ctx.data) if g is not None}.values():
            g.close()


def receiver_main(peer_conn, cfg: dict) -> None:
    device = _setup_process(cfg, cfg.get("receiver_gpu"))
    from .core import Ctx

    rx = Ctx(cfg, Peer(peer_conn, cfg["peer_timeout_s"]), device)
    handlers = _handlers()
    try:
        while True:
            try:
                msg = peer_conn.recv()
            except EOFError:
                break
            if msg[0] == "exit":
                break
            if msg[0] != "cmd":
                continue  # a leftover of an aborted step
            _, name, kwargs = msg
            try:
                rx.peer.send("done", handlers[name](rx, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - reported to the sender, keep serving
                rx.peer.error(exc)
    finally:
        _hard_exit_if_asked(rx)
        engine = rx.extra.get("engine")
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001
                pass
        for g in {id(g): g for g in (rx.group, rx.data) if g is not None}.values():
            g.close()
