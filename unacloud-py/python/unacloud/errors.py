"""The exception hierarchy of unacloud.

Every error raised by the library is an :class:`UnacloudError`. Errors caused by bad
input also subclass :class:`ValueError` (a negative count is an :class:`InvalidInput`),
failed look-ups :class:`LookupError` and file problems :class:`OSError` (a missing file
is a :class:`FileNotFound`, also a :class:`FileNotFoundError`, with ``errno`` and
``filename``), so ordinary ``except`` clauses keep working. An argument of the wrong
type is a plain :class:`TypeError`.
"""

from __future__ import annotations

__all__ = [
    "UnacloudError",
    "ParseError",
    "InvalidInput",
    "NotFound",
    "AmbiguousName",
    "AlreadyExists",
    "UnresolvedDependency",
    "BrokenChain",
    "CopyError",
    "IoError",
    "FileNotFound",
    "InvalidState",
    "InUse",
    "AccessDenied",
    "Timeout",
    "Unsupported",
    "InsufficientSpace",
    "PlacementError",
    "HypervisorError",
    "ProtocolError",
    "SimulationError",
]


class UnacloudError(Exception):
    """Base class of every error raised by unacloud."""


class ParseError(UnacloudError, ValueError):
    """A settings file, registry, disk header or frame is malformed or hostile."""


class InvalidInput(UnacloudError, ValueError):
    """An argument is invalid (unknown profile or algorithm, bad uuid, ...)."""


class NotFound(UnacloudError, LookupError):
    """A VM, snapshot, disk or host does not exist."""


class AmbiguousName(UnacloudError, LookupError):
    """A name matches several objects; use a uuid (the message lists them)."""


class AlreadyExists(UnacloudError):
    """An object with this name or uuid already exists."""


class UnresolvedDependency(NotFound):
    """A disk references a parent that no given registry knows (pass VirtualBox.xml)."""


class BrokenChain(UnacloudError):
    """A differencing chain on disk does not match its registry."""


class CopyError(UnacloudError):
    """Copying a file set failed or was refused (e.g. a path escaping the destination)."""


class IoError(UnacloudError, OSError):
    """A file could not be read or written.

    When the operating system said why, ``errno``, ``strerror`` and ``filename`` are
    set as on any :class:`OSError`."""


class FileNotFound(IoError, FileNotFoundError):
    """A file does not exist (``errno`` is ``ENOENT``, ``filename`` names it)."""


class InvalidState(UnacloudError):
    """The operation is not allowed in the object's current state."""


class InUse(UnacloudError):
    """The object is used by others (a template with VMs, an attached disk)."""


class AccessDenied(UnacloudError, PermissionError):
    """The hypervisor or the operating system refused access (also: an experiment that
    needs root run without it). For a file, ``errno`` and ``filename`` are set."""


class Timeout(UnacloudError, TimeoutError):
    """An operation did not finish within its time limit."""


class Unsupported(UnacloudError):
    """The backend cannot perform this operation on this machine."""


class InsufficientSpace(UnacloudError):
    """Not enough disk space at the destination."""


class PlacementError(UnacloudError):
    """Some VMs could not be placed on any host (the message says which and why)."""


class HypervisorError(UnacloudError):
    """The hypervisor failed; the message carries its own words."""


class ProtocolError(UnacloudError):
    """The global-snapshot protocol refused a message or an operation."""


class SimulationError(UnacloudError):
    """A simulation could not run (invalid configuration, livelock)."""
