"""Model names -> what transformers/vLLM load, confined to an allow-list of local roots.

Contract (``resolve_model(name, roots, cache_dir, allow_hub)``):
- ``None``, ``""``, ``"default"``, ``"wsync-tiny"``: the embedded tiny model (built on first use).
- A name with a ``..`` segment, or one containing NUL: 422 naming ``model``.
- A local directory (absolute, ``~``, or relative to the working directory) is resolved with all
  symlinks followed and must lie inside one of ``roots`` (``WSYNC_MODEL_ROOTS``; default: the cache
  dir and the working directory); ``/etc``, ``/proc/self`` and the like are refused with 422.
- A directory whose ``config.json`` asks for custom code (``auto_map``) is refused: wsync never
  loads with ``trust_remote_code``.
- Any other name is a hub id (``org/name``): refused unless ``allow_hub`` (``WSYNC_ALLOW_HUB_MODELS``),
  because a download would hold the trainer for minutes.
"""

from __future__ import annotations

import json
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
        raise _refuse(f"{name!r} is neither a folder under the model roots nor a hub id", "model_name")
    if not allow_hub:
        raise _refuse(f"{name!r} is not a local folder and hub downloads are off (WSYNC_ALLOW_HUB_MODELS)",
                      "model_hub_disabled")
    return name


def _local_dir(local: Path, roots: list[Path]) -> Path:
    try:
        real = local.resolve(strict=True)
    except (OSError, RuntimeError):
        raise _refuse(f"no folder {str(local)!r}", "model_exists") from None
    allowed = [Path(r).resolve() for r in roots]
    if not any(real == root or real.is_relative_to(root) for root in allowed):
        shown = ", ".join(str(r) for r in allowed)
        raise _refuse(f"{str(local)!r} resolves to {str(real)!r}, outside the model roots [{shown}] "
                      "(WSYNC_MODEL_ROOTS)", "model_roots")
    if not real.is_dir():
        raise _refuse(f"{str(local)!r} is not a folder", "model_is_dir")
    config = real / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text()[:1_000_000])
        except (OSError, ValueError):
            raise _refuse(f"{str(config)!r} is not valid JSON", "model_config") from None
        if isinstance(data, dict) and data.get("auto_map"):
            raise _refuse(f"{str(local)!r} needs custom code (auto_map); wsync never trusts remote code",
                          "trust_remote_code")
    return real
