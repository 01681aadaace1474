"""Service settings (pydantic-settings, env prefix ``WSYNC_``).

The Ray actors do not load these: the one knob they read, ``WSYNC_TORCH_THREADS`` (torch threads in a
CPU actor, default 1), is read from the environment where it is used (``engines.hf.set_cpu_threads``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wsync"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WSYNC_", env_file=None, extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8321
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite in cache_dir.")
    cache_dir: Path = Field(default_factory=default_cache_dir)
    default_model: str | None = Field(default=None,
                                      description="Model when a request names none; default: the embedded tiny model.")
    ray_address: str | None = Field(default=None, description="Connect to this Ray cluster instead of starting one.")
    ray_num_cpus: int | None = Field(default=None, description="CPUs for a locally started Ray.")
    device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$", description="auto: cuda if Ray sees GPUs.")
    dense_bucket_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    # ---- bounded waits (issue 12): every wait on an actor or a peer ends within one of these ----
    group_timeout_s: float = Field(default=30.0, gt=0, description="Rendezvous + communicator set-up of a transfer "
                                   "group, and each collective in it (gloo/NCCL timeout), on every side.")
    call_timeout_s: float = Field(default=60.0, gt=0, description="Any other actor call (pause, prepare, "
                                  "fingerprint, patch preparation, ...).")
    transfer_timeout_s: float = Field(default=120.0, gt=0, description="One send || receive of a sync (the "
                                      "watchdog aborts the group on every side past it).")
    sync_timeout_s: float = Field(default=300.0, gt=0, description="A whole sync job; past it the job fails "
                                  "naming the phase it was in.")
    probe_timeout_s: float = Field(default=3.0, gt=0, description="Liveness probe of an actor (control path).")
    engine_start_timeout_s: float = Field(default=300.0, gt=0)
    ray_node_ip: str = Field(default="127.0.0.1", description="The address Ray binds (a single-node cluster stays "
                             "on loopback); set the node's address for a multi-node cluster.")
    rendezvous_host: str | None = Field(default="127.0.0.1", description="Where the trainer's c10d store listens; "
                                        "None: the Ray node's address (multi-node).")
    colocate: str = Field(default="auto", pattern="^(auto|on|off)$",
                          description="Share GPUs between the trainer and the engines (CUDA IPC between them): auto = "
                          "when the cluster has fewer than 2 GPUs.")
    trainer_gpu_fraction: float = Field(default=0.25, gt=0, lt=1, description="Ray GPU share of a colocated trainer.")
    engine_gpu_fraction: float = Field(default=0.25, gt=0, lt=1, description="Ray GPU share of each colocated engine "
                                       "(memory is vLLM's gpu_memory_utilization, checked against free memory).")
    delta_snapshots: int = Field(default=1, ge=0, description="Weight versions the trainer keeps a device copy of, "
                                 "for bit-exact delta syncs (each costs one copy of the weights; 0 disables).")
    publisher_lease_s: float = Field(default=30.0, gt=0, description="An external trainer's slot frees after this "
                                     "long without a heartbeat, publish or done (its running publish fails).")
    publish_done_timeout_s: float = Field(default=600.0, gt=0, description="How long a publish job waits for the "
                                          "engines' receives and the publisher's done before it fails.")
    request_wait_s: float = Field(default=30.0, ge=0, description="How long a `wait=true` launch or load holds the "
                                  "request before answering 202 with its job (keep it under clients' timeouts).")
    api_token: str | None = Field(default=None, description="Bearer token required on mutating routes (and reads "
                                  "when api_token_reads); `wsync serve` needs one to bind a non-loopback host.")
    api_token_reads: bool = Field(default=False, description="Require the token on read-only routes too.")
    # ---- reliability bounds (issue 12); each refusal names the setting ----
    lease_ttl_s: float = Field(default=30.0, gt=0, description="Instance lease: a server that stops renewing "
                               "for this long loses the database to the next one that starts.")
    lease_heartbeat_s: float = Field(default=10.0, gt=0, description="Instance lease renewal period (< lease_ttl_s).")
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="Largest request body (413 above).")
    max_engines: int = Field(default=16, ge=1, description="Engines one service may hold (409 above).")
    max_patch_elements: int = Field(
        default=16 * 1024 * 1024, ge=1,
        description="Changed elements one patch or inline sparse sync may carry (422 above).")
    allow_hub_models: bool = Field(default=False, description="Accept hub ids as models (downloads hold the trainer).")
    model_roots: list[Path] | None = Field(default=None, description="Directories a model path may resolve "
                                           "into (WSYNC_MODEL_ROOTS, JSON list or os.pathsep-separated); "
                                           "default: cache_dir and the working directory.")

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value):
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [p for p in value.split(os.pathsep) if p]
        return value

    def resolved_model_roots(self) -> list[Path]:
        roots = self.model_roots if self.model_roots is not None else [self.cache_dir, Path.cwd()]
        return [Path(r).expanduser().resolve() for r in roots]

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.cache_dir / 'wsync.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
