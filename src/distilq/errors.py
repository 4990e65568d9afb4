"""Exceptions that carry what went wrong and what to do; the CLI maps them to exit codes."""


class DistilqError(Exception):
    """Base class of every error distilq raises on purpose."""


class InputError(DistilqError):
    """Bad parameters or input, found before any work is lost (CLI exit code 2)."""


class SourceUnavailable(DistilqError):
    """A checkpoint source could not be reached; worth retrying."""


class IntegrityError(DistilqError):
    """A file does not match the sha256 recorded in its manifest."""


class Unattested(DistilqError):
    """A version failed its self-check on this platform (CLI exit code 3)."""


class GateRejected(DistilqError):
    """The INT8 candidate failed the agreement gate (CLI exit code 3); `manifest` is the
    rejected version's."""

    def __init__(self, message: str, manifest):
        super().__init__(message)
        self.manifest = manifest


class ScoringFailed(DistilqError):
    """Some input files could not be scored; the others were (`summary` counts them)."""

    def __init__(self, message: str, summary):
        super().__init__(message)
        self.summary = summary
