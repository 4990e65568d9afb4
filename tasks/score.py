"""Tasks of the score_parquet flow; every one is a call into `distilq.scoring`."""

from __future__ import annotations

import time

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import distilq
from distilq import scoring
from distilq.config import ScoreConfig
from distilq.registry import Registry

_classifiers: dict[tuple[str, str], object] = {}  # one model per worker process


def classifier_for(registry: str, version: str, allow_unattested: bool = False):
    """The classifier for `version`, loaded (hash-checked, and attested on this platform)
    once per process."""
    key = (registry, version)
    if key not in _classifiers:
        _classifiers[key] = distilq.load(registry, version, allow_unattested=allow_unattested)
    return _classifiers[key]


@task(cache_policy=NO_CACHE)
def resolve_model(config: ScoreConfig) -> tuple[str, scoring.ScoreOptions]:
    """The version behind `config.model` and the options to score with (its batching
    policy); fails early if the model is unknown or cannot take `max_length`."""
    registry = Registry(config.registry)
    version = registry.resolve(config.model)
    options = scoring.options_for(config, registry, version)
    get_run_logger().info("model %s (%s) from %s", version, config.model, config.registry)
    return version, options


@task(cache_policy=NO_CACHE)
def plan(config: ScoreConfig, options: scoring.ScoreOptions) -> scoring.Plan:
    """Shards to score, after every input's schema and the output's place were checked."""
    found = scoring.plan_shards(config.inputs, options, config.output)
    rows = sum(s.rows for s in found.shards)
    get_run_logger().info(
        "%d shard(s), %d rows; %d unreadable file(s)",
        len(found.shards),
        rows,
        len(found.unreadable),
    )
    return found


@task(cache_policy=NO_CACHE)
def prepare(config: ScoreConfig, found: scoring.Plan, version: str, options: scoring.ScoreOptions):
    """Check the output against this run; save its manifest; return the shards left to do."""
    manifest, todo = scoring.prepare_output(
        config.output, found, version, options.model_dump(), config.overwrite
    )
    manifest.save()
    skipped = len(found.shards) - len(todo)
    if skipped:
        get_run_logger().info("resuming: %d shard(s) already done, %d to go", skipped, len(todo))
    return todo


@task(cache_policy=NO_CACHE)
def score_shard(
    shard: scoring.Shard, config: ScoreConfig, version: str, options: scoring.ScoreOptions
):
    """Score one shard on this worker; log progress every 15 s."""
    torch.set_num_threads(config.threads_per_worker)
    logger = get_run_logger()
    classifier = classifier_for(config.registry, version, config.allow_unattested)
    done, start, last = 0, time.perf_counter(), time.perf_counter()

    def progress(rows: int) -> None:
        nonlocal done, last
        done += rows
        if time.perf_counter() - last >= 15:
            last = time.perf_counter()
            logger.info(
                "%s: %d/%d rows, %.1f rows/s", shard.output, done, shard.rows, done / (last - start)
            )

    stats = scoring.score_shard(classifier, shard, config.output, options, progress)
    logger.info("%s: %d rows in %.1f s", shard.output, stats.rows_written, stats.seconds)
    return stats
