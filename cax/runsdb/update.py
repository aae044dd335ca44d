"""MongoDB update operators applied in Python: the writes the embedded store executes.

Why cax's own: the store must apply exactly what a MongoDB server would for the updates cax's
transitions build (:mod:`cax.runsdb.lifecycle`): ``$set``/``$unset`` of ``data.$.field`` (the
datum the filter's array condition matched) and ``data.<i>.field``, ``$push`` (the claim),
``$pull`` by a condition, ``$inc``, plus ``$setOnInsert``, ``$addToSet``, ``$min``/``$max`` and
upserts. An operator outside that set raises :class:`pymongo.errors.WriteError` rather than being
ignored. Updates work on a copy: a failing update leaves the caller's document as it was.
"""
from __future__ import annotations

import copy
from typing import Mapping

from pymongo.errors import WriteError

from cax.runsdb.match import compare, equal, field_matches, first_match_index, matches, normalize

__all__ = ["apply_update", "upsert_seed", "is_operator_update"]

_OPS = ("$set", "$unset", "$inc", "$push", "$pull", "$setOnInsert", "$addToSet", "$min", "$max")


def is_operator_update(update: Mapping) -> bool:
    return bool(update) and all(isinstance(k, str) and k.startswith("$") for k in update)


def apply_update(doc: dict, update: Mapping, filt: Mapping, *, inserting: bool = False) -> dict:
    """The document ``update`` makes of ``doc`` (matched by ``filt``, which locates ``$``)."""
    if not is_operator_update(update):
        raise ValueError("update only works with $ operators")
    out = copy.deepcopy(doc)
    for op, fields in update.items():
        if op not in _OPS:
            raise WriteError(f"unknown update operator: {op}", 9)
        if not isinstance(fields, Mapping):
            raise WriteError(f"modifier {op} needs a document", 9)
        if op == "$setOnInsert" and not inserting:
            continue
        for path, value in fields.items():
            parts = _resolve(doc, filt, path)
            if parts[0] == "_id" and op != "$setOnInsert" and not inserting:
                old = doc.get("_id")
                if op != "$set" or not equal(old, value):
                    raise WriteError("Performing an update on the path '_id' would modify the "
                                     "immutable field '_id'", 66)
            _apply(out, op, parts, normalize(value) if op != "$pull" else value)
    return out


def _resolve(doc, filt, path: str) -> list:
    parts = path.split(".")
    if "$" in parts:
        i = parts.index("$")
        array = ".".join(parts[:i])
        if "." in array:
            raise WriteError(f"positional operator under a nested path not supported: {path}", 2)
        idx = first_match_index(doc, filt, array)
        if idx is None:
            raise WriteError("The positional operator did not find the match needed from the "
                             "query.", 2)
        parts[i] = str(idx)
    return parts


def _container(root, parts, create: bool):
    """(container, last key) for ``parts``; intermediate documents made when ``create``."""
    node = root
    for p in parts[:-1]:
        if isinstance(node, list):
            if not p.isdigit():
                raise WriteError(f"cannot use the part ({p}) to traverse an array", 28)
            i = int(p)
            while create and len(node) <= i:
                node.append(None)
            if i >= len(node):
                return None, None
            if node[i] is None and create:
                node[i] = {}
            node = node[i]
        elif isinstance(node, dict):
            if p not in node:
                if not create:
                    return None, None
                node[p] = {}
            node = node[p]
        else:
            if not create:
                return None, None
            raise WriteError(f"cannot create field '{p}' in element {node!r}", 28)
    return node, parts[-1]


def _get(node, key):
    if isinstance(node, list):
        i = int(key) if key.isdigit() else None
        return node[i] if i is not None and i < len(node) else _NONE
    return node.get(key, _NONE) if isinstance(node, dict) else _NONE


def _put(node, key, value):
    if isinstance(node, list):
        if not key.isdigit():
            raise WriteError(f"cannot use the part ({key}) to traverse an array", 28)
        i = int(key)
        while len(node) <= i:
            node.append(None)
        node[i] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise WriteError(f"cannot create field '{key}' in element {node!r}", 28)


_NONE = object()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _apply(root, op, parts, value):
    if op == "$unset":
        node, key = _container(root, parts, create=False)
        if node is None:
            return
        if isinstance(node, list):
            if key.isdigit() and int(key) < len(node):
                node[int(key)] = None  # MongoDB leaves a null in the array's place
        elif isinstance(node, dict):
            node.pop(key, None)
        return
    node, key = _container(root, parts, create=True)
    old = _get(node, key)
    if op in ("$set", "$setOnInsert"):
        _put(node, key, copy.deepcopy(value))
    elif op == "$inc":
        if not _number(value):
            raise WriteError("Cannot increment with non-numeric argument", 14)
        if old is _NONE:
            _put(node, key, value)
        elif not _number(old):
            raise WriteError(f"Cannot apply $inc to a value of non-numeric type", 14)
        else:
            _put(node, key, old + value)
    elif op in ("$min", "$max"):
        c = None if old is _NONE else compare(value, old)
        if c is None or (op == "$min" and c < 0) or (op == "$max" and c > 0):
            _put(node, key, copy.deepcopy(value))
    elif op in ("$push", "$addToSet"):
        each = value["$each"] if isinstance(value, Mapping) and "$each" in value else [value]
        if old is _NONE:
            old = []
            _put(node, key, old)
        elif not isinstance(old, list):
            raise WriteError(f"The field '{'.'.join(parts)}' must be an array", 2)
        for v in each:
            if op == "$addToSet" and any(equal(v, e) for e in old):
                continue
            old.append(copy.deepcopy(v))
    elif op == "$pull":
        if old is _NONE:
            return
        if not isinstance(old, list):
            raise WriteError("Cannot apply $pull to a non-array value", 2)
        old[:] = [e for e in old if not _pulls(e, value)]


def _pulls(element, cond) -> bool:
    if isinstance(cond, Mapping) and cond and all(k.startswith("$") for k in cond) \
            and not any(k in ("$and", "$or", "$nor") for k in cond):
        return field_matches([element], cond)
    if isinstance(cond, Mapping):
        return isinstance(element, Mapping) and matches(element, cond)
    return equal(element, cond)


def upsert_seed(filt: Mapping) -> dict:
    """The document an upsert starts from: the filter's equality conditions (top level and in
    ``$and``), as MongoDB builds it."""
    seed: dict = {}
    for key, cond in filt.items():
        if key == "$and":
            for f in cond:
                seed.update(upsert_seed(f))
        elif key.startswith("$"):
            continue
        elif isinstance(cond, Mapping) and cond and all(str(k).startswith("$") for k in cond):
            if "$eq" in cond:
                _apply(seed, "$set", key.split("."), normalize(cond["$eq"]))
        else:
            _apply(seed, "$set", key.split("."), normalize(cond))
    return seed
