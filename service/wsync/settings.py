"""Service settings (pydantic-settings, env prefix ``WSYNC_``)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field
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
    default_model: str | None = Field(default=None, description="Model when a request names none; default: the embedded tiny model.")
    ray_address: str | None = Field(default=None, description="Connect to this Ray cluster instead of starting one.")
    ray_num_cpus: int | None = Field(default=None, description="CPUs for a locally started Ray.")
    device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$", description="auto: cuda if Ray sees GPUs.")
    dense_bucket_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    group_timeout_s: float = Field(default=300.0, gt=0)
    engine_start_timeout_s: float = Field(default=900.0, gt=0)
    delta_snapshots: int = Field(default=1, ge=0, description="Weight versions the trainer keeps a device copy of, "
                                 "for bit-exact delta syncs (each costs one copy of the weights; 0 disables).")
    torch_threads: int = Field(default=1, ge=1, description="torch threads inside CPU actors.")
    max_page: int = 200
    request_wait_s: float = Field(default=30.0, ge=0, description="How long a `wait=true` launch or load holds the "
                                  "request before answering 202 with its job (keep it under clients' timeouts).")
    api_token: str | None = Field(default=None, description="Bearer token required on mutating routes (and reads "
                                  "when api_token_reads); `wsync serve` needs one to bind a non-loopback host.")
    api_token_reads: bool = Field(default=False, description="Require the token on read-only routes too.")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.cache_dir / 'wsync.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
