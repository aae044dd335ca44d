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
as the marker ``X'00'`` and flags its row ``odd``; conditions are written for normal rows (so
SQLite can use a multi-column index), and every ``pos`` admits the odd rows, every ``neg``
excludes them. Conditions are NULL-safe (``IS``), so a missing field never turns ``NOT`` into
NULL. A filter that translates to ``TRUE`` is answered by a scan of the collection.
"""
from __future__ import annotations

import contextvars
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


_DOC_COLS = [_col(f) for f in RUN_FIELDS] + ["odd"] + [f"odd_{a}" for a in ARRAYS]
TABLES = ["ix_doc", "ix_unique"] + [f"ix_{a}" for a in ARRAYS]

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS ix_doc (rid INTEGER PRIMARY KEY, ns TEXT NOT NULL, "
    + ", ".join(_DOC_COLS) + ")",
    # no ns prefix: the ns term is a filter (``+d.ns``), so SQLite drives a query from the
    # narrowest condition, never from a walk over a whole namespace
    "CREATE INDEX IF NOT EXISTS ix_doc_ns ON ix_doc (ns)",
    "CREATE INDEX IF NOT EXISTS ix_doc_number ON ix_doc (c_number)",
    "CREATE INDEX IF NOT EXISTS ix_doc_name ON ix_doc (c_name)",
    "CREATE INDEX IF NOT EXISTS ix_doc_start ON ix_doc (c_start)",
    "CREATE INDEX IF NOT EXISTS ix_doc_detector ON ix_doc (c_detector, c_number)",
    "CREATE INDEX IF NOT EXISTS ix_doc_odd ON ix_doc (odd) WHERE odd = 1",
    "CREATE INDEX IF NOT EXISTS ix_doc_odd_arrays ON ix_doc (rid) WHERE "
    + " OR ".join(f"odd_{a} = 1" for a in ARRAYS),
    # unique indexes: one row per (index, key); the primary key enforces them across processes
    "CREATE TABLE IF NOT EXISTS ix_unique (ns TEXT NOT NULL, name TEXT NOT NULL, key BLOB NOT NULL,"
    " rid INTEGER NOT NULL, PRIMARY KEY (ns, name, key)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS ix_unique_rid ON ix_unique (rid)",
]
for _a, _fields in ARRAYS.items():
    SCHEMA.append(f"CREATE TABLE IF NOT EXISTS ix_{_a} (rid INTEGER NOT NULL, pos INTEGER NOT NULL, "
                  + ", ".join(_col(f) for f in _fields)
                  + ", odd INTEGER NOT NULL, PRIMARY KEY (rid, pos)) WITHOUT ROWID")
    SCHEMA.append(f"CREATE INDEX IF NOT EXISTS ix_{_a}_odd ON ix_{_a} (odd) WHERE odd = 1")
SCHEMA_TABLES = [stmt for stmt in SCHEMA if stmt.startswith("CREATE TABLE")]
# what the tasks ask for: this site's datums in a status, with one more condition each
SCHEMA += [f"CREATE INDEX IF NOT EXISTS ix_data_hs_{c.replace(', c_', '_')} ON ix_data "
           f"(c_host, c_status, c_{c})"
           for c in ("type, c_checksum", "reference_checked", "checksum", "size", "files",
                     "permissions_set", "checksum_time")]
SCHEMA += [
    "CREATE INDEX IF NOT EXISTS ix_data_place ON ix_data (c_creation_place, c_status)",
    "CREATE INDEX IF NOT EXISTS ix_data_location ON ix_data (c_location)",
    "CREATE INDEX IF NOT EXISTS ix_tags_name ON ix_tags (c_name)",
]


# -- values ---------------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _ms(t: datetime) -> int:
    """Milliseconds since the epoch, floored: the precision BSON (and MongoDB) keeps."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return (t - _EPOCH) // timedelta(milliseconds=1)


def _stored(kind: str, v):
    """The column value of ``v`` (None: null or missing; :data:`ODD`: another kind). A
    "present" column holds 1 for any value and 0 for null or missing."""
    if v is None:
        return 0 if kind == PRESENT else None
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
    vals.append(int(any(v is ODD for v in vals)))
    elems = {}
    for a, fields in ARRAYS.items():
        arr = doc.get(a)
        rows = []
        if isinstance(arr, list):
            for i, e in enumerate(arr):
                if isinstance(e, Mapping):
                    row = [_stored(k, e.get(f)) for f, k in fields.items()]
                    rows.append([i] + row + [int(any(v is ODD for v in row))])
                else:
                    rows.append([i] + [ODD] * len(fields) + [1])
        elems[a] = rows
        vals.append(int(a in doc and not isinstance(arr, list)))
    return vals, elems


# -- translation ----------------------------------------------------------------------------------

T, F = ("T",), ("F",)
UNKNOWN = (T, F)


def L(text: str, params: tuple = ()):
    """A leaf condition: SQL text and its parameters."""
    return ("sql", text, tuple(params))


class _Sql:
    """Conditions as small trees (rendered by :func:`render`), folding TRUE/FALSE constants."""

    @staticmethod
    def and_(*parts):
        parts = [p for p in parts if p != T]
        if any(p == F for p in parts):
            return F
        if not parts:
            return T
        return parts[0] if len(parts) == 1 else ("and", tuple(parts))

    @staticmethod
    def or_(*parts):
        parts = [p for p in parts if p != F]
        if any(p == T for p in parts):
            return T
        if not parts:
            return F
        return parts[0] if len(parts) == 1 else ("or", tuple(parts))

    @staticmethod
    def not_(p):
        if p == T:
            return F
        if p == F:
            return T
        if p[0] == "not":
            return p[1]
        return ("not", p)


S = _Sql

#: a condition whose disjunctive form would have more terms than this is left as it is
_MAX_DNF = 16


def _dnf(node):
    """``node`` as an OR of ANDs (so SQLite can serve each term from its own index), or None
    when that would be too large."""
    if node[0] == "or":
        out = []
        for p in node[1]:
            d = _dnf(p)
            if d is None:
                return None
            out.extend(d)
        return out if len(out) <= _MAX_DNF else None
    if node[0] == "and":
        out = [()]
        for p in node[1]:
            d = _dnf(p)
            if d is None:
                return None
            out = [a + b for a in out for b in d]
            if len(out) > _MAX_DNF:
                return None
        return out
    return [(node,)]


def _flat(node):
    d = _dnf(node)
    if d is None or len(d) < 2:
        return node
    return S.or_(*(S.and_(*t) for t in d))


#: stands before an element table's column in a leaf: nothing in a plain subquery, and ``+`` in
#: the correlated ``NOT EXISTS``, so SQLite finds the run's rows by their primary key there and
#: never walks a whole (host, ...) index once per candidate run
_ECOL = "\x01"


def render(node, params: list, correlated: bool = False) -> str:
    """SQL text of ``node``; its parameters are appended to ``params`` in order.

    Negation is ``(x) IS NOT 1``: an SQL NULL inside (a comparison with a missing value) counts
    as false, so its negation is true, as MongoDB's for a missing field. The negation of "some
    element row satisfies c" is a correlated ``NOT EXISTS`` on the run's own rows (its primary
    key), which SQLite runs per candidate instead of materializing every run that has one.
    """
    kind = node[0]
    if kind == "T":
        return "1"
    if kind == "F":
        return "0"
    if kind == "sql":
        params.extend(node[2])
        return node[1].replace(_ECOL, "+" if correlated else "")
    if kind in ("and", "or"):
        return "(" + f" {kind.upper()} ".join(render(p, params, correlated)
                                              for p in node[1]) + ")"
    if kind == "not":
        inner = node[1]
        if inner[0] == "elems":
            return f"NOT EXISTS (SELECT 1 FROM ix_{inner[1]} y WHERE y.rid = d.rid AND " \
                   + render(inner[2], params, correlated=True) + ")"
        return "(" + render(inner, params, correlated) + ") IS NOT 1"
    if kind == "elems":
        cond = _flat(node[2])
        if cond == T:
            return f"d.rid IN (SELECT rid FROM ix_{node[1]})"
        return f"d.rid IN (SELECT rid FROM ix_{node[1]} WHERE " + render(cond, params) + ")"
    raise AssertionError(kind)


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


#: kinds whose normal rows hold one of a few values: a negation is written as the values left
#: (``reference_checked: {$ne: true}`` is ``IS NULL OR = 0``), which an index can serve
_DOMAINS = {BOOL: (None, 0, 1), PRESENT: (0, 1)}


def _complement(kind: str, excluded):
    if not isinstance(excluded, (list, tuple)):
        return None
    out = set(_DOMAINS[kind])
    for v in excluded:
        if v is None:
            out.discard(0 if kind == PRESENT else None)
        elif kind == PRESENT or hasattr(v, "pattern") or isinstance(v, (Mapping, list, tuple)):
            return None  # "not this value" of a present field: cannot be told from the column
        elif isinstance(v, bool) and kind == BOOL:
            out.discard(int(v))
    return sorted(out, key=lambda v: -1 if v is None else v)


def _exact(cond):
    return cond, cond


def _leaf(col: str, kind: str, op: str, arg):
    """(pos, neg) of one operator on one column of a *normal* row (no odd value in it; the
    caller admits odd rows). A comparison with a missing value is SQL NULL, which every
    combination treats as false (see :func:`render`)."""
    if op == "$eq":
        q = _query_value(kind, arg)
        if q is None:
            return UNKNOWN
        if q[0] == "null":
            return _exact(L(f"{col} = 0" if kind == PRESENT else f"{col} IS NULL"))
        if q[0] == "present":
            return L(f"{col} = 1"), F
        if q[0] == "other":
            return F, F  # a normal row holds this column's kind or nothing
        return _exact(L(f"{col} = ?", (q[1],)))
    if op in ("$ne", "$nin") and kind in _DOMAINS:
        rest = _complement(kind, arg if op == "$nin" else [arg])
        if rest is not None:
            return _exact(S.or_(*(L(f"{col} IS NULL") if v is None else L(f"{col} = {v}")
                                  for v in rest)))
    if op == "$ne":
        return _not(_leaf(col, kind, "$eq", arg))
    if op == "$in":
        if not isinstance(arg, (list, tuple)):
            return UNKNOWN
        qs = [_query_value(kind, a) for a in arg]
        if all(q is not None and q[0] in ("val", "other", "null") for q in qs):
            vals = sorted({q[1] for q in qs if q[0] == "val"}, key=repr)
            parts = []
            if vals:
                parts.append(L(f"{col} IN ({', '.join('?' * len(vals))})", vals))
            if any(q[0] == "null" for q in qs):
                parts.append(L(f"{col} IS NULL"))
            return _exact(S.or_(*parts))
        return _or(_leaf(col, kind, "$eq", a) for a in arg)
    if op == "$nin":
        return _not(_leaf(col, kind, "$in", arg))
    if op in ("$gt", "$gte", "$lt", "$lte"):
        q = _query_value(kind, arg)
        if q is None or q[0] in ("null", "present"):
            return UNKNOWN
        if q[0] == "other":
            return F, F
        sym = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[op]
        return _exact(L(f"{col} {sym} ?", (q[1],)))
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


#: the odd flags (``d.odd``, ``d.odd_data``, ``odd`` of an element table) no row of the file
#: has set, found by :func:`odd_flags` for the translation under way: a flag known to be unset
#: everywhere is left out of the SQL, which keeps each condition on one index
_UNSET: contextvars.ContextVar = contextvars.ContextVar("unset_odd_flags", default=frozenset())


def odd_flags(conn) -> frozenset:
    """The odd flags no row has set now (each answered by a partial index, in microseconds)."""
    unset = set()
    if not conn.execute("SELECT 1 FROM ix_doc WHERE odd = 1 LIMIT 1").fetchone():
        unset.add("d.odd")
    for a in ARRAYS:
        if not conn.execute(f"SELECT 1 FROM ix_{a} WHERE odd = 1 LIMIT 1").fetchone():
            unset.add(f"ix_{a}.odd")
    if not conn.execute("SELECT 1 FROM ix_doc WHERE " + " OR ".join(
            f"odd_{a} = 1" for a in ARRAYS) + " LIMIT 1").fetchone():
        unset.update(f"d.odd_{a}" for a in ARRAYS)
    return frozenset(unset)


def _with_odd(pair, odd: str, flag: str | None = None):
    """Admit the rows flagged odd to ``pos`` and keep them out of ``neg``."""
    if (flag or odd) in _UNSET.get():
        return pair
    pos, neg = pair
    return S.or_(pos, L(f"{odd} = 1")), S.and_(neg, L(f"{odd} = 0"))


def _elem_query(spec: Mapping, fields: Mapping):
    """(pos, neg) over one normal element row of a query on the element as a document."""
    parts = []
    for key, cond in spec.items():
        if key in ("$and", "$or", "$nor") and isinstance(cond, (list, tuple)) and cond:
            subs = [_elem_query(c, fields) if isinstance(c, Mapping) else UNKNOWN for c in cond]
            parts.append(_and(subs) if key == "$and" else _or(subs) if key == "$or"
                         else _not(_or(subs)))
        elif key in fields:
            parts.append(_cond(_ECOL + _col(key), fields[key], cond))
        else:
            parts.append(UNKNOWN)
    return _and(parts)


def _in_elems(array: str, cond):
    return F if cond == F else ("elems", array, cond)


def _elems(array: str, pair):
    """(pos, neg) over runs of "some element row satisfies ``pair``" (odd rows admitted)."""
    pos, neg = _with_odd(pair, _ECOL + "odd", f"ix_{array}.odd")
    return _in_elems(array, pos), _in_elems(array, neg)


def _array_field(array: str, cond):
    """(pos, neg) of a condition on the array itself (``$elemMatch``, ``$not``...)."""
    if not _is_ops(cond):
        return UNKNOWN
    fields = ARRAYS[array]
    parts = []
    for op, arg in cond.items():
        if op == "$elemMatch" and isinstance(arg, Mapping):
            if _is_ops(arg) and not any(k in ("$and", "$or", "$nor") for k in arg):
                pair = UNKNOWN  # operators on scalar elements: any element may do
            else:
                pair = _elem_query(arg, fields)
            parts.append(_elems(array, pair))
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
    ops = dict(cond) if _is_ops(cond) else {"$eq": cond}
    if "$regex" in ops or "$options" in ops:
        return UNKNOWN
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
        pos, neg = _elems(array, _leaf(_ECOL + _col(field), kind, op, arg))
        if f"d.odd_{array}" not in _UNSET.get():
            pos = S.or_(pos, L(f"d.odd_{array} = 1"))
        parts.append((pos, neg))
    return _and(parts)


def _id_values(arg):
    """The BSON keys (as the ``docs.id`` column holds them) a value of ``_id`` equals, or None."""
    if isinstance(arg, bool) or arg is None:
        return None
    if isinstance(arg, (str, ObjectId)):
        return [bson.encode({"_id": arg})]
    if isinstance(arg, int) and -(1 << 63) <= arg < (1 << 63):
        keys = {bson.encode({"_id": arg}), bson.encode({"_id": float(arg)}),
                bson.encode({"_id": bson.Int64(arg)})}
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
                c = L(f"d.rid IN (SELECT rowid FROM docs WHERE id IN "
                      f"({', '.join('?' * len(keys))}))", keys)
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
            parts.append(_with_odd(_cond(f"d.{_col(key)}", RUN_FIELDS[key], cond), "d.odd"))
        elif key in ARRAYS:
            parts.append(_array_field(key, cond))
        elif "." in key and key.split(".", 1)[0] in ARRAYS \
                and key.split(".", 1)[1] in ARRAYS[key.split(".", 1)[0]]:
            a, f = key.split(".", 1)
            parts.append(_dotted_array(a, f, cond))
        else:
            parts.append(UNKNOWN)
    return _and(parts)


def translate(filt: Mapping, ns: str = "", unset: frozenset = frozenset()):
    """An SQL statement selecting (column ``rid``) at least every run of namespace ``ns`` that
    ``filt`` matches, with its parameters; None when the translation cannot narrow anything
    (scan). ``unset``: the odd flags no row has set (:func:`odd_flags`).

    A filter that needs some element row and otherwise only other element conditions (every
    copy task's "a good copy here, none there") is driven from that element table's index, so
    SQLite never visits the runs table; rows of other namespaces it may return are dropped when
    the documents are read.
    """
    token = _UNSET.set(unset)
    try:
        pos, _ = _query(filt)
    finally:
        _UNSET.reset(token)
    if pos == T:
        return None
    parts = list(pos[1]) if pos[0] == "and" else [pos]
    for i, p in enumerate(parts):
        if p[0] != "elems":
            continue
        params: list = []
        cond = render(_flat(p[2]), params)
        rest = S.and_(*(parts[:i] + parts[i + 1:]))
        rest_sql = render(rest, params)
        if "d." in rest_sql.replace("d.rid", ""):
            break  # needs the run's own columns: from the runs table below
        where = cond if rest == T else f"{cond} AND {rest_sql.replace('d.rid', 'x.rid')}"
        return f"SELECT DISTINCT x.rid AS rid FROM ix_{p[1]} x WHERE {where}", tuple(params)
    params = [ns]
    return f"SELECT d.rid AS rid FROM ix_doc d WHERE +d.ns = ? AND {render(pos, params)}", \
        tuple(params)


def covered(filt: Mapping) -> bool:
    """Whether ``filt`` is answered from the index (not by a scan)."""
    return translate(filt, "ns") is not None


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
