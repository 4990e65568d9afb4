"""An exclusive lease on S3, where there are no locks: what `Store.lock` is on disk.

The lease is one small object created with a conditional PUT (If-None-Match), so of two
runs starting at once exactly one gets it. Its holder rewrites it every RENEW_SECONDS (If-
Match its ETag); a lease not renewed for LEASE_SECONDS belongs to a run that died, and the
next run takes it over, again conditionally, so two takers cannot both win. It is removed
when its holder is done. Clocks: expiry compares the holder's clock with the taker's, so
machines whose clocks differ by minutes could take a live lease; keep them in sync (NTP).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from distilq.storage.store import Store, WriteConflict

LEASE_SECONDS = 300
RENEW_SECONDS = 60
log = logging.getLogger("distilq")


@contextlib.contextmanager
def s3_lease(store: Store, rel: str) -> Iterator[bool]:
    """Hold the lease `rel` of `store` (an S3 store) while the block runs; yields False at
    once when another live run holds it."""
    mine = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    token = _take(store, rel, mine)
    if token is None:
        yield False
        return
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew, args=(store, rel, mine, token, stop), name="distilq-lease", daemon=True
    )
    renewer.start()
    try:
        yield True
    finally:
        stop.set()
        renewer.join()
        _release(store, rel, mine)


def _body(mine: dict) -> bytes:
    return json.dumps({**mine, "renewed_at": time.time()}).encode()


def _take(store: Store, rel: str, mine: dict) -> str | None:
    """The lease's ETag once we hold it, or None when a live run does."""
    for _ in range(2):  # a second try when the lease was released between our two reads
        try:
            return store.write_if_unchanged(rel, _body(mine), None)
        except WriteConflict:
            pass
        content, token = store.read_for_update(rel)
        if content is None:
            continue
        if not _expired(content):
            return None
        log.warning("%s: taking over a lease its run stopped renewing", store.uri_of(rel))
        try:
            return store.write_if_unchanged(rel, _body(mine), token)
        except WriteConflict:
            return None  # another run took it over first
    return None


def _expired(content: bytes) -> bool:
    try:
        renewed = float(json.loads(content)["renewed_at"])
    except (ValueError, KeyError, TypeError):
        return True  # not a lease record: nobody holds it
    return time.time() - renewed > LEASE_SECONDS


def _renew(store: Store, rel: str, mine: dict, token: str, stop: threading.Event) -> None:
    while not stop.wait(RENEW_SECONDS):
        try:
            token = store.write_if_unchanged(rel, _body(mine), token)
        except WriteConflict:
            log.error(
                "%s: another run took this run's lease over (this run stalled for more than %d "
                "s); the output's conditional manifest writes stop this run at its next save",
                store.uri_of(rel), LEASE_SECONDS,
            )  # fmt: skip
            return
        except OSError as e:  # the store is away for a moment: the next renewal may pass
            log.warning("%s: could not renew the lease: %s", store.uri_of(rel), e)


def _release(store: Store, rel: str, mine: dict) -> None:
    with contextlib.suppress(OSError, ValueError):
        content, _ = store.read_for_update(rel)
        if content and json.loads(content).get("owner") == mine["owner"]:
            store.remove(rel)
