"""MongoDB projections (``{'number': 1, 'data.host': 1}``, ``{'_id': 0}``) applied in Python.

Why here: the embedded store decodes only the runs a query returns and hands back just the fields
the task asked for (a task's projection keeps its working set small), with MongoDB's rules:
``_id`` is included unless excluded, a dotted path keeps that sub-field of every array element,
inclusion and exclusion do not mix (except ``_id``).
"""
from __future__ import annotations

import copy
from typing import Mapping

from pymongo.errors import OperationFailure

__all__ = ["project"]


def project(doc: dict, projection) -> dict:
    """``doc`` as ``projection`` shapes it; the result shares no mutable part with ``doc``."""
    if projection is None:
        return copy.deepcopy(doc)
    if isinstance(projection, (list, tuple)):
        projection = {k: 1 for k in projection}
    if not isinstance(projection, Mapping):
        raise TypeError("projection must be a mapping or a list of field names")
    if not projection:
        return copy.deepcopy(doc)
    spec = dict(projection)
    keep_id = bool(spec.pop("_id", 1))
    for k, v in spec.items():
        if isinstance(v, Mapping) or (isinstance(k, str) and k.endswith(".$")):
            raise OperationFailure(f"projection operator not supported: {k}", 2)
    modes = {bool(v) for v in spec.values()}
    if len(modes) > 1:
        raise OperationFailure("projection cannot mix inclusion and exclusion", 31254)
    if not spec or modes == {False}:
        out = copy.deepcopy(doc)
        for path in spec:
            _exclude(out, path.split("."))
        if not keep_id:
            out.pop("_id", None)
        return out
    out = {}
    if keep_id and "_id" in doc:
        out["_id"] = copy.deepcopy(doc["_id"])
    tree: dict = {}
    for path in spec:
        node = tree
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if node is True:
                break
        else:
            node[parts[-1]] = True
    _include(doc, tree, out)
    return out


def _include(src: Mapping, tree: dict, out: dict) -> None:
    for k, sub in tree.items():
        if k not in src:
            continue
        v = src[k]
        if sub is True:
            out[k] = copy.deepcopy(v)
        elif isinstance(v, Mapping):
            inner: dict = {}
            _include(v, sub, inner)
            out[k] = inner
        elif isinstance(v, list):
            items = []
            for e in v:
                if isinstance(e, Mapping):
                    inner = {}
                    _include(e, sub, inner)
                    items.append(inner)
            out[k] = items


def _exclude(doc, parts) -> None:
    if isinstance(doc, list):
        for e in doc:
            _exclude(e, parts)
        return
    if not isinstance(doc, dict) or parts[0] not in doc:
        return
    if len(parts) == 1:
        del doc[parts[0]]
    else:
        _exclude(doc[parts[0]], parts[1:])
