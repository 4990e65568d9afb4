"""Moving the `production` alias: promote and rollback, each a read-decide-write step that
is one under the store's lock on disk and a conditional write (retried) on object stores,
and every move appended to the history."""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from distilq.errors import DistilqError, InputError, IntegrityError
from distilq.gate.decide import decide_manifest
from distilq.registry.layout import (
    HISTORY,
    MANIFEST,
    PRODUCTION,
    check_ref,
    command_line,
    is_plain_ref,
    manifest_bytes,
    utc_now,
)
from distilq.storage.store import Store, WriteConflict

CONFLICT_RETRIES = 20
T = TypeVar("T")
log = logging.getLogger("distilq")


class AliasMoves:
    """The alias half of `Registry`: reading, resolving and moving `production`, and the
    history of its moves. Reads the versions through the registry's `manifest`."""

    uri: str
    store: Store

    def alias(self, name: str = PRODUCTION) -> str | None:
        """The version an alias points to, or None."""
        pointer, _ = self._read_alias(name)
        return pointer.get("version")

    def resolve(self, ref: str = PRODUCTION) -> str:
        """A version name from a version or an alias."""
        check_ref(ref)
        if ref == PRODUCTION:
            version = self.alias(ref)
            if version is None:
                raise InputError(f"registry {self.uri}: nothing is in production yet")
            return version
        if not self.store.exists("versions", ref, MANIFEST):
            raise InputError(f"registry {self.uri}: no version or alias {ref!r}")
        return ref

    def history(self) -> list[dict]:
        """Every alias move, oldest first (by move number; entries without one come first).

        A line a crash cut short cannot be read: it is skipped, with a warning.
        """
        path = self.store.uri_of("aliases", HISTORY)
        try:
            data = self.store.read("aliases", HISTORY)
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(data.decode(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not _is_move(entry):
                log.warning(
                    "%s line %d is damaged (cut off by a crash, or not a move between "
                    "versions); skipped: %.80s",
                    path,
                    number,
                    line,
                )
                continue
            entries.append(entry)
        return sorted(entries, key=lambda e: e.get("seq", 0))

    def _alias_step(self, step: Callable[[], T]) -> T:
        """Run `step` (read the alias, decide, write it) as one: under the store's lock on
        disk; on object stores retried while another writer's conditional write wins first."""
        if not self.exists():
            raise InputError(f"registry {self.uri} does not exist")
        self.check_writable()
        with self.store.lock("aliases/.lock"):
            return self._retry_on_conflict(step, "the alias")

    def _retry_on_conflict(self, step: Callable[[], T], what: str) -> T:
        """Run `step` until its conditional write is not beaten by another writer."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                return step()
            except WriteConflict:
                time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
        raise DistilqError(f"registry {self.uri}: {what} kept changing; try again")

    def _read_alias(self, name: str = PRODUCTION, repair: bool = False) -> tuple[dict, str | None]:
        """The alias pointer ({} if none) and the token its conditional rewrite needs.

        A damaged pointer (not a pointer to a plain version id, or to a version that is not
        in the registry) is an error naming the file, or with `repair` (a promotion or
        rollback, which rewrites it) read as no pointer, with a warning.
        """
        check_ref(name, "alias")
        path = self.store.uri_of("aliases", f"{name}.json")
        data, token = self.store.read_for_update("aliases", f"{name}.json")
        if data is None:
            return {}, token
        try:
            pointer = json.loads(data)
        except ValueError:
            pointer = None
        target = pointer.get("version") if isinstance(pointer, dict) else None
        if not is_plain_ref(target):
            problem = "is damaged (not a pointer to a version)"
        elif not self.store.exists("versions", target, MANIFEST):
            problem = f"points at version {target!r}, which is not in the registry (deleted?)"
        else:
            return pointer, token
        if repair:
            log.warning("%s %s; rewriting it", path, problem)
            return {}, token
        raise IntegrityError(
            f"{path} {problem}; repair it with `distilq models promote VERSION` or "
            "`distilq models rollback`"
        )

    def _append_history(self, entry: dict) -> None:
        """Append one line to the history (the alias lock is held)."""
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        rel = f"aliases/{HISTORY}"
        self._retry_on_conflict(lambda: self.store.append(rel, line), rel)

    def _move(
        self,
        version: str,
        action: str,
        reason: str,
        command: str,
        current: dict,
        token: str | None,
    ) -> dict:
        at = utc_now()
        # Each move is numbered: on object stores two movers' history appends may land in
        # either order, and `history()` sorts by this number.
        seq = max(current.get("seq", 0), *(e.get("seq", 0) for e in self.history()), 0) + 1
        pointer = {
            "alias": PRODUCTION,
            "version": version,
            "updated_at": at,
            "id": uuid.uuid4().hex,
            "seq": seq,
        }
        self.store.write_if_unchanged(f"aliases/{PRODUCTION}.json", manifest_bytes(pointer), token)
        entry = {
            "at": at,
            "alias": PRODUCTION,
            "action": action,
            "from": current.get("version"),
            "to": version,
            "reason": reason,
            "command": command,
            "seq": seq,
        }
        self._append_history(entry)
        return entry

    def promote(
        self,
        version: str,
        reason: str,
        command: str | None = None,
        force: bool = False,
        newer_only: bool = False,
    ) -> dict | None:
        """Point `production` at `version`; return the history entry (None if nothing moved).

        A version the gate rejects is refused unless `force` (recorded in the history); the
        decision is derived again from the version's metrics, not read from its manifest.
        `newer_only` (automatic promotion) never moves production to an older version, so
        two publishes racing leave it on the newer one. A damaged pointer (or one whose
        version was deleted) never blocks a promotion: it is reported and rewritten.
        """
        manifest = self.manifest(version)
        decision = decide_manifest(manifest)
        if not decision.approved and not force:
            raise InputError(
                f"version {version} was rejected by the gate "
                f"({'; '.join(decision.reasons)}); use --force to promote it anyway"
            )
        if not decision.approved:
            reason = f"{reason} (forced over a rejected gate)"
        command = command or command_line()

        def step() -> dict | None:
            current, token = self._read_alias(repair=True)
            if current.get("version") == version:
                return None
            if newer_only and current:
                if self.manifest(current["version"]).created_at > manifest.created_at:
                    return None
            return self._move(version, "promote", reason, command, current, token)

        return self._alias_step(step)

    def rollback(self, reason: str = "rollback", command: str | None = None) -> dict:
        """Point `production` back at the version it had before the current one (found in
        the history, so a damaged pointer is rewritten)."""
        command = command or command_line()
        self._rollback_target()  # refused before anything is written (or locked)

        def step() -> dict:
            current, token = self._read_alias(repair=True)
            return self._move(self._rollback_target(), "rollback", reason, command, current, token)

        return self._alias_step(step)

    def _rollback_target(self) -> str:
        stack: list[str] = []
        for entry in self.history():
            if entry.get("alias", PRODUCTION) != PRODUCTION:
                continue
            if entry.get("action") == "promote":
                stack.append(entry["to"])
            elif entry.get("action") == "rollback" and stack:
                stack.pop()
        if len(stack) < 2:
            raise InputError(f"registry {self.uri}: no earlier production version to roll back to")
        target = stack[-2]
        if not self.store.exists("versions", target, MANIFEST):
            raise InputError(
                f"registry {self.uri}: the production version before this one, {target}, is no "
                "longer in the registry; promote a version with `distilq models promote VERSION`"
            )
        return target


def _is_move(entry: object) -> bool:
    """Whether a history line is an alias move between plain version ids."""
    if not isinstance(entry, dict) or not is_plain_ref(entry.get("to")):
        return False
    return entry.get("from") is None or is_plain_ref(entry.get("from"))
