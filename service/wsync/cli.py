"""`wsync` command line, built on the SDK (`wsync_client`).

Exit codes: 0 ok, 1 comparison verdicts false, 2 error (API, connection, job failed or timed out), 130 ^C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from typing import Callable, Sequence

from wsync import __version__
from wsync.schemas import JobInfo, JobKind
from wsync_client import Client, WsyncError, report_of
from wsync_client._core import DEFAULT_BASE_URL
from wsync_client.errors import APIConnectionError, APIStatusError, InvalidRequestError
from wsync_client.local import READY_TIMEOUT_S, LocalServer, ServerStartError

from .cli_output import _err, _fields, _follow, _job_text, _out, _show, _table
from .report import format_report, passed

ClientFactory = Callable[[str], Client]
_MB = 1024 * 1024




def cmd_serve(args: argparse.Namespace, _: ClientFactory) -> int:
    import uvicorn

    from .api.auth import is_loopback
    from .settings import get_settings

    settings = get_settings()
    host = args.host or settings.host
    if not is_loopback(host) and not settings.api_token:
        _err(f"error: refusing to bind {host} (not loopback) without a token: set WSYNC_API_TOKEN")
        return 2
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found:
    # make that one a clean exit 0 (the default would kill the process by the signal).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run("wsync.api.app:create_app", factory=True, host=host,
                    port=args.port or settings.port, log_level=args.log_level)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _progress(args: argparse.Namespace) -> Callable[[JobInfo], None]:
    """For a long operation answered with a job (launch, load): its new events on stderr as it runs."""
    seen = [0]

    def show(job: JobInfo) -> None:
        if args.json:
            return
        for ev in job.events[seen[0]:]:
            _err(f"[{job.kind.value} {job.state.value}] {ev.get('message', '')}")
        seen[0] = max(seen[0], len(job.events))
    return show


def cmd_engines(args: argparse.Namespace, factory: ClientFactory) -> int:
    with factory(args.url) as c:
        if args.action in (None, "list"):
            page = c.engines.list()
            return _show(args, page, lambda: _table(page.items, ["id", "kind", "state", "version", "device",
                                                                 "syncs", "name", "model"]))
        if args.action == "launch":
            opts = {} if args.gpu_memory_utilization is None else {"gpu_memory_utilization": args.gpu_memory_utilization}
            if args.sync_route:
                opts["sync_route"] = args.sync_route
            if args.dtype:
                opts["dtype"] = args.dtype
            info = c.engines.launch(kind=args.kind, model=args.model, name=args.name, wait=not args.no_wait,
                                    on_poll=_progress(args), **opts)
        elif args.action == "generate":
            res = c.engines.generate(args.id, args.prompts, max_new_tokens=args.max_new_tokens)
            return _show(args, res, lambda: "\n".join(
                f"{g.get('prompt', p)!r} -> {g.get('token_ids')} {g.get('text')!r}"
                for p, g in zip(args.prompts, res.generations)))
        else:
            info = (c.engines.get if args.action == "get" else c.engines.delete)(args.id)
        return _show(args, info, lambda: _fields(info))


def cmd_trainer(args: argparse.Namespace, factory: ClientFactory) -> int:
    with factory(args.url) as c:
        if args.action == "load":
            info = c.trainer.load(model=args.model, dtype=args.dtype, on_poll=_progress(args))
        elif args.action == "reset":
            info = c.trainer.reset()
        elif args.action == "step":
            info = c.trainer.step(optimizer=args.optimizer, lr=args.lr, steps=args.steps)
        else:
            info = c.trainer.get()
        return _show(args, info, lambda: _fields(info, skip=("params",)))


def cmd_patch(args: argparse.Namespace, factory: ClientFactory) -> int:
    fields = {k: getattr(args, k) for k in ("rows", "density", "seed") if getattr(args, k) is not None}
    with factory(args.url) as c:
        info = c.patches.prepare(kind=args.kind, **fields)
        return _show(args, info, lambda: _fields(info, skip=("tensors",)) + "\n\n"
                     + _table(info.tensors, ["name", "dtype", "shape", "count"]))


def _finish(args: argparse.Namespace, c: Client, job: JobInfo) -> int:
    if args.wait or args.follow:
        job = _follow(args, c, job)
        if args.follow and args.json:  # JSON lines: the events, then the job
            _out(job.model_dump_json())
            return 0
    return _show(args, job, lambda: _job_text(job))


def cmd_sync(args: argparse.Namespace, factory: ClientFactory) -> int:
    with factory(args.url) as c:
        if args.mode == "dense":
            job = c.sync.dense(args.engine, bucket_bytes=args.bucket_bytes, verify=not args.no_verify)
        else:
            job = c.sync.sparse(args.engine, patch_id=args.patch, encoding=args.encoding, verify=not args.no_verify,
                                delta=args.delta)
        return _finish(args, c, job)


def cmd_job(args: argparse.Namespace, factory: ClientFactory) -> int:
    with factory(args.url) as c:
        job = c.jobs.cancel(args.id) if args.cancel else c.jobs.get(args.id)
        return _finish(args, c, job)


def cmd_jobs(args: argparse.Namespace, factory: ClientFactory) -> int:
    with factory(args.url) as c:
        page = c.jobs.list(state=args.state, kind=args.kind, limit=args.limit)
        return _show(args, page, lambda: _table(page.items, ["id", "kind", "state", "created_at",
                                                             "finished_at", "error"]))


def cmd_results(args: argparse.Namespace, factory: ClientFactory) -> int:
    with factory(args.url) as c:
        if args.id:
            res = c.results.get(args.id)
            return _show(args, res, lambda: _fields(res, skip=("data",)) + "\n\n" + json.dumps(res.data, indent=2))
        page = c.results.list(kind=args.kind, limit=args.limit)
        return _show(args, page, lambda: _table(page.items, ["id", "job_id", "kind", "created_at"]))


def _compare(args: argparse.Namespace, c: Client) -> int:
    fields = {k: v for k, v in (("engine_kind", args.engine_kind), ("model", args.model), ("rows", args.rows),
                                ("max_new_tokens", args.max_new_tokens)) if v is not None}
    job = c.comparisons.create(**fields)
    if getattr(args, "no_wait", False):
        return _show(args, job, lambda: f"{job.id} {job.state.value} (wsync job {job.id} --wait)")
    job = _follow(args, c, job)
    report = report_of(job)
    _show(args, report, lambda: format_report(report))
    return 0 if passed(report) else 1


def cmd_compare(args: argparse.Namespace, factory: ClientFactory) -> int:
    with factory(args.url) as c:
        return _compare(args, c)


def cmd_demo(args: argparse.Namespace, factory: ClientFactory) -> int:
    if args.url:
        with factory(args.url) as c:
            return _compare(args, c)
    server = LocalServer(port=args.port, client_factory=factory).start()
    if not args.json:
        _err(f"starting wsync server on {server.url} (log: {server.log_path})")
    try:
        try:
            server.wait_ready(args.ready_timeout)
        except ServerStartError as exc:
            _err(f"error: {exc}\n--- server log ({server.log_path}) ---\n{exc.log}")
            return 2
        with factory(server.url) as c:
            try:
                return _compare(args, c)
            except WsyncError:
                _err(f"--- server log tail ({server.log_path}) ---\n{server.log_tail(60)}")
                raise
    finally:
        server.stop()


# -- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsync", description="wsync weight-sync control plane")
    p.add_argument("--url", default=None, help=f"service URL (default: $WSYNC_URL or {DEFAULT_BASE_URL})")
    p.add_argument("--version", action="version", version=f"wsync {__version__}")
    p.add_argument("--token", default=None, help="API token sent as a bearer token (default: $WSYNC_API_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    js = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the flag may sit at either level of a nested command (`engines --json list`).
    js.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable JSON output")
    # --url / --token work before or after the sub-command (SUPPRESS: a later one overrides).
    js.add_argument("--url", default=argparse.SUPPRESS, help=f"service URL (default: $WSYNC_URL or {DEFAULT_BASE_URL})")
    js.add_argument("--token", default=argparse.SUPPRESS, help="API token (default: $WSYNC_API_TOKEN)")
    wt = argparse.ArgumentParser(add_help=False)
    wt.add_argument("--wait", action="store_true", help="wait for the job to finish (progress bar on a terminal)")
    wt.add_argument("--follow", action="store_true",
                    help="wait, printing every job event as it happens (--json: one JSON object per line)")
    wt.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")

    s = sub.add_parser("serve", help="run the HTTP service", description="Run the HTTP service (uvicorn) in the "
                       "foreground; SIGTERM or Ctrl-C shut it down cleanly.")
    s.add_argument("--host", default=None, help="address to bind (default: $WSYNC_HOST or 127.0.0.1; a "
                   "non-loopback one needs WSYNC_API_TOKEN)")
    s.add_argument("--port", type=int, default=None, help="port to bind (default: $WSYNC_PORT or 8321)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("engines", parents=[js], help="list/launch/get/delete/generate engines",
                       description="Inference engines. Actions: list (default), launch, get, delete, generate.")
    esub = s.add_subparsers(dest="action", metavar="ACTION", title="actions")
    esub.add_parser("list", parents=[js], help="list engines (the default action)")
    la = esub.add_parser("launch", parents=[js], help="launch an engine and wait until it is ready (progress shown)")
    la.add_argument("--kind", default="reference", choices=["reference", "vllm"], help="engine implementation")
    la.add_argument("--model", default=None, help="local model folder or hub id (default: the trainer's model)")
    la.add_argument("--name", default=None, help="a human label for the engine")
    la.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="weights' dtype (default: the trainer's; another one is refused)")
    la.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="vLLM: fraction of GPU memory the engine may take")
    la.add_argument("--sync-route", default=None, choices=["direct", "native"],
                    help="vLLM: vLLM's own weight-transfer API (native, default) or wsync's wire into runtime params (direct)")
    la.add_argument("--no-wait", action="store_true", help="answer at once (engine starting)")
    for name, what in (("get", "show one engine"), ("delete", "stop an engine and free its GPU")):
        esub.add_parser(name, parents=[js], help=what).add_argument("id", help="engine id")
    ge = esub.add_parser("generate", parents=[js], help="greedy generation on an engine")
    ge.add_argument("id", help="engine id")
    ge.add_argument("prompts", nargs="+", help="one or more prompts")
    ge.add_argument("--max-new-tokens", type=int, default=1, help="tokens to generate per prompt")
    s.set_defaults(func=cmd_engines)

    s = sub.add_parser("trainer", parents=[js], help="show, load, reset or step the trainer",
                       description="The trainer. Actions: show (default), load, reset, step.")
    tsub = s.add_subparsers(dest="action", metavar="ACTION", title="actions")
    tsub.add_parser("show", parents=[js], help="the trainer's model and weight version (the default action)")
    lo = tsub.add_parser("load", parents=[js], help="load a model into the trainer (progress shown)")
    lo.add_argument("--model", default=None, help="local model folder or hub id (default: the embedded model)")
    lo.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="the trainer's dtype (engines launched later inherit it)")
    tsub.add_parser("reset", parents=[js], help="back to the baseline checkpoint")
    st = tsub.add_parser("step", parents=[js], help="a real optimizer step on the trainer")
    st.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer")
    st.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    st.add_argument("--steps", type=int, default=1, help="optimizer steps")
    s.set_defaults(func=cmd_trainer)

    s = sub.add_parser("patch", parents=[js], help="prepare a patch (applied to the trainer)")
    s.add_argument("--kind", default="reference", choices=["reference", "random"],
                   help="reference: embedding rows of the prompts' tokens (vLLM's example); random: random elements")
    s.add_argument("--rows", type=int, default=None, help="reference: embedding rows to change")
    s.add_argument("--density", type=float, default=None, help="random: fraction of elements to change")
    s.add_argument("--seed", type=int, default=None, help="random: seed")
    s.set_defaults(func=cmd_patch)

    s = sub.add_parser("sync", help="sync engines with the trainer (dense or sparse)",
                       description="Sync engines with the trainer. Modes: dense, sparse.")
    ssub = s.add_subparsers(dest="mode", required=True, metavar="MODE", title="modes")
    for mode, what in (("dense", "send every parameter"), ("sparse", "send only changed elements (a patch or a delta)")):
        m = ssub.add_parser(mode, parents=[js, wt], help=what)
        m.add_argument("--engine", action="append", required=True, help="engine id (repeatable)")
        m.add_argument("--no-verify", action="store_true", help="skip the weight-fingerprint check afterwards")
        if mode == "dense":
            m.add_argument("--bucket-bytes", type=int, default=None, help="flat buffer size (default: the server's)")
        else:
            src = m.add_mutually_exclusive_group(required=True)
            src.add_argument("--patch", help="patch id")
            src.add_argument("--delta", action="store_true",
                             help="send what changed since the engines' version (bit-exact diff on the trainer)")
            m.add_argument("--encoding", default="flat_int32",
                           choices=["flat_int32", "gap", "gap8", "bitmask", "rows", "auto"],
                           help="sparse wire encoding (flat_int32 is vLLM's; auto picks the smallest)")
    s.set_defaults(func=cmd_sync)

    def compare_args(c: argparse.ArgumentParser) -> None:
        c.add_argument("--engine-kind", default=None, choices=["reference", "vllm"], help="engines to compare on")
        c.add_argument("--model", default=None, help="local model folder or hub id (default: the embedded model)")
        c.add_argument("--rows", type=int, default=None, help="embedding rows the reference patch changes")
        c.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per prompt")
        c.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
        c.add_argument("--follow", action="store_true", help="print every job event as it happens")

    s = sub.add_parser("compare", parents=[js], help="dense vs sparse comparison (vLLM's rlhf_sparse_nccl)")
    compare_args(s)
    s.add_argument("--no-wait", action="store_true", help="print the job and return")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("demo", parents=[js], help="start a server (unless --url), run a comparison, stop it")
    compare_args(s)
    s.add_argument("--port", type=int, default=None, help="port for the started server (default: a free one)")
    s.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S,
                   help="seconds to wait for the started server to be ready")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("results", parents=[js], help="list results (newest first) or show one")
    s.add_argument("id", nargs="?", help="result id (default: list them)")
    s.add_argument("--kind", default=None, choices=[k.value for k in JobKind], help="only results of this job kind")
    s.add_argument("--limit", type=int, default=20, help="how many to list")
    s.set_defaults(func=cmd_results)

    s = sub.add_parser("job", parents=[js, wt], help="show (or wait for, or cancel) a job")
    s.add_argument("id", help="job id")
    s.add_argument("--cancel", action="store_true", help="cancel it (a running job stops at its next safe point)")
    s.set_defaults(func=cmd_job)

    s = sub.add_parser("jobs", parents=[js], help="list jobs")
    s.add_argument("--state", default=None, choices=["queued", "running", "succeeded", "failed", "cancelled"],
                   help="only jobs in this state")
    s.add_argument("--kind", default=None, choices=[k.value for k in JobKind], help="only jobs of this kind")
    s.add_argument("--limit", type=int, default=20, help="how many to list")
    s.set_defaults(func=cmd_jobs)
    return p


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, APIStatusError):
        return f"error: {exc}"  # "<status> <type>: <message> (field=..., request_id=...)"
    if isinstance(exc, APIConnectionError):
        url = getattr(getattr(exc, "request", None), "url", None)
        where = f"{url.scheme}://{url.netloc.decode()}" if url is not None else "the service URL"
        return f"error: connection: {exc.message}\nis `wsync serve` running at {where}?"
    if isinstance(exc, InvalidRequestError):
        return f"error: invalid request: {exc.message}" + (f" (field={exc.field})" if exc.field else "")
    return f"error: {exc}"


def main(argv: Sequence[str] | None = None, client_factory: ClientFactory | None = None) -> int:
    """Entry point. `client_factory(url) -> Client` is injectable (tests pass a MockTransport client)."""
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    explicit_url = getattr(args, "url", None)
    if args.command != "demo":
        args.url = explicit_url or os.environ.get("WSYNC_URL") or DEFAULT_BASE_URL
    token = getattr(args, "token", None)
    factory = client_factory or (lambda url: Client(base_url=url, api_token=token))
    try:
        return args.func(args, factory)
    except WsyncError as exc:
        _err(_error_line(exc))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
