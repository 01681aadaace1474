"""The control plane as a Ray Serve application, for an existing Ray cluster (KubeRay RayService,
``serve run``): one replica whose ingress is the FastAPI app of wsync.api.app.create_app.

    serve run wsync.deploy.serve:app                          # settings from WSYNC_* env vars
    serve run wsync.deploy.serve:build_app api_token=...      # an application builder with args

One replica only: the fleet (trainer and engine actors, transfer groups) is state held by the process
that runs the app, so a second replica would run a second, separate fleet. Ray is already initialized
inside the replica, so the fleet's actors land on the cluster; engines ask Ray for their GPUs as usual.
The replica itself needs no GPU. Settings are the service's (``WSYNC_`` env vars, e.g. set in the
RayService's runtime_env), overridable by the builder's args (any Settings field).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from wsync.api.app import create_app
from wsync.settings import Settings

DEPLOYMENT_NAME = "wsync"


def build_app(args: dict[str, Any] | None = None, *, start_fleet: bool = True) -> serve.Application:
    """The Serve application: a one-replica deployment with wsync's FastAPI app as its ingress.
    ``args``: Settings fields (strings are parsed as from the environment)."""
    settings = Settings(**(args or {}))
    fastapi_app = create_app(settings, start_fleet=start_fleet)

    @serve.deployment(name=DEPLOYMENT_NAME, num_replicas=1, max_ongoing_requests=64,
                      ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
    @serve.ingress(fastapi_app)
    class WsyncControlPlane:
        """The control plane's replica; every route is the FastAPI app's."""

    return WsyncControlPlane.bind()


def __getattr__(name: str) -> Any:
    """``wsync.deploy.serve:app`` builds the application on first access (not at import)."""
    if name == "app":
        return build_app()
    raise AttributeError(name)
