"""The embedded default Runs DB: a persistent, server-less, multi-process store.

Why it exists: ``cax --once`` from cron must work on a machine without MongoDB, and several daemons on
one machine must be able to share one Runs DB file with the same claim guarantees MongoDB gives
(a conditional ``$push`` claim wins in exactly one process).

How it works (docs/embedded-store.rst has the measurements):

* Documents live in one SQLite file (WAL mode, ``synchronous=FULL``), one row per document,
  BSON-encoded, in table ``docs``. Every row carries ``seq``, a file-wide, strictly increasing
  change number, and a deleted document leaves a tombstone row (``doc IS NULL``), as the first
  version of this store wrote them, so a process of that version sharing the file still follows.
* The fields cax selects on are kept in indexed tables beside it (:mod:`cax.runsdb.sqlindex`),
  written in the same transaction as the document. A query is translated to SQL on them to find
  its candidates; only those are decoded and each is confirmed by the exact matcher
  (:mod:`cax.runsdb.match`); a filter the translator cannot narrow is a scan. Nothing is cached
  between operations: a process holds what its current query returns.
* Writes run inside ``BEGIN IMMEDIATE``, SQLite's single writer lock, taken before the write reads
  anything: the match condition of an update (e.g. ``'data': {'$not': {'$elemMatch': key}}``) is
  evaluated and applied atomically across processes. Updates are cax's own operators
  (:mod:`cax.runsdb.update`). An exception inside a write rolls the whole transaction back, so a
  failed operation changes nothing (``insert_many`` keeps the documents before the failing one,
  like pymongo with ``ordered=True``).
* Unique indexes are rows of ``ix_unique`` whose primary key is (index, key): SQLite enforces them
  for every process, and ``create_index`` on data that violate one raises DuplicateKeyError.
* The counter rows ``indexed`` and ``index_version`` say up to which change the index tables are
  complete. A file written by the first version of this store (or by a process of that version
  since) is indexed on first use, once, with a log line (and a progress bar on a terminal); a
  read-only handle on such a file scans instead.

Namespaces: one file holds any number of ``database.collection`` namespaces (column ``ns``).

Datetimes come back timezone-aware in UTC (``bson.tz_util.utc``, as pymongo with ``tz_aware=True``).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref
from typing import Any, Iterable, Iterator, Mapping

import bson
from bson import ObjectId
from bson.codec_options import CodecOptions
from bson.tz_util import utc
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure
from pymongo.results import DeleteResult, InsertManyResult, InsertOneResult, UpdateResult

from cax.runsdb import sqlindex
from cax.runsdb.match import MISSING, equal, matches, normalize, sort_key, values_at
from cax.runsdb.projection import project
from cax.runsdb.update import apply_update, is_operator_update, upsert_seed

__all__ = ["open_collection", "init_store", "NotAStore", "EmbeddedClient", "EmbeddedDatabase",
           "EmbeddedCollection", "EmbeddedCursor"]

log = logging.getLogger("cax.runsdb")

_DECODE = CodecOptions(tz_aware=True, tzinfo=utc)

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS docs (
    ns  TEXT NOT NULL,
    id  BLOB NOT NULL,            -- bson.encode({'_id': _id}): any _id type, exact equality
    seq INTEGER NOT NULL,
    doc BLOB,                     -- NULL = tombstone of a deleted document
    PRIMARY KEY (ns, id)
)""",
    "CREATE INDEX IF NOT EXISTS docs_seq ON docs (ns, seq)",
    """CREATE TABLE IF NOT EXISTS indexes (
    ns     TEXT NOT NULL,
    name   TEXT NOT NULL,
    spec   BLOB NOT NULL,         -- bson.encode({'keys': [[field, direction], ...], 'unique': bool})
    seq    INTEGER NOT NULL,
    PRIMARY KEY (ns, name)
)""",
    "CREATE TABLE IF NOT EXISTS counter (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO counter VALUES ('seq', 0)",
]


def _id_key(_id) -> bytes:
    return bson.encode({"_id": _id})


def _index_keys(key_or_list, direction=None) -> list:
    if isinstance(key_or_list, str):
        return [[key_or_list, direction if direction is not None else ASCENDING]]
    return [[k, d] for k, d in key_or_list]


#: documents fetched per SQL round while a cursor is iterated
_BATCH = 256


class NotAStore(ValueError):
    """A file that exists but is no cax Runs DB: empty, another format, or an SQLite file without
    the cax tables. ``str()`` says which, without the path (the caller names it)."""


#: the tables every cax store has; a file without them is not one, whatever else it holds
_TABLES = {"docs", "indexes", "counter"}


def _check_store(conn: sqlite3.Connection, path: str) -> None:
    """Raise NotAStore unless ``path`` (opened as ``conn``) is a cax store, changing nothing.

    Why it matters: SQLite takes an empty file for an empty database and would happily create the
    schema in it, so an emptied store (``: > cax.runsdb``) reopened for writing becomes a valid,
    empty Runs DB, and every copy at the site a stray.
    """
    if os.path.getsize(path) == 0:
        raise NotAStore("the file is empty (0 bytes), not a Runs DB")
    try:
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise NotAStore(f"not a cax Runs DB file ({e})")
    if not _TABLES <= tables:
        raise NotAStore("an SQLite file without the cax tables, not a cax Runs DB file")


class EmbeddedClient:
    """One SQLite connection shared by the collections of one file in this process (thread-safe).

    ``create=False`` opens only an existing, valid store (FileNotFoundError, NotAStore otherwise)
    and changes nothing before it has checked the file: that is how cax opens its Runs DB, so a
    missing or emptied file is an error, never a fresh empty store. ``create=True`` (the library
    default, used by :func:`init_store` and the store's own tests) makes the file and schema when
    missing.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 60.0, readonly: bool = False,
                 create: bool = True):
        self.path = os.fspath(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        # weak: no cycle, so a dropped handle closes its connection at once, not at a later GC
        self._collections = weakref.WeakValueDictionary()
        self._seq = None  # the change counter while a write transaction runs
        self._scan_only_said = False
        if readonly:
            self._open_readonly(timeout)
            return
        if create:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (BEGIN IMMEDIATE for writes).
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                         check_same_thread=False)
        else:
            self._conn = self._connect_existing(timeout)
            try:
                _check_store(self._conn, self.path)
            except BaseException:
                self._conn.close()
                raise
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a claim acknowledged to the caller survives a power cut, not only a process crash.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        if not create:
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA:
                self._conn.execute(stmt)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        with self.write():
            pass  # a new store gets its (empty) index tables at once

    def _connect_existing(self, timeout: float) -> sqlite3.Connection:
        """``mode=rw``: SQLite refuses to create the file (a plain connect would make it)."""
        if not os.path.isfile(self.path):
            raise FileNotFoundError(2, "No such file", self.path)
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=rw"
        return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None,
                               check_same_thread=False)

    def _open_readonly(self, timeout: float) -> None:
        """For dry runs: never create the file, the schema or anything else; a write would fail.

        ``mode=rw`` (not ``ro``) plus ``query_only``: SQLite refuses every change, yet the last
        connection to close may still remove the ``-wal``/``-shm`` files it had to create, which a
        ``mode=ro`` connection leaves behind. Raises FileNotFoundError when the file does not
        exist, NotAStore when it is not a cax store.
        """
        self._conn = self._connect_existing(timeout)
        self._conn.execute("PRAGMA query_only=ON")
        self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        try:
            _check_store(self._conn, self.path)
        except BaseException:
            self._conn.close()
            raise

    def __getitem__(self, name: str) -> "EmbeddedDatabase":
        return EmbeddedDatabase(self, name)

    get_database = __getitem__

    def close(self):
        with self._lock:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _collection(self, ns: str) -> "EmbeddedCollection":
        with self._lock:
            coll = self._collections.get(ns)
            if coll is None:
                coll = self._collections[ns] = EmbeddedCollection(self, ns)
            return coll

    # -- transactions ----------------------------------------------------------------------------

    def read(self) -> "_Txn":
        """A read: one snapshot (``BEGIN``), no write lock; yields whether the index is usable."""
        return _Txn(self, write=False)

    def write(self) -> "_Txn":
        """A write: ``BEGIN IMMEDIATE`` (exclusive across processes), the index brought up to
        date first; committed on success, rolled back on any exception."""
        return _Txn(self, write=True)

    def _index_state(self) -> bool:
        """Whether the index tables hold every committed change (checked in each transaction:
        a process of the first store version writes documents without them)."""
        rows = dict(self._conn.execute(
            "SELECT k, v FROM counter WHERE k IN ('seq', 'indexed', 'index_version')"))
        return (rows.get("index_version") == sqlindex.INDEX_VERSION
                and rows.get("indexed") == rows.get("seq"))

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _reindex(self) -> None:
        """(Re)build every index table from the documents, inside the current write transaction:
        once for a file of the first store version, or after a process of that version wrote."""
        conn = self._conn
        t0 = time.monotonic()
        had = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        n = conn.execute("SELECT count(*) FROM docs WHERE doc IS NOT NULL").fetchone()[0]
        if n:
            what = "indexing" if "ix_doc" not in had else "re-indexing (written by an older cax)"
            log.warning("Runs DB %s: %s %d documents for indexed queries (once)", self.path, what, n)
        for t in sqlindex.TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {t}")
        for stmt in sqlindex.SCHEMA_TABLES:
            conn.execute(stmt)  # the indexes after the rows: sorting once beats random inserts
        bar = None
        if n > 1000:
            from cax import progress
            if progress.wanted():
                from tqdm import tqdm
                bar = tqdm(total=n, desc="indexing Runs DB", unit="run", leave=False)
        specs: dict = {}
        for ns, spec_name, spec in conn.execute("SELECT ns, name, spec FROM indexes").fetchall():
            spec = bson.decode(spec)
            if spec.get("unique"):
                specs.setdefault(ns, []).append((spec_name, spec))
        cur = conn.execute("SELECT rowid, ns, doc FROM docs WHERE doc IS NOT NULL ORDER BY rowid")
        while True:
            rows = cur.fetchmany(1000)
            if not rows:
                break
            for rid, ns, raw in rows:
                doc = bson.decode(raw, _DECODE)
                _index_doc(conn, rid, ns, doc, specs.get(ns, ()))
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        for stmt in sqlindex.SCHEMA:
            conn.execute(stmt)
        seq = conn.execute("SELECT v FROM counter WHERE k = 'seq'").fetchone()[0]
        conn.executemany("INSERT OR REPLACE INTO counter VALUES (?, ?)",
                         [("indexed", seq), ("index_version", sqlindex.INDEX_VERSION)])
        if n:
            log.warning("Runs DB %s: indexed %d documents in %.1f s", self.path, n,
                        time.monotonic() - t0)


class _Txn:
    def __init__(self, client: EmbeddedClient, write: bool):
        self.client, self.writing = client, write

    def __enter__(self) -> bool:
        c = self.client
        c._lock.acquire()
        try:
            if self.writing:
                c._conn.execute("BEGIN IMMEDIATE")
                if not c._index_state():
                    c._reindex()
                c._seq = c._conn.execute("SELECT v FROM counter WHERE k = 'seq'").fetchone()[0]
                self._seq0 = c._seq
                return True
            c._conn.execute("BEGIN")
            if c._index_state():
                return True
            c._conn.execute("COMMIT")
            if c.readonly:
                if not c._scan_only_said:
                    c._scan_only_said = True
                    log.info("Runs DB %s is not indexed yet (a read-only handle does not index "
                             "it): queries scan", c.path)
                c._conn.execute("BEGIN")
                return False
            with _Txn(c, write=True):
                pass  # indexes it
            c._conn.execute("BEGIN")
            return c._index_state()
        except BaseException:
            if c._conn.in_transaction:
                c._conn.execute("ROLLBACK")
            c._seq = None
            c._lock.release()
            raise

    def __exit__(self, exc_type, exc, tb):
        c = self.client
        try:
            if exc_type is None:
                if self.writing and c._seq != self._seq0:
                    c._conn.executemany("UPDATE counter SET v = ? WHERE k = ?",
                                        [(c._seq, "seq"), (c._seq, "indexed")])
                c._conn.execute("COMMIT")
            elif c._conn.in_transaction:
                c._conn.execute("ROLLBACK")
        finally:
            if self.writing:
                c._seq = None
            c._lock.release()
        return False


def _index_doc(conn, rid: int, ns: str, doc: Mapping, uniques) -> None:
    """The index rows of one document (its ``docs.rowid`` is ``rid``); a unique key another
    document holds raises DuplicateKeyError."""
    vals, elems = sqlindex.doc_rows(doc)
    conn.execute(f"INSERT INTO ix_doc VALUES (?, ?, {', '.join('?' * len(vals))})",
                 (rid, ns, *vals))
    for a, rows in elems.items():
        if rows:
            width = len(rows[0]) + 1
            conn.executemany(f"INSERT INTO ix_{a} VALUES ({', '.join('?' * width)})",
                             [(rid, *r) for r in rows])
    for name, spec in uniques:
        for key in sqlindex.unique_keys(doc, spec["keys"], spec.get("options") or {}):
            try:
                conn.execute("INSERT INTO ix_unique VALUES (?, ?, ?, ?)", (ns, name, key, rid))
            except sqlite3.IntegrityError:
                if conn.execute("SELECT rid FROM ix_unique WHERE ns = ? AND name = ? AND key = ?",
                                (ns, name, key)).fetchone()[0] == rid:
                    continue  # one document repeating a value of a multikey index
                raise DuplicateKeyError(
                    f"E11000 duplicate key error collection: {ns} index: {name} dup key: "
                    f"{bson.decode(key)['k']}", 11000) from None


def _unindex_doc(conn, rid: int) -> None:
    conn.execute("DELETE FROM ix_doc WHERE rid = ?", (rid,))
    for a in sqlindex.ARRAYS:
        conn.execute(f"DELETE FROM ix_{a} WHERE rid = ?", (rid,))
    conn.execute("DELETE FROM ix_unique WHERE rid = ?", (rid,))



class EmbeddedDatabase:
    def __init__(self, client: EmbeddedClient, name: str):
        self.client, self.name = client, name

    def __getitem__(self, name: str) -> "EmbeddedCollection":
        return self.client._collection(f"{self.name}.{name}")

    get_collection = __getitem__

    def __getattr__(self, name: str) -> "EmbeddedCollection":
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def list_collection_names(self) -> list[str]:
        rows = self.client._conn.execute(
            "SELECT DISTINCT ns FROM docs WHERE ns LIKE ? AND doc IS NOT NULL "
            "UNION SELECT DISTINCT ns FROM indexes WHERE ns LIKE ?",
            (f"{self.name}.%", f"{self.name}.%")).fetchall()
        return sorted(r[0][len(self.name) + 1:] for r in rows)


def open_collection(path: str | os.PathLike, database: str = "run",
                    collection: str = "runs_new", readonly: bool = False,
                    create: bool = True) -> "EmbeddedCollection":
    """The collection ``database.collection`` in the SQLite file ``path`` (created if missing,
    unless ``readonly`` or not ``create``: then the file must exist and be a cax store)."""
    return EmbeddedClient(path, readonly=readonly, create=create)[database][collection]


def init_store(path: str | os.PathLike) -> None:
    """Make an empty, valid store at ``path``; FileExistsError if anything is there already.

    The store is built under a temporary name and hard-linked into place: the link fails if the
    name was taken meanwhile (no store is ever overwritten), and no other process can see a
    half-made file under the real name. Where the filesystem has no hard links, the name is
    reserved with ``O_EXCL`` and filled in place.
    """
    path = os.fspath(path)
    if os.path.lexists(path):
        raise FileExistsError(17, "File exists", path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.init-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        EmbeddedClient(tmp).close()
        EmbeddedClient(tmp, create=False).close()  # complete on its own (WAL folded) before linking
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            EmbeddedClient(path).close()
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(tmp + suffix)
            except FileNotFoundError:
                pass


class EmbeddedCollection:
    """A pymongo-Collection-compatible subset over the SQLite file (see the module docstring)."""

    def __init__(self, client: EmbeddedClient, ns: str):
        self._client = client
        self._conn = client._conn
        self._lock = client._lock
        self.full_name = ns
        self.database = EmbeddedDatabase(client, ns.split(".", 1)[0])
        self.name = ns.split(".", 1)[1]

    # -- finding -----------------------------------------------------------------------------------

    def _candidate_rids(self, filt: Mapping, indexed: bool, order=None) -> list:
        """Row ids of every document that may match ``filt`` (a superset), in ``order`` (SQL
        over the index tables) or in insertion order."""
        stmt = sqlindex.translate(filt, self.full_name, sqlindex.odd_flags(self._conn)) \
            if indexed else None
        if stmt is None:
            if order:
                return [r[0] for r in self._conn.execute(
                    f"SELECT d.rid FROM ix_doc d WHERE +d.ns = ? ORDER BY {order}",
                    (self.full_name,))]
            return [r[0] for r in self._conn.execute(
                "SELECT rowid FROM docs WHERE ns = ? AND doc IS NOT NULL ORDER BY rowid",
                (self.full_name,))]
        sql, params = stmt
        if order:
            sql = f"SELECT d.rid FROM ix_doc d WHERE d.rid IN ({sql}) ORDER BY {order}"
        else:
            sql += " ORDER BY rid"
        return [r[0] for r in self._conn.execute(sql, params)]

    def _fetch(self, rids: list) -> Iterator[tuple]:
        """(rid, raw BSON) of the live documents among ``rids``, in that order."""
        for i in range(0, len(rids), _BATCH):
            chunk = rids[i:i + _BATCH]
            got = dict(self._conn.execute(
                f"SELECT rowid, doc FROM docs WHERE rowid IN ({', '.join('?' * len(chunk))}) "
                f"AND ns = ? AND doc IS NOT NULL", (*chunk, self.full_name)))
            for rid in chunk:
                if rid in got:
                    yield rid, got[rid]

    def _matching(self, filt: Mapping, indexed: bool, limit: int = 0) -> list:
        """[(rid, raw, doc)] of the documents matching ``filt``, in insertion order (inside the
        caller's transaction)."""
        filt = _normalized(filt)
        out = []
        for rid, raw in self._fetch(self._candidate_rids(filt, indexed)):
            doc = bson.decode(raw, _DECODE)
            if matches(doc, filt):
                out.append((rid, raw, doc))
                if limit and len(out) >= limit:
                    break
        return out

    def _sorted(self, found: list, sort) -> list:
        if not sort:
            return found
        keys = [(k, d) for k, d in _index_keys(sort)]
        return sorted(found, key=lambda t: sort_key(t[2], keys))

    def find(self, filter: Mapping | None = None, projection=None, *, sort=None, limit: int = 0,
             skip: int = 0) -> "EmbeddedCursor":
        cursor = EmbeddedCursor(self, filter or {}, projection)
        if sort is not None:
            cursor.sort(sort)
        return cursor.limit(limit).skip(skip)

    def find_one(self, filter: Mapping | Any = None, projection=None, *, sort=None) -> dict | None:
        if filter is not None and not isinstance(filter, Mapping):
            filter = {"_id": filter}
        for doc in self.find(filter, projection, sort=sort, limit=1):
            return doc
        return None

    def count_documents(self, filter: Mapping, skip: int = 0, limit: int = 0, **kwargs) -> int:
        with self._client.read() as indexed:
            n = len(self._matching(filter, indexed))
        n = max(0, n - skip)
        return min(n, limit) if limit else n

    def estimated_document_count(self) -> int:
        with self._client.read():
            return self._conn.execute("SELECT count(*) FROM docs WHERE ns = ? AND doc IS NOT NULL",
                                      (self.full_name,)).fetchone()[0]

    def distinct(self, key: str, filter: Mapping | None = None) -> list:
        out: list = []
        with self._client.read() as indexed:
            found = self._matching(filter or {}, indexed)
        for _, _, doc in found:
            for v in values_at(doc, key):
                for x in (v if isinstance(v, list) else [v]):
                    if x is not MISSING and not any(equal(x, y) for y in out):
                        out.append(x)
        return out

    def index_information(self) -> dict:
        with self._client.read():
            rows = self._conn.execute("SELECT name, spec FROM indexes WHERE ns = ? ORDER BY seq",
                                      (self.full_name,)).fetchall()
        info = {"_id_": {"key": [("_id", 1)], "v": 2}}
        for name, spec in rows:
            spec = bson.decode(spec)
            entry = {"key": [tuple(k) for k in spec["keys"]], "v": 2}
            if spec.get("unique"):
                entry["unique"] = True
            entry.update(spec.get("options") or {})
            info[name] = entry
        return info

    # -- writing -----------------------------------------------------------------------------------

    def _uniques(self) -> list:
        out = []
        for name, spec in self._conn.execute("SELECT name, spec FROM indexes WHERE ns = ?",
                                             (self.full_name,)):
            spec = bson.decode(spec)
            if spec.get("unique"):
                out.append((name, spec))
        return out

    def _insert(self, doc: dict, uniques) -> None:
        raw = bson.encode(doc)
        row = self._conn.execute(
            "INSERT INTO docs (ns, id, seq, doc) VALUES (?, ?, ?, ?) ON CONFLICT (ns, id) DO "
            "UPDATE SET seq = excluded.seq, doc = excluded.doc WHERE docs.doc IS NULL "
            "RETURNING rowid", (self.full_name, _id_key(doc["_id"]), self._client.next_seq(),
                                raw)).fetchone()
        if row is None:
            raise DuplicateKeyError(f"E11000 duplicate key error collection: {self.full_name} "
                                    f"index: _id_ dup key: {{ _id: {doc['_id']!r} }}", 11000)
        _index_doc(self._conn, row[0], self.full_name, bson.decode(raw, _DECODE), uniques)

    def _replace(self, rid: int, doc: dict, uniques) -> None:
        raw = bson.encode(doc)
        self._conn.execute("UPDATE docs SET doc = ?, seq = ? WHERE rowid = ?",
                           (raw, self._client.next_seq(), rid))
        _unindex_doc(self._conn, rid)
        _index_doc(self._conn, rid, self.full_name, bson.decode(raw, _DECODE), uniques)

    def _remove(self, rid: int) -> None:
        self._conn.execute("UPDATE docs SET doc = NULL, seq = ? WHERE rowid = ?",
                           (self._client.next_seq(), rid))
        _unindex_doc(self._conn, rid)

    def create_index(self, keys, unique: bool = False, name: str | None = None, **kwargs) -> str:
        """Recorded in the file; a unique index is enforced for every process, and refused
        (DuplicateKeyError, nothing recorded) when the documents already violate it.

        Options that change which documents an index constrains are kept; an unknown option is an
        error rather than silently ignored (it could mean a uniqueness rule not being enforced).
        """
        keys = _index_keys(keys)
        name = name or "_".join(f"{k}_{d}" for k, d in keys)
        kwargs.pop("background", None)  # meaningless here
        options = {k: kwargs.pop(k) for k in ("sparse", "partialFilterExpression") if k in kwargs}
        if kwargs:
            raise NotImplementedError(f"create_index options not supported: {sorted(kwargs)}")
        spec = {"keys": keys, "unique": bool(unique), "options": options}
        raw = bson.encode(spec)
        with self._client.write():
            old = self._conn.execute("SELECT spec FROM indexes WHERE ns = ? AND name = ?",
                                     (self.full_name, name)).fetchone()
            if old is not None:
                if old[0] == raw:
                    return name  # idempotent, as in MongoDB
                raise OperationFailure(f"An existing index has the same name ({name}) but other "
                                       f"keys or options; drop it first", 86)
            self._conn.execute("INSERT INTO indexes VALUES (?, ?, ?, ?)",
                               (self.full_name, name, raw, self._client.next_seq()))
            if unique:
                for rid, raw_doc in self._conn.execute(
                        "SELECT rowid, doc FROM docs WHERE ns = ? AND doc IS NOT NULL",
                        (self.full_name,)).fetchall():
                    doc = bson.decode(raw_doc, _DECODE)
                    for key in sqlindex.unique_keys(doc, keys, options):
                        try:
                            self._conn.execute("INSERT INTO ix_unique VALUES (?, ?, ?, ?)",
                                               (self.full_name, name, key, rid))
                        except sqlite3.IntegrityError:
                            other = self._conn.execute(
                                "SELECT rid FROM ix_unique WHERE ns = ? AND name = ? AND key = ?",
                                (self.full_name, name, key)).fetchone()[0]
                            if other != rid:
                                raise DuplicateKeyError(
                                    f"E11000 duplicate key error collection: {self.full_name} "
                                    f"index: {name} dup key: {bson.decode(key)['k']}",
                                    11000) from None
        return name

    def drop_index(self, index_or_name) -> None:
        name = index_or_name if isinstance(index_or_name, str) else "_".join(
            f"{k}_{d}" for k, d in _index_keys(index_or_name))
        with self._client.write():
            if not self._conn.execute("DELETE FROM indexes WHERE ns = ? AND name = ?",
                                      (self.full_name, name)).rowcount:
                raise OperationFailure(f"index not found with name [{name}]", 27)
            self._conn.execute("DELETE FROM ix_unique WHERE ns = ? AND name = ?",
                               (self.full_name, name))
            self._client.next_seq()

    def insert_one(self, document: dict) -> InsertOneResult:
        # Like pymongo, the caller's document gets its _id.
        if "_id" not in document:
            document["_id"] = ObjectId()
        with self._client.write():
            self._insert(document, self._uniques())
        return InsertOneResult(document["_id"], True)

    def insert_many(self, documents: Iterable[dict], ordered: bool = True) -> InsertManyResult:
        """One transaction for all (one durable commit); per document a savepoint, so a refused
        one leaves no trace and, ordered, the ones before it stay."""
        documents = list(documents)
        for d in documents:
            if "_id" not in d:
                d["_id"] = ObjectId()
        errors, done = [], 0
        with self._client.write():
            uniques = self._uniques()
            for i, d in enumerate(documents):
                self._conn.execute("SAVEPOINT one")
                try:
                    self._insert(d, uniques)
                except DuplicateKeyError as e:
                    self._conn.execute("ROLLBACK TO one")
                    self._conn.execute("RELEASE one")
                    errors.append({"index": i, "code": 11000, "errmsg": str(e), "op": d})
                    if ordered:
                        break
                else:
                    self._conn.execute("RELEASE one")
                    done += 1
        if errors:
            raise BulkWriteError({"writeErrors": errors, "nInserted": done,
                                  "writeConcernErrors": [], "nUpserted": 0, "nMatched": 0,
                                  "nModified": 0, "nRemoved": 0, "upserted": []})
        return InsertManyResult([d["_id"] for d in documents], True)

    def _upsert(self, filt: Mapping, update: Mapping | None, replacement: Mapping | None,
                uniques):
        if replacement is not None:
            doc = dict(replacement)
            seed_id = upsert_seed(filt).get("_id", MISSING)
            if "_id" not in doc and seed_id is not MISSING:
                doc["_id"] = seed_id
        else:
            doc = apply_update(upsert_seed(filt), update, filt, inserting=True)
        if "_id" not in doc:
            doc = {"_id": ObjectId(), **doc}
        self._insert(doc, uniques)
        return doc["_id"]

    def _update(self, filter, update, upsert, multi) -> UpdateResult:
        if not is_operator_update(update):
            raise ValueError("update only works with $ operators")
        with self._client.write():
            found = self._matching(filter, True, limit=0 if multi else 1)
            uniques = self._uniques()
            if not found and upsert:
                _id = self._upsert(filter, update, None, uniques)
                return UpdateResult({"n": 1, "nModified": 0, "ok": 1.0, "updatedExisting": False,
                                     "upserted": _id}, True)
            nfilter = _normalized(filter)
            modified = 0
            for rid, raw, doc in found:
                new = apply_update(doc, update, nfilter)
                if bson.encode(new) != raw:
                    self._replace(rid, new, uniques)
                    modified += 1
        return UpdateResult({"n": len(found), "nModified": modified, "ok": 1.0,
                             "updatedExisting": bool(found)}, True)

    def update_one(self, filter: Mapping, update: Mapping, upsert: bool = False) -> UpdateResult:
        return self._update(filter, update, upsert, multi=False)

    def update_many(self, filter: Mapping, update: Mapping, upsert: bool = False) -> UpdateResult:
        return self._update(filter, update, upsert, multi=True)

    def replace_one(self, filter: Mapping, replacement: Mapping,
                    upsert: bool = False) -> UpdateResult:
        if is_operator_update(replacement):
            raise ValueError("replacement can not include $ operators")
        with self._client.write():
            found = self._matching(filter, True, limit=1)
            uniques = self._uniques()
            if not found:
                if not upsert:
                    return UpdateResult({"n": 0, "nModified": 0, "ok": 1.0,
                                         "updatedExisting": False}, True)
                _id = self._upsert(filter, None, replacement, uniques)
                return UpdateResult({"n": 1, "nModified": 0, "ok": 1.0,
                                     "updatedExisting": False, "upserted": _id}, True)
            rid, raw, doc = found[0]
            new = {"_id": doc["_id"], **{k: normalize(v) for k, v in replacement.items()
                                         if k != "_id"}}
            if "_id" in replacement and not equal(replacement["_id"], doc["_id"]):
                raise OperationFailure("the (immutable) field '_id' was found to have been "
                                       "altered", 66)
            changed = bson.encode(new) != raw
            if changed:
                self._replace(rid, new, uniques)
        return UpdateResult({"n": 1, "nModified": int(changed), "ok": 1.0,
                             "updatedExisting": True}, True)

    def find_one_and_update(self, filter: Mapping, update: Mapping, projection=None, *, sort=None,
                            upsert: bool = False,
                            return_document: bool = ReturnDocument.BEFORE) -> dict | None:
        if not is_operator_update(update):
            raise ValueError("update only works with $ operators")
        with self._client.write():
            found = self._sorted(self._matching(filter, True, limit=0 if sort else 1), sort)
            uniques = self._uniques()
            if not found:
                if not upsert:
                    return None
                _id = self._upsert(filter, update, None, uniques)
                if return_document == ReturnDocument.BEFORE:
                    return None
                after = self._matching({"_id": _id}, True, limit=1)[0][2]
                return project(after, projection)
            rid, raw, doc = found[0]
            new = apply_update(doc, update, _normalized(filter))
            if bson.encode(new) != raw:
                self._replace(rid, new, uniques)
            if return_document == ReturnDocument.AFTER:
                return project(bson.decode(bson.encode(new), _DECODE), projection)
            return project(doc, projection)

    def delete_one(self, filter: Mapping) -> DeleteResult:
        return self._delete(filter, multi=False)

    def delete_many(self, filter: Mapping) -> DeleteResult:
        return self._delete(filter, multi=True)

    def _delete(self, filter, multi) -> DeleteResult:
        with self._client.write():
            found = self._matching(filter, True, limit=0 if multi else 1)
            for rid, _, _ in found:
                self._remove(rid)
        return DeleteResult({"n": len(found), "ok": 1.0}, True)

    def drop(self):
        with self._client.write():
            for (rid,) in self._conn.execute("SELECT rowid FROM docs WHERE ns = ? AND doc IS NOT "
                                             "NULL", (self.full_name,)).fetchall():
                self._remove(rid)
            self._conn.execute("DELETE FROM indexes WHERE ns = ?", (self.full_name,))
            self._conn.execute("DELETE FROM ix_unique WHERE ns = ?", (self.full_name,))


def _normalized(filt: Mapping) -> Mapping:
    """The filter's values as the server compares them (datetimes in UTC, to the millisecond)."""
    return normalize(filt) if filt else {}


class EmbeddedCursor:
    """Lazy like pymongo's: sort/limit/skip are recorded and the query runs on first iteration.

    The candidates' row ids are found in one snapshot; the documents are then read and matched
    in batches as the caller iterates, so memory holds one batch, not the result (unless a sort
    on fields the index does not order forces the whole result to be sorted in Python). As with
    a server's cursor, a document changed meanwhile is returned as it is when its batch is read.
    """

    def __init__(self, coll: EmbeddedCollection, filter: Mapping, projection):
        self._coll, self._filter, self._projection = coll, filter, projection
        self._sort, self._limit, self._skip = None, 0, 0
        self._it: Iterator | None = None

    def sort(self, key_or_list, direction=None) -> "EmbeddedCursor":
        self._sort = _index_keys(key_or_list, direction)
        return self

    def limit(self, n: int) -> "EmbeddedCursor":
        self._limit = n
        return self

    def skip(self, n: int) -> "EmbeddedCursor":
        self._skip = n
        return self

    def _order(self) -> str | None:
        """SQL ORDER BY for the sort when every key is an indexed run field, else None."""
        if not self._sort:
            return None
        cols = []
        for k, d in self._sort:
            if k not in sqlindex.RUN_FIELDS:
                return None
            cols.append(f"d.c_{k.replace('.', '_')} {'DESC' if d < 0 else 'ASC'}")
        return ", ".join(cols + ["d.rid"])

    def _docs(self) -> Iterator[dict]:
        coll, client = self._coll, self._coll._client
        filt = _normalized(self._filter)
        order = self._order()
        with client.read() as indexed:
            if not indexed:
                order = None
            rids = coll._candidate_rids(filt, indexed, order)
            if order is not None:
                # SQL orders values of the column's kind as MongoDB does; any other value there
                # (an "odd" one) is ordered by the matcher's rules instead
                if coll._conn.execute("SELECT 1 FROM ix_doc d WHERE odd = 1 AND +d.ns = ? "
                                      "LIMIT 1", (coll.full_name,)).fetchone():
                    order = None
                    rids.sort()
        if self._sort and order is None:
            found = []
            with client._lock:
                for rid, raw in coll._fetch(rids):
                    doc = bson.decode(raw, _DECODE)
                    if matches(doc, filt):
                        found.append((rid, raw, doc))
            docs: Iterable = (t[2] for t in coll._sorted(found, self._sort))
        else:
            docs = self._stream(rids, filt)
        skip, left = self._skip, self._limit
        for doc in docs:
            if skip:
                skip -= 1
                continue
            yield project(doc, self._projection) if self._projection else doc
            if left:
                left -= 1
                if not left:
                    return

    def _stream(self, rids, filt) -> Iterator[dict]:
        coll = self._coll
        for i in range(0, len(rids), _BATCH):
            with coll._client._lock:
                batch = list(coll._fetch(rids[i:i + _BATCH]))
            for _, raw in batch:
                doc = bson.decode(raw, _DECODE)
                if matches(doc, filt):
                    yield doc

    def __iter__(self):
        if self._it is None:
            self._it = self._docs()
        return self._it

    def __next__(self):
        return next(iter(self))

    next = __next__

    def to_list(self, length: int | None = None) -> list:
        out = []
        for doc in self:
            out.append(doc)
            if length and len(out) >= length:
                break
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._it = None
