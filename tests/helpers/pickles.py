"""Pickled objects a weights file must not run: loading one that ran would leave its trace on disk."""
import os


class MakesAFolder:
    """Pickles as a call of os.mkdir: a loader that ran the pickle would leave the folder behind."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return os.mkdir, (self.folder,)
