"""Serving without Ray: request schema, resolution of tag sets / ensembles / compositions, the catalogue,
batched prediction and generation (:class:`~tagray.serving.predictor.Predictor`) and the HTTP app.

``tagray predict`` and the Ray Serve deployments (:mod:`tagray.ray.serve`) both use this package, so a
request means the same thing, and fails the same way, on the command line and over HTTP.

Imports here are lazy: :mod:`tagray.tasks` imports :mod:`.schema` (``MAX_CHARS``) while the predictor
imports :mod:`tagray.tasks`, so importing the package must not pull the predictor in.
"""

from __future__ import annotations

__all__ = ["Predictor", "load_registry_lenient"]


def __getattr__(name: str):
    if name in __all__:
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
