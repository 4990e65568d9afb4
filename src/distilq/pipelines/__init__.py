"""The two user paths, each one plain function that owns the order of its steps, its
clean-up and its bookkeeping:

    quantize.quantize_and_promote(config) -> QuantizeResult
    score.score_dataset(config) -> ScoreSummary

Every step is a plain function of those modules or the library, called through a `Runner`
(runner.py). `Runner()` calls them here, one after another, and maps shards in this process;
the Prefect flows pass a runner that makes each step a task (retries, run logs) and maps
shards over a Prefect task runner (tasks/runner.py). Nothing else sequences these steps.
Staging a candidate as a version (files, report, manifest) is staging.py.
"""
