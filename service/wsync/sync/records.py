"""Typed records the registry keeps: one per engine, one for the trainer."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from wsync.actors.ref import ActorRef
from wsync.schemas import EngineInfo, TrainerInfo
from wsync.transfer.meta import TensorMeta

from .transports import Transport


@dataclass
class EngineRecord:
    """An engine actor and what the service knows about it.

    ``transport`` is chosen once, when the engine is ready; ``group`` is the transfer group the engine
    is in now (kept open between syncs; wsync.sync.groups owns it)."""

    info: EngineInfo
    actor: ActorRef
    transport: Transport | None = None
    group: str | None = None

    @property
    def quarantined(self) -> str | None:
        """Why this engine gets no sparse sync (a fault was blamed on it); a dense commit clears it."""
        return self.info.quarantined

    @quarantined.setter
    def quarantined(self, cause: str | None) -> None:
        self.info.quarantined = cause

    @property
    def id(self) -> str:
        return self.info.id


@dataclass
class TrainerRecord:
    """The trainer's last known state: its info (no params), its parameters' metas in the dense wire's
    order, the weight versions it keeps snapshots of (for deltas), and the patches it holds."""

    info: TrainerInfo = field(default_factory=lambda: TrainerInfo(loaded=False))
    params: list[TensorMeta] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    held: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def specs(self) -> dict[str, TensorMeta]:
        return {m.name: m for m in self.params}
