"""The fields cax selects runs on, kept in indexed SQLite tables, and filters translated to them.

Why: the embedded store keeps each run as one BSON row; to answer a task's filter without decoding
every run, the fields the filters name are also kept as columns (one row per run in ``ix_doc``,
one row per array element in ``ix_data`` and ``ix_tags``), written in the same transaction as the
document. :func:`translate` turns a filter into an SQL condition on those tables that is true for
*at least* every matching run; the store decodes only those candidates and confirms each with the
exact matcher (:mod:`cax.runsdb.match`). So the translation may over-select, never under-select.

How it stays safe: every filter part is translated to a pair ``(pos, neg)`` of SQL conditions,
``pos`` true for every run that may match and ``neg`` true only for runs that surely match, so
negation (``$not``, ``$nor``, ``$ne``, ``$nin``) is ``(NOT neg, NOT pos)``; a part the translator
does not know is ``(TRUE, FALSE)``. Each column has a kind (string, number, boolean, date, present);
a value of another kind (an array, a sub-document, a number where a string is expected) is stored
as the marker ``X'00'`` ("odd"), which every ``pos`` admits and every ``neg`` excludes. A filter
that translates to ``TRUE`` is answered by a scan of the collection (correct, slower).
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Iterable, Mapping

import bson
from bson import ObjectId

__all__ = ["RUN_FIELDS", "ARRAYS", "SCHEMA", "INDEX_VERSION", "doc_rows", "translate",
           "TABLES", "covered", "unique_keys"]

STR, NUM, BOOL, DATE, PRESENT = "str", "num", "bool", "date", "present"
ODD = b"\x00"

#: run fields (dotted paths into sub-documents, not arrays) -> kind
RUN_FIELDS = {"number": NUM, "name": STR, "detector": STR, "start": DATE, "end": DATE,
              "trigger.events_built": NUM}
#: array fields -> {element field -> kind}: one SQL row per element
ARRAYS = {
    "data": {"host": STR, "type": STR, "status": STR, "pax_version": STR,
             "creation_place": STR, "source": STR, "location": STR, "moving_to": STR,
             "error_kind": STR, "checksum": PRESENT, "checksum_time": DATE,
             "reference_checked": BOOL, "permissions_set": BOOL, "permissions_error": PRESENT,
             "size": PRESENT, "files": PRESENT},
    "tags": {"name": STR},
}
#: bumped whenever the fields above change: a store indexed under another version is re-indexed
INDEX_VERSION = 1


def _col(path: str) -> str:
    return "c_" + path.replace(".", "_")


_DOC_COLS = [_col(f) for f in RUN_FIELDS] + [f"odd_{a}" for a in ARRAYS]
TABLES = ["ix_doc", "ix_unique"] + [f"ix_{a}" for a in ARRAYS]

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS ix_doc (rid INTEGER PRIMARY KEY, ns TEXT NOT NULL, "
    + ", ".join(_DOC_COLS) + ")",
    "CREATE INDEX IF NOT EXISTS ix_doc_number ON ix_doc (ns, c_number)",
    "CREATE INDEX IF NOT EXISTS ix_doc_name ON ix_doc (ns, c_name)",
    "CREATE INDEX IF NOT EXISTS ix_doc_start ON ix_doc (ns, c_start)",
    "CREATE INDEX IF NOT EXISTS ix_doc_detector ON ix_doc (ns, c_detector, c_number)",
    # unique indexes: one row per (index, key); the primary key enforces them across processes
    "CREATE TABLE IF NOT EXISTS ix_unique (ns TEXT NOT NULL, name TEXT NOT NULL, key BLOB NOT NULL,"
    " rid INTEGER NOT NULL, PRIMARY KEY (ns, name, key)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS ix_unique_rid ON ix_unique (rid)",
]
for _a, _fields in ARRAYS.items():
    SCHEMA.append(f"CREATE TABLE IF NOT EXISTS ix_{_a} (rid INTEGER NOT NULL, pos INTEGER NOT NULL, "
                  + ", ".join(_col(f) for f in _fields) + ", PRIMARY KEY (rid, pos)) WITHOUT ROWID")
SCHEMA += [
    "CREATE INDEX IF NOT EXISTS ix_data_hst ON ix_data (c_host, c_status, c_type, rid)",
    "CREATE INDEX IF NOT EXISTS ix_data_place ON ix_data (c_creation_place, c_status, rid)",
    "CREATE INDEX IF NOT EXISTS ix_data_location ON ix_data (c_location, rid)",
    "CREATE INDEX IF NOT EXISTS ix_tags_name ON ix_tags (c_name, rid)",
]


# -- values ---------------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _ms(t: datetime) -> int:
    """Milliseconds since the epoch, floored: the precision BSON (and MongoDB) keeps."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return (t - _EPOCH) // timedelta(milliseconds=1)


def _stored(kind: str, v):
    """The column value of ``v`` (None: null or missing; :data:`ODD`: another kind)."""
    if v is None:
        return None
    if kind == PRESENT:
        return ODD if isinstance(v, (list, dict)) else 1
    if kind == STR:
        return v if isinstance(v, str) else ODD
    if kind == BOOL:
        return int(v) if isinstance(v, bool) else ODD
    if kind == NUM:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (
                isinstance(v, float) and math.isnan(v)) and -(1 << 63) <= v < (1 << 63):
            return v
        return ODD
    if kind == DATE:
        return _ms(v) if isinstance(v, datetime) else ODD
    raise AssertionError(kind)


def _get(doc, path: str):
    """(found, value) of a dotted path through sub-documents; an array on the way is odd."""
    v = doc
    for p in path.split("."):
        if isinstance(v, list):
            return True, ODD
        if not isinstance(v, Mapping) or p not in v:
            return False, None
        v = v[p]
    return True, v


def doc_rows(doc: Mapping):
    """(``ix_doc`` values after rid and ns, {array: [element rows after rid]}) for ``doc``."""
    vals = []
    for path, kind in RUN_FIELDS.items():
        found, v = _get(doc, path)
        vals.append(ODD if v is ODD else _stored(kind, v))
    elems = {}
    for a, fields in ARRAYS.items():
        arr = doc.get(a)
        rows = []
        if isinstance(arr, list):
            for i, e in enumerate(arr):
                if isinstance(e, Mapping):
                    rows.append([i] + [_stored(k, e.get(f)) for f, k in fields.items()])
                else:
                    rows.append([i] + [ODD] * len(fields))
        elems[a] = rows
        vals.append(int(a in doc and not isinstance(arr, list)))
    return vals, elems


# -- translation ----------------------------------------------------------------------------------

T, F = ("1", ()), ("0", ())
UNKNOWN = (T, F)


class _Sql:
    """Tiny builder of SQL conditions with their parameters, folding TRUE/FALSE constants."""

    @staticmethod
    def and_(*parts):
        parts = [p for p in parts if p != T]
        if any(p == F for p in parts):
            return F
        if not parts:
            return T
        if len(parts) == 1:
            return parts[0]
        return ("(" + " AND ".join(p[0] for p in parts) + ")", tuple(x for p in parts for x in p[1]))

    @staticmethod
    def or_(*parts):
        parts = [p for p in parts if p != F]
        if any(p == T for p in parts):
            return T
        if not parts:
            return F
        if len(parts) == 1:
            return parts[0]
        return ("(" + " OR ".join(p[0] for p in parts) + ")", tuple(x for p in parts for x in p[1]))

    @staticmethod
    def not_(p):
        if p == T:
            return F
        if p == F:
            return T
        return ("NOT " + p[0], p[1])


S = _Sql


def _and(pairs):
    pairs = list(pairs)
    return S.and_(*(p for p, _ in pairs)), S.and_(*(n for _, n in pairs))


def _or(pairs):
    pairs = list(pairs)
    return S.or_(*(p for p, _ in pairs)), S.or_(*(n for _, n in pairs))


def _not(pair):
    pos, neg = pair
    return S.not_(neg), S.not_(pos)


def _query_value(kind: str, v):
    """('null',) | ('val', x) | ('other',) | ('present',) | None (cannot say)."""
    if v is None:
        return ("null",)
    if isinstance(v, (Mapping, list, tuple)) or hasattr(v, "pattern"):
        return None  # documents, arrays, regexes: left to the matcher
    if kind == PRESENT:
        return ("present",)
    s = _stored(kind, v)
    return ("other",) if s is ODD else ("val", s)


def _leaf(col: str, kind: str, op: str, arg):
    """(pos, neg) of one operator on one column."""
    odd = (f"{col} IS X'00'", ())

    def exact(cond):
        return S.or_(cond, odd), S.and_(cond, (f"{col} IS NOT X'00'", ()))

    if op == "$eq":
        q = _query_value(kind, arg)
        if q is None:
            return UNKNOWN
        if q[0] == "null":
            return exact((f"{col} IS NULL", ()))
        if q[0] == "present":
            return (f"{col} IS NOT NULL", ()), F
        if q[0] == "other":
            return odd, F
        return exact((f"{col} = ?", (q[1],)))
    if op == "$ne":
        return _not(_leaf(col, kind, "$eq", arg))
    if op == "$in":
        if not isinstance(arg, (list, tuple)):
            return UNKNOWN
        return _or(_leaf(col, kind, "$eq", a) for a in arg)
    if op == "$nin":
        return _not(_leaf(col, kind, "$in", arg))
    if op in ("$gt", "$gte", "$lt", "$lte"):
        q = _query_value(kind, arg)
        if q is None or q[0] in ("null", "present"):
            return UNKNOWN
        if q[0] == "other":
            return odd, F
        sym = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[op]
        return exact((f"({col} IS NOT NULL AND {col} {sym} ?)", (q[1],)))
    if op == "$not":
        if isinstance(arg, Mapping) and arg and all(str(k).startswith("$") for k in arg):
            return _not(_cond(col, kind, arg))
        return UNKNOWN
    return UNKNOWN


def _is_ops(cond) -> bool:
    return isinstance(cond, Mapping) and bool(cond) and all(
        isinstance(k, str) and k.startswith("$") for k in cond)


def _cond(col: str, kind: str, cond):
    """(pos, neg) of a field condition (an operator document or a value) on one column."""
    if not _is_ops(cond):
        return _leaf(col, kind, "$eq", cond)
    if "$regex" in cond or "$options" in cond:
        return UNKNOWN
    return _and(_leaf(col, kind, op, arg) for op, arg in cond.items())


def _elem_query(spec: Mapping, fields: Mapping, prefix: str):
    """(pos, neg) over one element row of a query on the element as a document."""
    parts = []
    for key, cond in spec.items():
        if key in ("$and", "$or", "$nor") and isinstance(cond, (list, tuple)) and cond:
            subs = [_elem_query(c, fields, prefix) if isinstance(c, Mapping) else UNKNOWN
                    for c in cond]
            parts.append(_and(subs) if key == "$and" else _or(subs) if key == "$or"
                         else _not(_or(subs)))
        elif key in fields:
            parts.append(_cond(f"{prefix}{_col(key)}", fields[key], cond))
        else:
            parts.append(UNKNOWN)
    return _and(parts)


def _in_elems(array: str, cond):
    if cond == F:
        return F
    where = "" if cond == T else " WHERE " + cond[0]
    return (f"d.rid IN (SELECT rid FROM ix_{array}{where})", cond[1])


def _array_field(array: str, cond):
    """(pos, neg) of a condition on the array itself (``$elemMatch``, ``$not``...)."""
    if not _is_ops(cond):
        return UNKNOWN
    fields = ARRAYS[array]
    parts = []
    for op, arg in cond.items():
        if op == "$elemMatch" and isinstance(arg, Mapping):
            if _is_ops(arg) and not any(k in ("$and", "$or", "$nor") for k in arg):
                pos, neg = UNKNOWN  # operators on scalar elements: any element may do
            else:
                pos, neg = _elem_query(arg, fields, "")
            parts.append((_in_elems(array, pos), _in_elems(array, neg)))
        elif op == "$not" and _is_ops(arg):
            parts.append(_not(_array_field(array, arg)))
        else:
            parts.append(UNKNOWN)
    return _and(parts)


_POSITIVE = ("$eq", "$in", "$gt", "$gte", "$lt", "$lte")


def _dotted_array(array: str, field: str, cond):
    """``{'data.host': ...}``: some element (or a non-array ``data`` sub-document) satisfies it.
    Each operator may be satisfied by a different element, as in MongoDB."""
    kind = ARRAYS[array][field]
    col = _col(field)
    ops = dict(cond) if _is_ops(cond) else {"$eq": cond}
    if "$regex" in ops or "$options" in ops:
        return UNKNOWN
    odd = (f"d.odd_{array} = 1", ())
    parts = []
    for op, arg in ops.items():
        if op in ("$ne", "$nin"):
            parts.append(_not(_dotted_array(array, field, {"$eq" if op == "$ne" else "$in": arg})))
            continue
        values = arg if op == "$in" else [arg]
        if op not in _POSITIVE or not isinstance(values, (list, tuple)) or any(
                v is None for v in values):
            parts.append(UNKNOWN)  # null also matches a run without the array: the matcher says
            continue
        pos, neg = _leaf(col, kind, op, arg)
        parts.append((S.or_(_in_elems(array, pos), odd), _in_elems(array, neg)))
    return _and(parts)


def _id_values(arg):
    """The BSON keys (as the ``docs.id`` column holds them) a value of ``_id`` equals, or None."""
    if isinstance(arg, bool) or arg is None:
        return None
    if isinstance(arg, (str, ObjectId)):
        return [bson.encode({"_id": arg})]
    if isinstance(arg, int) and -(1 << 63) <= arg < (1 << 63):
        keys = {bson.encode({"_id": arg}), bson.encode({"_id": float(arg)})}
        if -(1 << 31) <= arg < (1 << 31):
            keys.add(bson.encode({"_id": bson.Int64(arg)}))
        return sorted(keys)
    return None


def _id_cond(cond):
    ops = dict(cond) if _is_ops(cond) else {"$eq": cond}
    parts = []
    for op, arg in ops.items():
        if op in ("$eq", "$in"):
            values = arg if op == "$in" else [arg]
            if not isinstance(values, (list, tuple)):
                parts.append(UNKNOWN)
                continue
            keys = []
            for v in values:
                k = _id_values(v)
                if k is None:
                    keys = None
                    break
                keys.extend(k)
            if keys is None:
                parts.append(UNKNOWN)
            elif not keys:
                parts.append((F, F))
            else:
                c = (f"d.rid IN (SELECT rowid FROM docs WHERE ns = d.ns AND id IN "
                     f"({', '.join('?' * len(keys))}))", tuple(keys))
                parts.append((c, c))
        elif op in ("$ne", "$nin"):
            parts.append(_not(_id_cond({"$eq" if op == "$ne" else "$in": arg})))
        else:
            parts.append(UNKNOWN)
    return _and(parts)


def _query(filt: Mapping):
    parts = []
    for key, cond in filt.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(cond, (list, tuple)) or not cond:
                parts.append(UNKNOWN)
                continue
            subs = [_query(c) if isinstance(c, Mapping) else UNKNOWN for c in cond]
            parts.append(_and(subs) if key == "$and" else _or(subs) if key == "$or"
                         else _not(_or(subs)))
        elif key == "_id":
            parts.append(_id_cond(cond))
        elif key in RUN_FIELDS:
            parts.append(_cond(f"d.{_col(key)}", RUN_FIELDS[key], cond))
        elif key in ARRAYS:
            parts.append(_array_field(key, cond))
        elif "." in key and key.split(".", 1)[0] in ARRAYS \
                and key.split(".", 1)[1] in ARRAYS[key.split(".", 1)[0]]:
            a, f = key.split(".", 1)
            parts.append(_dotted_array(a, f, cond))
        else:
            parts.append(UNKNOWN)
    return _and(parts)


def translate(filt: Mapping):
    """An SQL condition on ``ix_doc d`` true for every run ``filt`` may match (with its
    parameters), or None when the translation cannot narrow anything (scan)."""
    pos, _ = _query(filt)
    if pos == T:
        return None
    return pos


def covered(filt: Mapping) -> bool:
    """Whether ``filt`` is answered from the index (not by a scan)."""
    return translate(filt) is not None


def unique_keys(doc: Mapping, keys: Iterable, options: Mapping) -> list:
    """The keys ``doc`` takes in a unique index on ``keys`` ([(path, direction)]); none when a
    sparse index does not cover it. Numbers that MongoDB takes as equal get one key."""
    from cax.runsdb.match import MISSING, matches, values_at

    pfe = options.get("partialFilterExpression")
    if pfe is not None and not matches(doc, pfe):
        return []
    per_field = []
    present = False
    for path, _ in keys:
        vals = [v for v in values_at(doc, path)]
        flat = []
        for v in vals:
            if isinstance(v, list) and v:
                flat.extend(v)
            else:
                flat.append(v)
        if any(v is not MISSING for v in flat):
            present = True
        flat = [None if v is MISSING else _norm_key(v) for v in flat]
        uniq = []
        for v in flat:
            if v not in uniq:
                uniq.append(v)
        per_field.append(uniq or [None])
    if options.get("sparse") and not present:
        return []
    out = [[]]
    for vals in per_field:
        out = [o + [v] for o in out for v in vals]
    return [bson.encode({"k": o}) for o in out]


def _norm_key(v):
    if isinstance(v, float) and v.is_integer() and -(1 << 63) <= v < (1 << 63):
        return int(v)
    return v  # datetimes: BSON keeps milliseconds, as MongoDB compares them
