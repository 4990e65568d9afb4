"""What a person reads: a version's report (Markdown), its chart, a scoring run's summary
line, and the words for an audit."""
