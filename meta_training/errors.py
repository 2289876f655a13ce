"""Typed errors of the offline job; the CLI turns them into a message and exit code 2."""


class S2MetaError(Exception):
    """Base class for errors caused by input or settings, never by a bug."""


class DataError(S2MetaError):
    """An input file is missing, malformed or inconsistent; the message names the file and the
    line (text files) or the column (Parquet)."""


class SettingsError(S2MetaError):
    """Settings that cannot work on the given data (e.g. they leave no scenario)."""
