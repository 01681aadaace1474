"""The instance lease: one live service process per database.

Contract:
- ``InstanceLease.take(store, ...)`` takes the ``service`` row of ``instance_lease`` (owner id,
  host:port, heartbeat, expiry) or raises ``LeaseHeld`` naming the live holder. It touches no job:
  call it before ``Store.interrupt_unfinished`` so a second server on the same database refuses to
  start without marking the first one's jobs.
- A lease whose expiry passed (its process died without releasing it) is taken over.
- While held, a daemon thread renews it every ``heartbeat_s``; if a renewal finds the lease taken
  over (this process stalled past the TTL) it logs an error and sets ``lost``.
- ``release()`` stops the heartbeat and deletes the row (only if still ours).
Clocks: expiry uses each host's UTC clock; hosts sharing a database should keep clocks within
a fraction of the TTL.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from wsync.errors import ServiceError

from .store import LeaseInfo, Store

log = logging.getLogger("wsync.lease")


class LeaseHeld(ServiceError):
    """Another live service process holds the database."""

    status, type = 409, "lease_held"

    def __init__(self, holder: LeaseInfo):
        super().__init__(f"another wsync service ({holder.owner} at {holder.address}) holds this database "
                         f"until {holder.expires_at.isoformat()} (heartbeat {holder.heartbeat_at.isoformat()}); "
                         "stop it or wait for its lease to expire", field="database_url", rule="instance_lease")
        self.holder = holder


class InstanceLease:
    def __init__(self, store: Store, owner: str, address: str, ttl_s: float, heartbeat_s: float):
        if heartbeat_s >= ttl_s:
            raise ValueError("lease heartbeat must be shorter than its TTL")
        self.store, self.owner, self.address = store, owner, address
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def take(cls, store: Store, address: str, ttl_s: float = 30.0, heartbeat_s: float = 10.0,
             owner: str | None = None) -> InstanceLease:
        """Acquire the lease and start the heartbeat, or raise LeaseHeld."""
        owner = owner or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        holder = store.acquire_lease(owner, address, ttl_s)
        if holder is not None:
            raise LeaseHeld(holder)
        lease = cls(store, owner, address, ttl_s, heartbeat_s)
        lease._thread = threading.Thread(target=lease._beat, name="wsync-lease", daemon=True)
        lease._thread.start()
        return lease

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.store.renew_lease(self.owner, self.ttl_s):
                    log.error("instance lease lost: another service took this database over")
                    self.lost.set()
                    return
            except Exception as exc:  # database briefly unreachable: retry at the next beat
                log.warning("instance lease renewal failed: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.store.release_lease(self.owner)
        except Exception as exc:  # pragma: no cover - database gone at shutdown
            log.warning("instance lease release failed: %s", exc)
