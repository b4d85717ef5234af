"""User-facing errors. Every one names the field (config key, column, tag) that is wrong."""

from __future__ import annotations


class TagrayError(Exception):
    """Base class for errors caused by user input; the CLI maps them to exit code 2, Serve to HTTP 4xx."""

    status = 400

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # picklable across processes (Ray re-raises errors from workers and replicas)
        return (type(self), (self.field, self.message))

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "field": self.field, "message": self.message}


class ConfigError(TagrayError):
    """A configuration file or option is invalid."""

    status = 422


class InputError(TagrayError):
    """A data row or request field is invalid (bad SMILES, non-amino-acid letters, missing column...)."""

    status = 422


class UnknownTagError(TagrayError):
    """A tag, head or ensemble name is not in the registry."""

    status = 404


class FingerprintMismatch(TagrayError):
    """Tags were trained on another base model than the one they are loaded onto."""

    status = 409
