"""LocalActors wired to the fake cores: ``fake_actors(hub)`` is what ``create_app(actors=...)`` takes."""

from __future__ import annotations

from collections.abc import Callable

from wsync.actors.ref import LocalActors
from wsync.settings import Settings

from .cores import FakeEngine, FakeTrainer
from .wire import Hub


def fake_actors(hub: Hub, device: str = "cpu") -> Callable[[Settings], LocalActors]:
    def build(settings: Settings) -> LocalActors:
        return LocalActors(lambda dev, snaps, bucket: FakeTrainer(hub, dev),
                           lambda kind, model, dev, options: FakeEngine(hub, model, dev, options), device=device)

    return build
