"""Model names -> what transformers/vLLM load, confined to an allow-list of local roots.

Contract (``resolve_model(name, roots, cache_dir, allow_hub)``):
- ``None``, ``""``, ``"default"``, ``"wsync-tiny"``: the embedded tiny model (built on first use).
- A name with a ``..`` segment, or one containing NUL: 422 naming ``model``.
- A local directory (absolute, ``~``, or relative to the working directory) is resolved with all
  symlinks followed and must lie inside one of ``roots`` (``WSYNC_MODEL_ROOTS``; default: the cache
  dir and the working directory); ``/etc``, ``/proc/self`` and the like are refused with 422.
- A directory whose ``config.json`` asks for custom code (``auto_map``) is refused: wsync never
  loads with ``trust_remote_code``.
- A folder without ``config.json`` is "not a model folder"; a path that does not exist is "not found"
  (no hub is asked for anything that looks like a path).
- Any other name is a hub id (``org/name``): refused unless ``allow_hub`` (``WSYNC_ALLOW_HUB_MODELS``),
  because a download would hold the trainer for minutes; with ``HF_HUB_OFFLINE`` (or
  ``TRANSFORMERS_OFFLINE``) set it must be in the local hub cache ("not found offline").

Every refusal is ``InvalidInput`` (422) with ``field="model"`` and a ``rule``. This is the only
resolver: ``resolve_local`` (below; ``wsync.models.resolve_model``) is this one without roots, for local tools.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from wsync.errors import InvalidInput

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
DEFAULT_ALIASES = ("default", "wsync-tiny")


def _refuse(message: str, rule: str) -> InvalidInput:
    return InvalidInput(f"model: {message}", field="model", rule=rule)


def resolve_model(name: str | None, roots: list[Path], cache_dir: Path | None = None,
                  allow_hub: bool = False) -> str:
    """Return the absolute folder (or hub id) to load; raise InvalidInput(field='model') otherwise."""
    if name is None or not name.strip() or name in DEFAULT_ALIASES:
        from wsync.models.tiny import ensure_default_model

        return str(ensure_default_model(cache_dir))
    if "\x00" in name:
        raise _refuse("contains a NUL byte", "model_name")
    if ".." in Path(name).parts or ".." in name.replace("\\", "/").split("/"):
        raise _refuse(f"{name!r} has a '..' segment", "model_path_traversal")
    local = Path(name).expanduser()
    looks_local = local.is_absolute() or name.startswith(("~", "./")) or local.exists()
    if looks_local:
        return str(_local_dir(local, roots))
    if not HUB_ID.match(name):
        raise _refuse(f"{name!r} not found: no such local folder and not a valid hub id", "model_name")
    if not allow_hub:
        raise _refuse(f"{name!r} is not a local folder and hub downloads are off (WSYNC_ALLOW_HUB_MODELS)",
                      "model_hub_disabled")
    if _offline() and not _hub_cached(name):
        raise _refuse(f"{name!r} not found offline: no local folder of that name and not in the hub cache "
                      "(HF_HUB_OFFLINE is set)", "model_exists")
    return name


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cached(repo_id: str) -> bool:
    """Whether the hub cache holds this repo's config.json (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _local_dir(local: Path, roots: list[Path]) -> Path:
    try:
        real = local.resolve(strict=True)
    except (OSError, RuntimeError):
        raise _refuse(f"{str(local)!r} not found: no such local folder", "model_exists") from None
    allowed = [Path(r).resolve() for r in roots]
    if not any(real == root or real.is_relative_to(root) for root in allowed):
        shown = ", ".join(str(r) for r in allowed)
        raise _refuse(f"{str(local)!r} resolves to {str(real)!r}, outside the model roots [{shown}] "
                      "(WSYNC_MODEL_ROOTS)", "model_roots")
    if not real.is_dir():
        raise _refuse(f"{str(local)!r} is a file, not a model folder (no config.json)", "model_is_dir")
    config = real / "config.json"
    if not config.is_file():
        raise _refuse(f"{str(local)!r} is not a model folder (no config.json in {str(real)!r})", "model_folder")
    try:
        data = json.loads(config.read_text()[:1_000_000])
    except (OSError, ValueError):
        raise _refuse(f"{str(config)!r} is not valid JSON", "model_config") from None
    if isinstance(data, dict) and data.get("auto_map"):
        raise _refuse(f"{str(local)!r} needs custom code (auto_map); wsync never trusts remote code",
                      "trust_remote_code")
    return real


def resolve_local(name: str | None, cache_dir: Path | None = None) -> str:
    """Map a model name to what transformers/vLLM should load, for local tools and tests: the service's
    resolver (resolve_model above) with no root confinement and hub ids allowed.

    ``None``, ``""``, ``"wsync-tiny"`` or ``"default"``: the embedded model's folder (built on first use).
    An existing local folder: its absolute path, if it holds a ``config.json``. A hub id (``org/name``)
    that is no local folder: returned unchanged (offline: only when in the hub cache). Anything else
    raises ``InvalidInput`` (field ``model``) without contacting a hub.
    """
    return resolve_model(name, [Path(os.sep)], cache_dir, allow_hub=True)
