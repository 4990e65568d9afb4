"""How a pipeline runs its steps (`Runner`), and how a quantize run ended (`Outcome`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from distilq.manifest import ScoreSummary, VersionManifest
from distilq.score.inputs import Shard
from distilq.score.output import OutputManifest
from distilq.score.scoring import ShardStats

T = TypeVar("T")


class Runner:
    """How a pipeline runs its steps. This one: plain calls in this process.

    Subclasses (the Prefect runner) may run steps as tasks, retrying those given `retries`
    when they fail on something worth a second try (an unreachable source or store)."""

    def __init__(self) -> None:
        self._run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"

    def step(self, fn: Callable[..., T], *args: Any, retries: int = 0) -> T:
        """Run one step."""
        return fn(*args)

    def map_shards(
        self,
        fn: Callable[..., ShardStats],
        shards: Sequence[Shard],
        args: tuple,
        on_done: Callable[[Shard, ShardStats | BaseException], None],
    ) -> None:
        """Run `fn(shard, *args)` for every shard; pass each result (or its exception) to
        `on_done` as it completes. One failed shard must not stop the others."""
        for shard in shards:
            try:
                result: ShardStats | BaseException = fn(shard, *args)
            except Exception as e:  # noqa: BLE001  recorded by on_done
                result = e
            on_done(shard, result)

    def decided(self, manifest: VersionManifest, outcome: Outcome) -> None:
        """A quantize run knows its outcome (published, promoted, rejected or reused)."""

    def promoted(self, version: str, registry: str, entry: dict) -> None:
        """`production` moved to `version`."""

    def progress(self, key: str, done: int, total: int, note: str) -> None:
        """How far a long part of the run (`key`: scoring, auto's search) went."""

    def scored(self, summary: ScoreSummary, manifest: OutputManifest) -> None:
        """A scoring run is done (some files may have failed)."""

    def audit_failed(self, summary: ScoreSummary, config) -> None:
        """A scoring run's audit failed (`summary.audit`): raise the alarm where it is seen."""

    def run_id(self) -> str:
        """This run's id: sortable by start, unique."""
        return self._run_id

    def run_name(self) -> str | None:
        """This run's name where it is shown (a Prefect flow run's), if it has one."""
        return None


class Outcome(BaseModel):
    """How a quantize run ended, said first wherever the run is shown."""

    # promoted | approved | rejected | reused | dry-run, mlflow-behind, and the recipe
    tags: list[str]
    headline: str  # one sentence: the decision, and what happened to production
    reasons: list[str]  # the gate's, one per threshold
    chart_png: bytes | None = Field(None, repr=False)  # the report's chart, when one was drawn
    mirror: str | None = None  # what the MLflow mirror did, or why it is behind
