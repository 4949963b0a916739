"""Exceptions raised by the dataset package."""


class DatasetError(ValueError):
    """A dataset cannot be built; the message is one line naming the path, key or value at fault."""


class VideoReadError(RuntimeError):
    """One video file cannot be opened or decoded; the caller skips that file instead of crashing."""
