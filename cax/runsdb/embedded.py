"""The embedded default Runs DB: a persistent, server-less, multi-process store.

Why it exists: ``cax --once`` from cron must work on a machine without MongoDB, and several daemons on
one machine must be able to share one Runs DB file with the same claim guarantees MongoDB gives
(a conditional ``$push`` claim wins in exactly one process).

How it works (see docs/embedded-store.rst for the measured comparison with montydb and mongita):

* Documents live in one SQLite file (WAL mode), one row per document, BSON-encoded. Every row carries
  ``seq``, a file-wide, strictly increasing change number; a deleted document leaves a tombstone row
  (``doc IS NULL``) so other processes learn about the deletion.
* Each process keeps a mongomock collection per namespace as its in-memory query/update engine, so
  filters, projections, sorts and update operators behave like mongomock (which tracks MongoDB).
* Every operation first *syncs* the cache: it reads the rows with ``seq`` above the last one it has
  seen. Writes do this inside ``BEGIN IMMEDIATE``, which takes SQLite's single writer lock, so a write
  sees every earlier commit and no other process can commit in between: the match condition of an
  update (e.g. ``'data': {'$not': {'$elemMatch': key}}``) is evaluated and applied atomically across
  processes. That is the whole concurrency story; there is no other locking.
* A write applies the operation to mongomock, then writes back only the documents it changed.
  If the operation raises (e.g. a unique-index violation), the SQLite transaction is rolled back and
  the cache is thrown away and rebuilt on the next call, so a failed operation changes nothing
  (``insert_many`` is the exception: like pymongo with ``ordered=True`` it keeps the documents before
  the failing one).

Namespaces: one file holds any number of ``database.collection`` namespaces (column ``ns``).

Datetimes come back timezone-aware in UTC (``bson.tz_util.utc``, as pymongo with ``tz_aware=True``).
"""
from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from typing import Any, Iterable, Mapping

import bson
import mongomock
from bson import ObjectId
from bson.codec_options import CodecOptions
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError
from pymongo.results import DeleteResult, InsertManyResult, InsertOneResult, UpdateResult

__all__ = ["open_collection", "init_store", "NotAStore", "EmbeddedClient", "EmbeddedDatabase",
           "EmbeddedCollection", "EmbeddedCursor"]

# The cache reaches into mongomock (its _id-keyed store, its unique-index check) for O(1) access by
# _id; verified against mongomock 4.3. Fail at import, not with wrong answers, if that moves.
if not all(hasattr(mongomock.Collection, a) for a in ("_store", "_ensure_uniques")) or not hasattr(
        mongomock.helpers, "hashdict"):
    raise ImportError(f"cax.runsdb.embedded needs mongomock 4.3 internals; found {mongomock.__version__}")

# Naive datetimes in the cache: mongomock keeps naive UTC internally and converts aware inputs itself.
_DECODE = CodecOptions(tz_aware=False)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    ns  TEXT NOT NULL,
    id  BLOB NOT NULL,            -- bson.encode({'_id': _id}): any _id type, exact equality
    seq INTEGER NOT NULL,
    doc BLOB,                     -- NULL = tombstone of a deleted document
    PRIMARY KEY (ns, id)
);
CREATE INDEX IF NOT EXISTS docs_seq ON docs (ns, seq);
CREATE TABLE IF NOT EXISTS indexes (
    ns     TEXT NOT NULL,
    name   TEXT NOT NULL,
    spec   BLOB NOT NULL,         -- bson.encode({'keys': [[field, direction], ...], 'unique': bool})
    seq    INTEGER NOT NULL,
    PRIMARY KEY (ns, name)
);
CREATE TABLE IF NOT EXISTS counter (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO counter VALUES ('seq', 0);
"""


def _id_key(_id) -> bytes:
    return bson.encode({"_id": _id})


def _index_keys(key_or_list, direction=None) -> list:
    if isinstance(key_or_list, str):
        return [[key_or_list, direction if direction is not None else ASCENDING]]
    return [[k, d] for k, d in key_or_list]


_NO_ID = object()
_MAX_VIEWS = 64          # distinct filters remembered (a pass uses about a dozen)
_MAX_CHANGES = 10_000    # changed documents remembered before the views are rebuilt from scratch


def _cache_key(_id):
    """The key mongomock's internal store uses for ``_id`` (dict _ids are wrapped to be hashable)."""
    return mongomock.helpers.hashdict(_id) if isinstance(_id, dict) else _id


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
    and never creates or changes the file's schema: that is how cax opens its Runs DB, so a missing
    or emptied file is an error, never a fresh empty store. ``create=True`` (the library default,
    used by :func:`init_store` and the store's own tests) makes the file and schema when missing.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 60.0, readonly: bool = False,
                 create: bool = True):
        self.path = os.fspath(path)
        self._lock = threading.RLock()
        self._collections: dict[str, EmbeddedCollection] = {}
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
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

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
            if ns not in self._collections:
                self._collections[ns] = EmbeddedCollection(self, ns)
            return self._collections[ns]


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
    """A pymongo-Collection-compatible subset backed by SQLite + a mongomock cache."""

    def __init__(self, client: EmbeddedClient, ns: str):
        self._client = client
        self._conn = client._conn
        self._lock = client._lock
        self.full_name = ns
        self.database = EmbeddedDatabase(client, ns.split(".", 1)[0])
        self.name = ns.split(".", 1)[1]
        self._reset_cache()

    # -- cache synchronisation ---------------------------------------------------------------------

    def _reset_cache(self):
        self._mm = mongomock.MongoClient(tz_aware=True)["db"]["c"]
        self._seen = 0
        # Query views (see _view): filter -> [matching cache keys, position in _changes].
        self._views: dict[bytes, list] = {}
        self._once: dict[bytes, None] = {}  # filters seen once, oldest first
        self._changes: list = []  # cache keys of documents changed since the views were built

    def _changed(self, keys: Iterable) -> None:
        """Note documents whose content changed, so the views re-check just these."""
        if self._views:
            self._changes.extend(keys)
            if len(self._changes) > max(_MAX_CHANGES, len(self._store())):
                self._views.clear()  # cheaper to rebuild than to replay
                self._changes.clear()

    def _sync(self):
        """Bring the mongomock cache up to the last committed state in the file.

        Changed documents are all removed first and then re-inserted: replaying them one by one could
        trip a unique index on a state that never existed (A takes B's old value before B's newer
        version is applied); the final state is a committed one, so it satisfies every index.
        """
        rows = self._conn.execute(
            "SELECT id, seq, doc FROM docs WHERE ns = ? AND seq > ? ORDER BY seq",
            (self.full_name, self._seen)).fetchall()
        idx_rows = self._conn.execute(
            "SELECT name, spec, seq FROM indexes WHERE ns = ? AND seq > ? ORDER BY seq",
            (self.full_name, self._seen)).fetchall()
        if not rows and not idx_rows:
            return
        # Straight into mongomock's store: these are committed documents, already validated, and
        # mongomock's own insert/delete would rescan the whole collection per document.
        store = self._store()
        if self._seen:
            keys = [_cache_key(bson.decode(r[0])["_id"]) for r in rows]
            for key in keys:
                if key in store:
                    del store[key]
            self._changed(keys)
        for r in rows:
            if r[2] is not None:
                doc = bson.decode(r[2], _DECODE)
                store[_cache_key(doc["_id"])] = doc
        for name, spec, _ in idx_rows:
            spec = bson.decode(spec)
            self._mm.create_index([tuple(k) for k in spec["keys"]], unique=spec["unique"],
                                  name=name, **spec.get("options", {}))
        self._seen = max([self._seen] + [r[1] for r in rows] + [r[2] for r in idx_rows])

    def _store(self):
        """mongomock's internal document store (an OrderedDict-like keyed by _id).

        Used for O(1) access by _id; mongomock itself only scans. mongomock is pinned (4.3) and the
        contract tests cover every path that touches this.
        """
        return self._mm._store

    def _engine(self, filter) -> Any:
        """The mongomock collection to run ``filter`` on.

        mongomock scans every document for every query, in Python (tens of microseconds each). A
        filter that pins ``_id`` to one value (how tasks read a run fresh and how they claim and
        update datums) can only match that document, so it runs on a scratch collection holding
        just it: O(1) instead of O(collection). Any other filter runs on a scratch collection of
        the documents its view says match (see ``_view``), in the cache's own order.
        """
        _id = filter.get("_id", _NO_ID) if isinstance(filter, Mapping) else _NO_ID
        store = self._store()
        if _id is _NO_ID or (isinstance(_id, Mapping) and any(str(k).startswith("$") for k in _id)):
            matching = self._view(filter)
            if matching is None:
                return self._mm
            keys = matching if len(matching) < 2 else [k for k in store._documents if k in matching]
        else:
            keys = [_cache_key(_id)]
        scratch = mongomock.MongoClient(tz_aware=True)["db"]["c"]
        for key in keys:
            if key in store:
                scratch._store[key] = store[key]  # not copied: mongomock copies what find returns
        return scratch

    def _view(self, filter) -> set | None:
        """The cache keys of the documents matching ``filter``, kept up to date incrementally.

        Why: a daemon asks the same dozen task queries every pass, and between two passes only a
        few runs change. The second time a filter is seen, mongomock scans the whole cache once to
        build its view; afterwards only the documents changed since (``_changed``, fed by every
        sync and every write of this process) are matched again. So a repeated query costs
        O(changed documents) of matching, plus one dict walk to keep the cache's order, not O(N)
        of mongomock filtering. A filter is matched per document, so matching a document alone
        (in a scratch collection) gives the same answer as matching it among all. ``None``: no
        view (a filter seen for the first time, or one BSON cannot encode); the caller scans.
        """
        try:
            fkey = bson.encode(filter)
        except Exception:
            return None
        view = self._views.pop(fkey, None)
        if view is None:
            if fkey not in self._once:
                # A one-off filter (a lookup by location, a --run narrowing) would only push a
                # task's view out: views are kept for filters seen twice.
                self._once[fkey] = None
                if len(self._once) > 4 * _MAX_VIEWS:
                    del self._once[next(iter(self._once))]
                return None
            del self._once[fkey]
            view = [{_cache_key(d["_id"]) for d in self._mm.find(filter, {"_id": 1})},
                    len(self._changes)]
            if len(self._views) >= _MAX_VIEWS:
                del self._views[next(iter(self._views))]  # least recently used
        elif view[1] < len(self._changes):
            pending = set(self._changes[view[1]:])
            view[0] -= pending
            store = self._store()
            scratch = mongomock.MongoClient(tz_aware=True)["db"]["c"]
            for key in pending:
                if key in store:
                    scratch._store[key] = store[key]
            view[0] |= {_cache_key(d["_id"]) for d in scratch.find(filter, {"_id": 1})}
            view[1] = len(self._changes)
        self._views[fkey] = view
        return view[0]

    def _next_seq(self) -> int:
        seq = self._conn.execute("SELECT v FROM counter WHERE k = 'seq'").fetchone()[0] + 1
        self._conn.execute("UPDATE counter SET v = ? WHERE k = 'seq'", (seq,))
        return seq

    def _persist(self, ids: Iterable, deleted: Iterable = ()):
        """Write the cache's current version of ``ids`` (and tombstones for ``deleted``)."""
        store = self._store()
        ids, deleted = list(ids), list(deleted)
        self._changed(_cache_key(_id) for _id in ids + deleted)
        rows = [(_id_key(_id), bson.encode(store[_cache_key(_id)])) for _id in ids]
        rows += [(_id_key(_id), None) for _id in deleted]
        for key, doc in rows:
            seq = self._next_seq()
            self._conn.execute("INSERT OR REPLACE INTO docs (ns, id, seq, doc) VALUES (?, ?, ?, ?)",
                               (self.full_name, key, seq, doc))
        if rows:
            # Our own writes need not be read back on the next sync.
            self._seen = max(self._seen, seq)

    def _read(self):
        """Context for a read: sync from the latest committed state (no write lock)."""
        return _ReadOp(self)

    def _write(self):
        """Context for a write: exclusive across processes, rolled back (and cache dropped) on error."""
        return _WriteOp(self)

    # -- reads -------------------------------------------------------------------------------------

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

    def count_documents(self, filter: Mapping, **kwargs) -> int:
        with self._read():
            return self._engine(filter).count_documents(filter, **kwargs)

    def estimated_document_count(self) -> int:
        return self.count_documents({})

    def distinct(self, key: str, filter: Mapping | None = None) -> list:
        with self._read():
            return self._engine(filter or {}).distinct(key, filter)

    def index_information(self) -> dict:
        with self._read():
            return self._mm.index_information()

    # -- writes ------------------------------------------------------------------------------------

    def create_index(self, keys, unique: bool = False, name: str | None = None, **kwargs) -> str:
        """Recorded in the file so every process enforces ``unique``; queries still scan.

        Options that change which documents an index constrains are kept; an unknown option is an
        error rather than silently ignored (it could mean a uniqueness rule not being enforced).
        """
        keys = _index_keys(keys)
        name = name or "_".join(f"{k}_{d}" for k, d in keys)
        kwargs.pop("background", None)  # meaningless here
        options = {k: kwargs.pop(k) for k in ("sparse", "partialFilterExpression") if k in kwargs}
        if kwargs:
            raise NotImplementedError(f"create_index options not supported: {sorted(kwargs)}")
        spec = bson.encode({"keys": keys, "unique": bool(unique), "options": options})
        with self._write():
            old = self._conn.execute("SELECT spec FROM indexes WHERE ns = ? AND name = ?",
                                     (self.full_name, name)).fetchone()
            if old is not None and old[0] == spec:
                return name  # idempotent, as in MongoDB
            self._mm.create_index([tuple(k) for k in keys], unique=unique, name=name, **options)
            seq = self._next_seq()
            self._conn.execute("INSERT OR REPLACE INTO indexes VALUES (?, ?, ?, ?)",
                               (self.full_name, name, spec, seq))
            self._seen = max(self._seen, seq)
        return name

    def insert_one(self, document: dict) -> InsertOneResult:
        # Like pymongo, the caller's document gets its _id.
        if "_id" not in document:
            document["_id"] = ObjectId()
        with self._write():
            self._mm.insert_one(document)
            self._persist([document["_id"]])
        return InsertOneResult(document["_id"], True)

    def insert_many(self, documents: Iterable[dict], ordered: bool = True) -> InsertManyResult:
        documents = list(documents)
        for d in documents:
            if "_id" not in d:
                d["_id"] = ObjectId()
        errors, done = [], []
        with self._write():
            for i, d in enumerate(documents):
                try:
                    self._mm.insert_one(d)
                except DuplicateKeyError as e:
                    errors.append({"index": i, "code": 11000, "errmsg": str(e), "op": d})
                    if ordered:
                        break
                else:
                    done.append(d["_id"])
            self._persist(done)
        if errors:
            raise BulkWriteError({"writeErrors": errors, "nInserted": len(done),
                                  "writeConcernErrors": [], "nUpserted": 0, "nMatched": 0,
                                  "nModified": 0, "nRemoved": 0, "upserted": []})
        return InsertManyResult([d["_id"] for d in documents], True)

    def _update(self, filter, update, upsert, multi) -> UpdateResult:
        ids = [d["_id"] for d in
               self._engine(filter).find(filter, {"_id": 1}).limit(0 if multi else 1)]
        if not ids and upsert:
            r = self._mm.update_one(filter, update, upsert=True)
            self._persist([r.upserted_id])
            return UpdateResult({"n": 1, "nModified": 0, "ok": 1.0, "updatedExisting": False,
                                 "upserted": r.upserted_id}, True)
        modified = self._update_ids(ids, filter, update)
        return UpdateResult({"n": len(ids), "nModified": modified, "ok": 1.0,
                             "updatedExisting": bool(ids)}, True)

    def _update_ids(self, ids: list, filter: Mapping, update: Mapping) -> int:
        """Apply ``update`` to exactly the documents ``ids`` (which match ``filter``).

        The update runs in a scratch mongomock collection holding just those documents, with the
        original filter: the scratch collection picks no other document (so update_one and
        find_one_and_update hit the chosen one, whatever mongomock's scan order), positional
        ``data.$`` still finds its array condition in the filter, and nothing rescans the cache.
        mongomock updates the document objects in place, so the cache sees the change; unique
        indexes are then checked against the whole cache.
        """
        if not ids:
            return 0
        store = self._store()
        keys = [_cache_key(_id) for _id in ids]
        before = [bson.encode(store[k]) for k in keys]
        scratch = mongomock.MongoClient(tz_aware=True)["db"]["c"]
        for k in keys:
            scratch._store[k] = store[k]
        scratch.update_many(filter, update)
        changed = []
        for _id, k, old in zip(ids, keys, before):
            store[k] = scratch._store[k]
            if bson.encode(store[k]) != old:
                self._mm._ensure_uniques(store[k])
                changed.append(_id)
        self._persist(changed)
        return len(changed)

    def update_one(self, filter: Mapping, update: Mapping, upsert: bool = False) -> UpdateResult:
        with self._write():
            return self._update(filter, update, upsert, multi=False)

    def update_many(self, filter: Mapping, update: Mapping, upsert: bool = False) -> UpdateResult:
        with self._write():
            return self._update(filter, update, upsert, multi=True)

    def replace_one(self, filter: Mapping, replacement: Mapping,
                    upsert: bool = False) -> UpdateResult:
        with self._write():
            ids = [d["_id"] for d in self._engine(filter).find(filter, {"_id": 1}).limit(1)]
            r = self._mm.replace_one({"_id": ids[0]} if ids else filter, replacement, upsert=upsert)
            if r.upserted_id is not None:
                ids = [r.upserted_id]
            if r.modified_count or r.upserted_id is not None:
                self._persist(ids)
            return UpdateResult(r.raw_result, True)

    def find_one_and_update(self, filter: Mapping, update: Mapping, projection=None, *, sort=None,
                            upsert: bool = False,
                            return_document: bool = ReturnDocument.BEFORE) -> dict | None:
        """Implemented here: mongomock's own updates the wrong array element with ``data.$``."""
        with self._write():
            cur = self._engine(filter).find(filter)
            if sort is not None:
                cur = cur.sort(_index_keys(sort))
            before = next(iter(cur.limit(1)), None)
            if before is None:
                if not upsert:
                    return None
                r = self._mm.update_one(filter, update, upsert=True)
                self._persist([r.upserted_id])
                if return_document == ReturnDocument.BEFORE:
                    return None
                _id = r.upserted_id
                return self._engine({"_id": _id}).find_one({"_id": _id}, projection)
            _id = before["_id"]
            self._update_ids([_id], filter, update)
            if return_document == ReturnDocument.AFTER:
                return self._engine({"_id": _id}).find_one({"_id": _id}, projection)
            if projection is None:
                return before
            # Apply the projection to the pre-image the way mongomock would.
            scratch = mongomock.MongoClient(tz_aware=True)["db"]["c"]
            scratch.insert_one(before)
            return scratch.find_one({"_id": _id}, projection)

    def delete_one(self, filter: Mapping) -> DeleteResult:
        return self._delete(filter, multi=False)

    def delete_many(self, filter: Mapping) -> DeleteResult:
        return self._delete(filter, multi=True)

    def _delete(self, filter, multi) -> DeleteResult:
        with self._write():
            ids = [d["_id"] for d in
                   self._engine(filter).find(filter, {"_id": 1}).limit(0 if multi else 1)]
            store = self._store()
            for _id in ids:
                del store[_cache_key(_id)]
            self._persist([], deleted=ids)
        return DeleteResult({"n": len(ids), "ok": 1.0}, True)

    def drop(self):
        with self._write():
            ids = [d["_id"] for d in self._mm.find({}, {"_id": 1})]
            self._persist([], deleted=ids)
            self._conn.execute("DELETE FROM indexes WHERE ns = ?", (self.full_name,))
        # Dropped indexes cannot be seen by other processes' syncs: they keep enforcing them until
        # reopened. Dropping is for tests and maintenance, not for running daemons.
        self._reset_cache()


class _ReadOp:
    def __init__(self, coll: EmbeddedCollection):
        self.coll = coll

    def __enter__(self):
        coll = self.coll
        coll._lock.acquire()
        try:
            # One read transaction, so the docs and indexes queries of _sync see the same snapshot.
            coll._conn.execute("BEGIN")
            try:
                coll._sync()
            finally:
                coll._conn.execute("COMMIT")
        except BaseException:
            coll._reset_cache()
            coll._lock.release()
            raise

    def __exit__(self, *exc):
        self.coll._lock.release()


class _WriteOp:
    def __init__(self, coll: EmbeddedCollection):
        self.coll = coll

    def __enter__(self):
        coll = self.coll
        coll._lock.acquire()
        try:
            coll._conn.execute("BEGIN IMMEDIATE")
            coll._sync()
        except BaseException:
            if coll._conn.in_transaction:
                coll._conn.execute("ROLLBACK")
            coll._reset_cache()
            coll._lock.release()
            raise

    def __exit__(self, exc_type, exc, tb):
        coll = self.coll
        try:
            if exc_type is None:
                coll._conn.execute("COMMIT")
            else:
                coll._conn.execute("ROLLBACK")
        except BaseException:
            coll._reset_cache()
            raise
        finally:
            if exc_type is not None:
                # The cache may hold half of a failed operation: rebuild it from the file.
                coll._reset_cache()
            coll._lock.release()
        return False


class EmbeddedCursor:
    """Lazy like pymongo's: sort/limit/skip are recorded and the query runs on first iteration."""

    def __init__(self, coll: EmbeddedCollection, filter: Mapping, projection):
        self._coll, self._filter, self._projection = coll, filter, projection
        self._sort, self._limit, self._skip = None, 0, 0
        self._results: list | None = None

    def sort(self, key_or_list, direction=None) -> "EmbeddedCursor":
        self._sort = _index_keys(key_or_list, direction)
        return self

    def limit(self, n: int) -> "EmbeddedCursor":
        self._limit = n
        return self

    def skip(self, n: int) -> "EmbeddedCursor":
        self._skip = n
        return self

    def _run(self) -> list:
        if self._results is None:
            with self._coll._read():
                cur = self._coll._engine(self._filter).find(self._filter, self._projection)
                if self._sort:
                    cur = cur.sort([tuple(k) for k in self._sort])
                self._results = list(cur.skip(self._skip).limit(self._limit))
        return self._results

    def __iter__(self):
        return iter(self._run())

    def __next__(self):
        if not hasattr(self, "_it"):
            self._it = iter(self._run())
        return next(self._it)

    next = __next__

    def to_list(self, length: int | None = None) -> list:
        return self._run()[:length] if length else list(self._run())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        pass
