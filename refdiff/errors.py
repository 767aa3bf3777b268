"""Exceptions raised by refdiff: each names the bad input and what would fix it."""
from __future__ import annotations


class RefDiffError(Exception):
    """Base class of every error refdiff raises on purpose."""


class InputError(RefDiffError, ValueError):
    """A user-supplied input (image, text, option) is unusable; the message names it."""


class ModelLoadError(RefDiffError, OSError):
    """A model file or folder is missing, unreadable or of the wrong kind; the message names it."""


class DependencyError(RefDiffError, ImportError):
    """An optional dependency needed for a feature is not installed; the message names the package."""


class RefDiffWarning(UserWarning):
    """A run went ahead but its result may mean little (e.g. a text naming no object); the message says why."""
