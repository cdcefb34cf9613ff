"""Exception types that carry a message a user can act on (which file, record or parameter, and what was expected)."""


class MarginfaceError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(MarginfaceError, ValueError):
    """A parameter, option or configuration value is invalid; the message names it and what is allowed."""


class DataFormatError(MarginfaceError, ValueError):
    """A data file is malformed; the message names the file, the record key or path, and what was expected."""


class NonFiniteLossError(MarginfaceError, RuntimeError):
    """Training produced non-finite losses too many steps in a row."""
