"""MongoDB query semantics in Python: whether a document matches a filter, and how values order.

Why cax has its own: the embedded store must give exactly MongoDB's answers for the filters cax
sends, without a test fake at run time. The maintained matcher on PyPI (``mongoquery`` 1.4.3) was
tried first and gives other answers on rules cax depends on: ``{'pax_version': None}`` does not
match a datum without the field (every datum key of raw data relies on it), ``$ne`` over an array
field matches when an element equals the value, and ``{'number': True}`` matches ``1``. This module
implements the subset of the query language cax and its tests use, with MongoDB's rules for
missing fields, arrays (a condition holds if the array or any element satisfies it), type brackets
(``$lt`` compares only values of one type bracket) and the BSON sort order. An operator outside
that subset raises :class:`pymongo.errors.OperationFailure`, as a server does for one it does not
know, never a silent wrong answer.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

from bson import ObjectId
from bson.regex import Regex
from pymongo.errors import OperationFailure

__all__ = ["matches", "compare", "sort_key", "values_at", "MISSING", "equal", "first_match_index",
           "field_matches", "normalize"]


class _Missing:
    """A path that leads nowhere (distinct from an explicit ``None``)."""

    def __repr__(self):
        return "MISSING"


MISSING = _Missing()

_LOGICAL = ("$and", "$or", "$nor")
_UTC = timezone.utc


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=_UTC) if t.tzinfo is None else t.astimezone(_UTC)


# -- the BSON order -------------------------------------------------------------------------------

def _rank(v) -> int:
    """The BSON comparison order's type bracket (MinKey < null < numbers < strings < ...)."""
    if v is MISSING or v is None:
        return 1
    if isinstance(v, bool):
        return 8
    if isinstance(v, (int, float)):
        return 2
    if isinstance(v, str):
        return 3
    if isinstance(v, Mapping):
        return 4
    if isinstance(v, (list, tuple)):
        return 5
    if isinstance(v, (bytes, bytearray)):
        return 6
    if isinstance(v, ObjectId):
        return 7
    if isinstance(v, datetime):
        return 9
    if isinstance(v, (re.Pattern, Regex)):
        return 11
    return 12


def compare(a, b) -> int:
    """-1, 0 or 1 in MongoDB's order (values of different brackets order by bracket)."""
    ra, rb = _rank(a), _rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if ra == 1:
        return 0
    if ra == 4:
        ia, ib = list(a.items()), list(b.items())
        for (ka, va), (kb, vb) in zip(ia, ib):
            c = compare(va, vb)
            if c:
                return c
            if ka != kb:
                return -1 if ka < kb else 1
        return (len(ia) > len(ib)) - (len(ia) < len(ib))
    if ra == 5:
        for x, y in zip(a, b):
            c = compare(x, y)
            if c:
                return c
        return (len(a) > len(b)) - (len(a) < len(b))
    if ra == 9:
        a, b = _utc(a), _utc(b)
    elif ra == 11:
        a, b = _pattern(a).pattern, _pattern(b).pattern
    elif ra == 12:
        a, b = repr(a), repr(b)
    return (a > b) - (a < b)


def equal(a, b) -> bool:
    """MongoDB equality: numbers across int/float, never bool with number; documents in order."""
    if a is MISSING or b is MISSING:
        return a is b or (a is None or b is None)
    ra, rb = _rank(a), _rank(b)
    if ra != rb:
        return False
    if ra == 4:
        return list(a.keys()) == list(b.keys()) and all(equal(a[k], b[k]) for k in a)
    if ra == 5:
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return compare(a, b) == 0


class _Key:
    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    def __lt__(self, other):
        return compare(self.v, other.v) < 0

    def __eq__(self, other):
        return compare(self.v, other.v) == 0


def sort_key(doc: Mapping, spec: list) -> tuple:
    """A key for ``sorted`` giving MongoDB's order for ``spec`` = [(path, 1 | -1), ...].

    An array sorts by its smallest element ascending and its largest descending, as in MongoDB.
    """
    out = []
    for path, direction in spec:
        vals = []
        for v in values_at(doc, path):
            if isinstance(v, list) and v:
                vals.extend(v)
            else:
                vals.append(None if v is MISSING else v)
        pick = min if direction >= 0 else max
        v = pick((_Key(x) for x in vals), default=_Key(None)).v if vals else None
        out.append(_Key(v) if direction >= 0 else _Rev(v))
    return tuple(out)


class _Rev(_Key):
    def __lt__(self, other):
        return compare(self.v, other.v) > 0


# -- paths ----------------------------------------------------------------------------------------

def values_at(doc, path: str) -> list:
    """Every value ``path`` reaches in ``doc``, descending into arrays as MongoDB does (an
    array on the way is searched element by element, and indexed by a numeric part); a branch
    that leads nowhere gives :data:`MISSING`."""
    return list(_walk(doc, path.split(".")))


def _walk(value, parts) -> Iterator:
    if not parts:
        yield value
        return
    head, rest = parts[0], parts[1:]
    if isinstance(value, Mapping):
        yield from _walk(value.get(head, MISSING), rest) if head in value else _walk(MISSING, rest)
        return
    if isinstance(value, list):
        found = False
        if head.isdigit():
            i = int(head)
            if i < len(value):
                found = True
                yield from _walk(value[i], rest)
        for e in value:
            if isinstance(e, Mapping):
                if head in e:
                    found = True
                    yield from _walk(e[head], rest)
                elif not head.isdigit():
                    found = True
                    yield MISSING
        if not found and head.isdigit():
            yield MISSING
        return  # an empty array, or one of scalars, gives no value (MongoDB: no null match)
    yield MISSING


# -- matching -------------------------------------------------------------------------------------

def matches(doc: Mapping, filt: Mapping) -> bool:
    """Whether ``doc`` matches the MongoDB filter ``filt``."""
    for key, cond in filt.items():
        if key == "$and":
            if not all(matches(doc, f) for f in _clauses(key, cond)):
                return False
        elif key == "$or":
            if not any(matches(doc, f) for f in _clauses(key, cond)):
                return False
        elif key == "$nor":
            if any(matches(doc, f) for f in _clauses(key, cond)):
                return False
        elif key == "$comment":
            continue
        elif key.startswith("$"):
            raise OperationFailure(f"unknown top level operator: {key}", 2)
        elif not field_matches(values_at(doc, key), cond):
            return False
    return True


def _clauses(op, cond) -> list:
    if not isinstance(cond, (list, tuple)) or not cond:
        raise OperationFailure(f"{op} must be a nonempty array", 2)
    return cond


def _is_ops(cond) -> bool:
    return isinstance(cond, Mapping) and bool(cond) and all(
        isinstance(k, str) and k.startswith("$") for k in cond)


def field_matches(values: list, cond) -> bool:
    """Whether the values a path reached satisfy ``cond`` (an operator document or a value)."""
    if not _is_ops(cond):
        return _eq_any(values, cond)
    if "$regex" in cond:
        cond = dict(cond)
        pattern = _regex(cond.pop("$regex"), cond.pop("$options", ""))
        if not _any_scalar(values, lambda v: isinstance(v, str) and bool(pattern.search(v))):
            return False
        if not cond:
            return True
    return all(_op(values, op, arg) for op, arg in cond.items())


def _pattern(p) -> re.Pattern:
    if isinstance(p, Regex):
        return p.try_compile()
    return p


def _regex(p, options: str = "") -> re.Pattern:
    if isinstance(p, (re.Pattern, Regex)):
        return _pattern(p)
    flags = 0
    for o in options or "":
        flags |= {"i": re.I, "m": re.M, "s": re.S, "x": re.X}.get(o, 0)
    return re.compile(p, flags)


def _any_scalar(values, test) -> bool:
    """A condition on a value holds if the value or, for an array, any element satisfies it."""
    for v in values:
        if test(v):
            return True
        if isinstance(v, list) and any(test(e) for e in v):
            return True
    return False


def _eq_one(v, target) -> bool:
    if isinstance(target, (re.Pattern, Regex)):
        return isinstance(v, str) and bool(_pattern(target).search(v))
    if target is None:
        return v is None or v is MISSING
    return v is not MISSING and equal(v, target)


def _eq_any(values, target) -> bool:
    return _any_scalar(values, lambda v: _eq_one(v, target))


def _cmp(values, arg, ok) -> bool:
    if arg is None:  # $gte/$lte null match null and missing; $gt/$lt null match nothing
        return ok(0) and _any_scalar(values, lambda v: v is None or v is MISSING)
    r = _rank(arg)
    return _any_scalar(values, lambda v: v is not MISSING and _rank(v) == r
                       and ok(compare(v, arg)))


def _op(values: list, op: str, arg) -> bool:
    if op == "$eq":
        return _eq_any(values, arg)
    if op == "$ne":
        return not _eq_any(values, arg)
    if op == "$gt":
        return _cmp(values, arg, lambda c: c > 0)
    if op == "$gte":
        return _cmp(values, arg, lambda c: c >= 0)
    if op == "$lt":
        return _cmp(values, arg, lambda c: c < 0)
    if op == "$lte":
        return _cmp(values, arg, lambda c: c <= 0)
    if op == "$in":
        if not isinstance(arg, (list, tuple)):
            raise OperationFailure("$in needs an array", 2)
        return any(_eq_any(values, a) for a in arg)
    if op == "$nin":
        if not isinstance(arg, (list, tuple)):
            raise OperationFailure("$nin needs an array", 2)
        return not any(_eq_any(values, a) for a in arg)
    if op == "$exists":
        return any(v is not MISSING for v in values) == bool(arg)
    if op == "$not":
        if isinstance(arg, (re.Pattern, Regex)):
            return not field_matches(values, {"$regex": arg})
        if not _is_ops(arg):
            raise OperationFailure("$not needs a regex or a document of operators", 2)
        return not field_matches(values, arg)
    if op == "$elemMatch":
        if not isinstance(arg, Mapping):
            raise OperationFailure("$elemMatch needs an Object", 2)
        return any(isinstance(v, list) and any(_elem(e, arg) for e in v) for v in values)
    if op == "$size":
        return any(isinstance(v, list) and len(v) == arg for v in values)
    if op == "$all":
        if not isinstance(arg, (list, tuple)):
            raise OperationFailure("$all needs an array", 2)
        if not arg:
            return False
        return all(_op(values, "$elemMatch", a["$elemMatch"])
                   if isinstance(a, Mapping) and set(a) == {"$elemMatch"}
                   else _eq_any(values, a) for a in arg)
    if op == "$options":
        raise OperationFailure("$options needs a $regex", 2)
    if op == "$type":
        names = arg if isinstance(arg, (list, tuple)) else [arg]
        return _any_scalar(values, lambda v: v is not MISSING and any(_is_type(v, n) for n in names))
    raise OperationFailure(f"unknown operator: {op}", 2)


_TYPES = {"double": float, "string": str, "object": dict, "array": list, "objectId": ObjectId,
          "bool": bool, "date": datetime, "null": type(None), "int": int, "long": int}


def _is_type(v, name) -> bool:
    if name == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    t = _TYPES.get(name)
    if t is None:
        raise OperationFailure(f"unknown $type {name!r}", 2)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, t)


def _elem(element, spec: Mapping) -> bool:
    """One array element against an ``$elemMatch`` spec: operators on the element itself, or a
    query on it as a document (``$and``/``$or``/``$nor`` allowed)."""
    if _is_ops(spec) and not any(k in _LOGICAL for k in spec):
        return field_matches([element], spec)
    if not isinstance(element, Mapping):
        return False
    return matches(element, spec)


def first_match_index(doc: Mapping, filt: Mapping, array: str):
    """The index of the first element of ``doc[array]`` the filter's conditions on that array
    match: what MongoDB's positional ``array.$`` update addresses. None if there is none."""
    arr = doc.get(array)
    if not isinstance(arr, list):
        return None
    conds = list(_array_conditions(filt, array))
    if not conds:
        return None
    for i, e in enumerate(arr):
        if all(test(e) for test in conds):
            return i
    for i, e in enumerate(arr):
        if conds[0](e):
            return i
    return None


def _array_conditions(filt: Mapping, array: str):
    for key, cond in filt.items():
        if key == "$and":
            for f in cond:
                yield from _array_conditions(f, array)
        elif key == array and isinstance(cond, Mapping) and "$elemMatch" in cond:
            spec = cond["$elemMatch"]
            yield lambda e, spec=spec: _elem(e, spec)
        elif key.startswith(array + "."):
            sub = key[len(array) + 1:]
            if sub.split(".")[0].isdigit():
                continue
            yield lambda e, sub=sub, cond=cond: isinstance(e, Mapping) and field_matches(
                values_at(e, sub), cond)


def normalize(value: Any) -> Any:
    """Datetimes as MongoDB stores them (UTC, milliseconds): a filter's values compare as the
    server would compare them after encoding."""
    if isinstance(value, datetime):
        t = _utc(value)
        return t.replace(microsecond=t.microsecond // 1000 * 1000)
    if isinstance(value, Mapping):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    return value
