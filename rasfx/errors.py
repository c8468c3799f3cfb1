"""One exception hierarchy for everything rasfx refuses to do.

Every error names the construct, where it is (module path or graph node) and what the
user can do about it. ``RasfxError`` is the root; the value errors also derive from
``ValueError`` so that plain ``except ValueError`` keeps working.
"""


class RasfxError(Exception):
    """Root of all rasfx errors."""


class UnsupportedModelError(RasfxError):
    """The model cannot be transformed (no image tokens, a U-Net, capture impossible...)."""


class CaptureError(UnsupportedModelError):
    """The model's forward could not be captured as a graph."""


class TooFewTokensError(UnsupportedModelError):
    """The image has a single token at this resolution: there is nothing to skip, so the
    transformed module runs this input signature dense (with a ``RASWarning``)."""


class InvalidIndexError(RasfxError, ValueError):
    """An active-token index set is malformed (dtype, shape, range, duplicates, device)."""


class UsageError(RasfxError, ValueError):
    """An API was called in a state where it cannot work (e.g. stats before any run); the
    message says what to call first."""


class ArgumentTypeError(RasfxError, TypeError):
    """An argument of the wrong type was passed to a rasfx API; the message names the right one."""


class ConfigError(RasfxError, ValueError):
    """A configuration value is invalid; the message names the field."""


class ExplainError(RasfxError, ValueError):
    """A bad request to ``explain`` (unknown stage, variant or format, a filter that
    matches nothing)."""


class ParallelError(RasfxError, RuntimeError):
    """Context parallelism (``rasfx.ParallelConfig``) failed: a collective timed out or failed
    because another rank stopped, or the ranks disagree; every rank raises one, and the next
    pipeline call forms the process group again (see docs/parallel.md)."""


class ToolMissingError(RasfxError, RuntimeError):
    """An external tool (Graphviz ``dot``) or an optional package (matplotlib) is needed and
    missing; the message says how to install it."""


class RASWarning(UserWarning):
    """RAS could not run as configured (the run, or one input signature, falls back to dense), or
    runs slower than it could (e.g. a per-step input that rasfx treats as constant)."""
