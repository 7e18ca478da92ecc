"""The config side of ``data=mixture``: what a mixture node is and the problems of its own keys
(the sampling is :mod:`mmbridge.data.mixture`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The ``name`` of a mixture node.
MIXTURE = "mixture"


def is_mixture(node: object) -> bool:
    """Whether a config node is a mixture of data sets."""
    return hasattr(node, "get") and node.get("name") == MIXTURE


def mixture_errors(node: Mapping[str, Any], key: str) -> list[str]:
    """Problems of a mixture node's own keys (``sources`` a non-empty list of mappings, each
    ``weight`` a number > 0, ``size`` null or >= 1); each source's data-set arguments are the
    caller's to check."""
    get = node.get
    extra = [k for k in node if k not in ("name", "sources", "size")]
    errors = [f"{key}.{k}: not a key of a mixture (keys: name, sources, size)" for k in extra]
    size = get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        errors.append(f"{key}.size={size!r}: expected null or an integer >= 1")
    sources = get("sources")
    if not isinstance(sources, Sequence) or isinstance(sources, str) or not sources:
        return [
            *errors,
            f"{key}.sources={sources!r}: expected a non-empty list of data-set "
            "nodes, each with a weight, e.g. "
            "[{name: llava, train: ..., weight: 1}]",
        ]
    for i, src in enumerate(sources):
        w = src.get("weight") if isinstance(src, Mapping) else None
        if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:
            errors.append(
                f"{key}.sources.{i}.weight={w!r}: expected a number > 0 "
                f"(the source's share of the draws, normalised over the sources)"
            )
    return errors
