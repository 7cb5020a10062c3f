"""Exceptions raised by sara_train. All derive from ``SaRAError`` (a ``ValueError``)."""


class SaRAError(ValueError):
    """Base class: bad configuration or bad input given to sara_train."""


class DeltaFormatError(SaRAError):
    """A file is not a valid SaRA delta (or not a safetensors file at all)."""


class DeltaMismatchError(SaRAError):
    """A delta does not fit the model or state dict it is applied to (key, shape or base weights)."""
