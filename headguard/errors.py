"""The one error type for misuse of the harness, as Hypothesis has `InvalidArgument`."""


class UsageError(Exception):
    """A TARGET, spec, option or loss that headguard cannot use as given. `str()` is one line naming what was wrong
    and what was expected; the CLI prints it and exits 2. Every misuse error headguard raises is a UsageError (the
    specific types, TargetError, ContractError, ShapeLossError, UnknownCheckError, subclass it), so one `except`
    catches them all."""
