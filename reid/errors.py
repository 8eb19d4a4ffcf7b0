"""The one exception type users see: a one-line message naming the file/field and what was expected."""


class ReidError(Exception):
    """Bad input or configuration. The CLI prints ``error: <message>`` and exits with status 2."""
