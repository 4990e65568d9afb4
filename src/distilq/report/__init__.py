"""What a person reads: a version's report (Markdown), its chart, and a scoring run's
summary line."""
