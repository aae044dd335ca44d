"""All Runs DB access goes through here (DESIGN.md "Runs DB access").

Tasks never build update documents themselves: every datum transition is one of the named
transitions of :mod:`cax.runsdb.lifecycle`, one atomic update of that datum only, matched by its key
*and* its expected current status, so a decision taken on a stale read can never overwrite another
daemon's work; :meth:`RunsDB.apply` executes it and returns whether it took effect. The rules for
the reference checksum and good copies are in :mod:`cax.runsdb.copies`.
"""
from __future__ import annotations

import logging
import os
import re
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterable, Optional
from urllib.parse import quote_plus, urlsplit, urlunsplit

import pymongo
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError  # noqa: F401

from cax.runsdb import identity, lifecycle
from cax.runsdb.clock import as_utc, now  # noqa: F401 (re-exported)
# the good-copy and reference rules (cax/runsdb/copies.py), importable from here as before
from cax.runsdb.copies import expected_checksum, reference, reference_problem  # noqa: F401
from cax.runsdb.identity import DEFAULT_DETECTOR, AmbiguousRun, detector_of  # noqa: F401
from cax.runsdb.lifecycle import DatumKey, ErrorKind, Status  # noqa: F401

log = logging.getLogger("cax.runsdb")


class RunsDBError(Exception):
    """The Runs DB cannot be reached or used; ``str()`` is a one-line reason without secrets."""


class RunsDBLost(RunsDBError):
    """The Runs DB stopped answering in the middle of a pass.

    Nothing a task decides can be recorded any more, so this is never one run's failure: it ends
    the pass (``cax --once`` exits 1, the daemon waits for the Runs DB and resumes). ``str()``
    names the server (password redacted) and the reason in one line; ``reason`` is the reason.
    """

    def __init__(self, description: str, reason: str):
        super().__init__(f"Runs DB {description} lost: {reason}")
        self.description, self.reason = description, reason


#: SQLite errors that mean the embedded store itself is unusable (locked past the busy timeout,
#: file gone or unreadable, disk I/O error), as opposed to a refused operation
_SQLITE_LOST = (sqlite3.OperationalError, sqlite3.InternalError)


def is_lost(e: BaseException) -> bool:
    """Whether ``e`` says the Runs DB is unreachable or unusable, not that one operation failed."""
    if isinstance(e, ConnectionFailure):  # AutoReconnect, NetworkTimeout, ServerSelection...
        return True
    return isinstance(e, _SQLITE_LOST) or type(e) is sqlite3.DatabaseError  # "malformed"


def failure_reason(e: BaseException) -> str:
    """One line out of a driver error: pymongo appends its whole topology description (and the
    timeouts it was configured with) to every server selection error; the first part says it."""
    msg = " ".join(str(e).split())
    msg = re.split(r",? Timeout: [\d.]+s,| ?Topology Description:", msg, maxsplit=1)[0]
    msg = re.sub(r" \(configured timeouts: [^)]*\)", "", msg)
    msg = re.sub(r"mongodb(\+srv)?://\S+", lambda m: redact_uri(m.group(0)), msg)
    return f"{type(e).__name__}: {msg[:300] or 'no reason given'}"


class StoreExists(RunsDBError):
    """``cax db init`` was asked for a store where a file already is; nothing was changed."""


#: every datum status of the state machine (DESIGN.md), including processing at a batch site
STATUSES = tuple(s.value for s in Status)


def last_beat(datum: dict) -> Optional[datetime]:
    """When a copy last showed progress: its heartbeat, or its creation for legacy datums."""
    return as_utc(datum.get("heartbeat") or datum.get("creation_time"))


def datum_key(datum: dict) -> dict:
    """The identity of a datum, (host, type[, pax_version]), as a dict (see
    :class:`lifecycle.DatumKey` for the one matching rule)."""
    return DatumKey.of(datum).as_dict()


def key_str(key: dict) -> str:
    return str(DatumKey.of(key))


def redact_uri(uri: str) -> str:
    """The URI with any password replaced, for logs and error messages."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "mongodb://<unparseable>"
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


#: a run is identified by (detector, number) and by (detector, name) (cax/runsdb/identity.py);
#: the field comes first so that a lookup by number or name alone uses the index too
INDEXES = [
    ([("number", 1), ("detector", 1)], {"unique": True}),
    ([("name", 1), ("detector", 1)], {"unique": True}),
    ([("data.host", 1), ("data.type", 1), ("data.status", 1)], {}),
    # deletion asks whether another datum names the same path (cax/deletion.py _other_claim)
    ([("data.location", 1)], {}),
    ([("start", 1)], {}),
    ([("tags.name", 1)], {}),
]


class RunsDB:
    """Operations the tasks need, over a pymongo-compatible collection.

    ``queries`` counts every round trip to the collection, so tests and benchmarks can show that an
    idle pass costs a constant number of queries. In dry-run mode no write is sent: each one is
    logged and reported as not applied.
    """

    def __init__(self, collection, *, dry_run: bool = False, description: str = ""):
        self.collection = collection
        self.dry_run = dry_run
        self.description = description or getattr(collection, "full_name", "runs")
        self.queries = 0

    @contextmanager
    def _guard(self):
        """Turn the driver's "cannot reach the Runs DB" errors into :class:`RunsDBLost`."""
        try:
            yield
        except RunsDBLost:
            raise
        except Exception as e:
            if is_lost(e):
                raise RunsDBLost(self.description, failure_reason(e)) from None
            raise

    def ping(self) -> None:
        """One cheap round trip; raises :class:`RunsDBLost` while the Runs DB is unreachable."""
        with self._guard():
            client = getattr(getattr(self.collection, "database", None), "client", None)
            if type(client).__module__.startswith("pymongo"):
                client.admin.command("ping")
            else:
                self.collection.find_one({}, {"_id": 1})

    def close(self) -> None:
        """Close the connection now rather than at interpreter exit, so the embedded store's
        last connection reliably folds and removes its ``-wal``/``-shm`` files."""
        client = getattr(getattr(self.collection, "database", None), "client", None)
        if client is not None and hasattr(client, "close"):
            client.close()

    # ---- reads -------------------------------------------------------------------------------
    def ensure_indexes(self) -> None:
        """Create the indexes the tasks rely on, never one that the data already violate.

        A unique identity index that the Runs DB's runs violate (two runs of one detector with
        one number or name) is not created: one warning line says which key and which runs, and
        cax goes on without it. Safety does not need it: every datum update matches the run's
        ``_id``, a copy never overwrites an existing path, and a deletion refuses a path that
        another datum names; ``runs add`` still refuses a duplicate itself, and ``--run``/
        ``--name`` refuse a number or name that matches several runs.
        """
        self._retire_single_field_unique()
        for keys, opts in INDEXES:
            self.queries += 1
            with self._guard():
                try:
                    self.collection.create_index(keys, **opts)
                except (DuplicateKeyError, OperationFailure) as e:
                    if not opts.get("unique") or getattr(e, "code", None) not in (11000, 11001):
                        raise
                    self._report_duplicates(keys[0][0])

    def _report_duplicates(self, field: str) -> None:
        self.queries += 1
        with self._guard():
            runs = list(self.collection.find({}, {"number": 1, "name": 1, "detector": 1}))
        dups = identity.duplicates(runs, field)
        found = identity.duplicates_line(dups, field) if dups else "duplicates the store reports"
        log.warning("Runs DB %s: unique index on (detector, %s) not created: %s; cax goes on "
                    "without it (see docs/configuration.rst, Run identity)", self.description,
                    field, found)

    def _retire_single_field_unique(self) -> None:
        """Drop the unique index on ``number`` (or ``name``) alone that an earlier cax made: it
        refuses a muon-veto run sharing a TPC run's number, which the (detector, number) index
        now allows. An index of that shape made by anyone else is the Runs DB's own rule."""
        self.queries += 1
        with self._guard():
            info = self.collection.index_information()
        for name, spec in info.items():
            keys = [tuple(k) for k in spec.get("key") or []]
            if not spec.get("unique") or len(keys) != 1 or keys[0][0] not in identity.IDENTITY_FIELDS \
                    or name != f"{keys[0][0]}_1":
                continue
            field = keys[0][0]
            drop = getattr(self.collection, "drop_index", None)
            why = "this store cannot drop an index" if drop is None else ""
            if drop is not None:
                self.queries += 1
                try:
                    with self._guard():
                        drop(name)
                    log.warning("Runs DB %s: dropped the unique index %s on %s alone (made by an "
                                "earlier cax): runs are identified by (detector, %s)",
                                self.description, name, field, field)
                    continue
                except PyMongoError as e:
                    why = failure_reason(e)
            log.warning("Runs DB %s: the unique index %s on %s alone stays (%s): a run of another "
                        "detector with a %s already used is refused until it is dropped",
                        self.description, name, field, why, field)

    #: the collection beside the runs where each daemon publishes its heartbeat (cax.heartbeat)
    DAEMONS = "daemons"

    def _daemons(self):
        return self.collection.database[self.DAEMONS]

    def beat(self, doc: dict) -> bool:
        """Replace this daemon's heartbeat document (``doc["_id"]``); nothing in a dry run."""
        if self.dry_run:
            return False
        self.queries += 1
        with self._guard():
            self._daemons().replace_one({"_id": doc["_id"]}, doc, upsert=True)
        return True

    def heartbeats(self) -> list:
        """Every daemon's heartbeat document (there is one per site and machine)."""
        self.queries += 1
        with self._guard():
            return list(self._daemons().find({}))

    def find_runs(self, query: dict, projection: Optional[dict] = None,
                  sort: Iterable = (("number", 1),)) -> Iterable[dict]:
        """One query for all candidate runs of a task; the cursor streams, so memory stays flat."""
        self.queries += 1
        with self._guard():
            cursor = self.collection.find(query, projection).sort(list(sort))
        return _GuardedCursor(cursor, self._guard)

    def run(self, run_id, projection: Optional[dict] = None) -> Optional[dict]:
        """A fresh read of one run, taken right before acting on it."""
        self.queries += 1
        with self._guard():
            return self.collection.find_one({"_id": run_id}, projection)

    def run_by(self, *, number: Optional[int] = None, name: Optional[str] = None,
               detector: Optional[str] = None) -> Optional[dict]:
        """The run with this number (else name) of ``detector``, or of any detector when None;
        :class:`AmbiguousRun` when several runs match (never one of them picked silently)."""
        self.queries += 1
        if number is not None:
            name = None
        q = identity.query(number=number, name=name, detector=detector)
        with self._guard():
            matches = list(self.collection.find(q).limit(10))
        return identity.choose(matches, identity.describe(number=number, name=name,
                                                          detector=detector))

    def detectors_of(self, *, number: Optional[int] = None, name: Optional[str] = None) -> list:
        """The detectors that have a run with this number (and/or name), sorted."""
        self.queries += 1
        with self._guard():
            runs = list(self.collection.find(identity.query(number=number, name=name),
                                             {"detector": 1}))
        return sorted({detector_of(r) for r in runs})

    def identity_taken(self, doc: dict) -> Optional[str]:
        """Why ``doc`` cannot be added: which run of its detector has its number or name, or None.

        Asked before every insert: the unique indexes do not see that a document without
        ``detector`` is a TPC run, and may be missing where the Runs DB already held duplicates."""
        detector = detector_of(doc)
        q = {"$and": [{"$or": [{"number": doc.get("number")}, {"name": doc.get("name")}]},
                      identity.detector_clause(detector)]}
        self.queries += 1
        with self._guard():
            other = self.collection.find_one(q, {"number": 1, "name": 1})
        if other is None:
            return None
        same = "number" if other.get("number") == doc.get("number") else "name"
        return (f"a run of detector {detector!r} with this {same} already exists "
                f"(number {other.get('number')}, name {other.get('name')!r})")

    def count(self, query: dict) -> int:
        self.queries += 1
        with self._guard():
            return self.collection.count_documents(query)

    # ---- writes ------------------------------------------------------------------------------
    def _write(self, what: str, filt: dict, update: dict) -> bool:
        if self.dry_run:
            log.info("dry-run: would %s", what)
            return False
        self.queries += 1
        with self._guard():
            return self.collection.update_one(filt, update).modified_count == 1

    def insert_run(self, doc: dict):
        if self.dry_run:
            log.info("dry-run: would insert run %s", doc.get("name"))
            return None
        self.queries += 1
        with self._guard():
            return self.collection.insert_one(doc).inserted_id

    def apply(self, change: "lifecycle.Change") -> bool:
        """Execute one transition (:mod:`cax.runsdb.lifecycle`); True if it took effect."""
        return self._write(change.what, change.filter, change.update)

    def claim(self, run_id, datum: dict) -> bool:
        """Add ``datum`` only if no datum with its key exists: exactly one claimant wins."""
        return self.apply(lifecycle.claim(run_id, datum))

    def update_datum(self, run_id, key: dict, expected_status, fields: dict,
                     unset: Iterable[str] = ()) -> bool:
        """Set fields of the datum with ``key`` if its status is (one of) ``expected_status``
        (tests and tools; tasks use the named transitions of :mod:`cax.runsdb.lifecycle`)."""
        return self.apply(lifecycle._set("set", run_id, key, expected_status, fields, unset))

    def set_status(self, run_id, key: dict, expected_status, status: str, **fields) -> bool:
        return self.update_datum(run_id, key, expected_status, dict(fields, status=status))

    def set_error(self, run_id, key: dict, expected_status, reason: str,
                  kind: str = "failed", extra_match: Optional[dict] = None) -> bool:
        """Mark a datum ``error`` with a one-line reason; the Runs DB always says what happened.

        ``kind`` (:class:`lifecycle.ErrorKind`) lets the healing tasks pick the errors they know
        how to heal without parsing reasons.
        """
        return self.apply(lifecycle.failed(run_id, key, expected_status, reason, kind,
                                           expect=extra_match))

    def pull_datum(self, run_id, key: dict, expected_status=None) -> bool:
        return self.apply(lifecycle._pull("remove", run_id, key, expected_status))

    def update_datum_if_unchanged(self, run_id, data_as_read: list, index: int, fields: dict,
                                  what: str = "update datum") -> bool:
        """Compare-and-set on the whole ``data`` array as read (it is matched, never rewritten).

        For decisions that depend on *other* datums (another good copy exists, so this one may
        go): any change to any copy of the run since the read voids the update, so the decision's
        premises are re-checked by the update itself. Works on every backend, unlike
        ``array_filters`` (mongomock) or positional ``$`` with several array conditions.
        """
        return self.apply(lifecycle._on_array(what, run_id, data_as_read, index, fields))

    def set_reference(self, run_id, dtype: str, version: Optional[str], checksum_type: str,
                      checksum: str, host: str) -> bool:
        """Record the reference checksum of (type, version) once; the first verifier wins."""
        ident = {"type": dtype, "pax_version": version}
        entry = dict(ident, checksum=checksum, checksum_type=checksum_type, host=host, time=now())
        return self._write(f"record reference checksum of {dtype}",
                           {"_id": run_id, "references": {"$not": {"$elemMatch": ident}}},
                           {"$push": {"references": entry}})

    def add_run_entry(self, run_id, field: str, entry: dict) -> bool:
        """Append ``entry`` to the run's list ``field`` unless an equal entry is there (each event
        recorded once, however often a pass sees it)."""
        return self._write(f"record {field}",
                           {"_id": run_id, field: {"$not": {"$elemMatch": entry}}},
                           {"$push": {field: entry}})

    def inc_run(self, run_id, field: str, by: int = 1) -> bool:
        return self._write(f"increment {field}", {"_id": run_id}, {"$inc": {field: by}})

    # ---- deletion (cax/deletion.py) ------------------------------------------------------------
    def mark_deleting(self, run_id, index: int, key: dict, expected_status, good=(),
                      **fields) -> bool:
        """See :func:`cax.runsdb.lifecycle.mark_deleting`."""
        return self.apply(lifecycle.mark_deleting(run_id, index, key, expected_status, good,
                                                  **fields))


class _GuardedCursor:
    """A cursor whose batches, fetched while the caller iterates, fail as :class:`RunsDBLost`."""

    def __init__(self, cursor, guard):
        self._cursor, self._guard = cursor, guard

    def __iter__(self):
        it = iter(self._cursor)
        while True:
            with self._guard():
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def __getattr__(self, name):
        return getattr(self._cursor, name)


def _uri_with_password(uri: str, password_env: str) -> str:
    parts = urlsplit(uri)
    if parts.username is None or parts.password is not None:
        return uri
    password = os.environ.get(password_env)
    if password is None:
        raise RunsDBError(f"Runs DB URI {redact_uri(uri)} names user {parts.username!r} but the "
                          f"password variable {password_env} is not set")
    netloc = f"{parts.username}:{quote_plus(password)}@{parts.netloc.split('@', 1)[1]}"
    return urlunsplit(parts._replace(netloc=netloc))


#: a reply that takes longer than this counts as a lost server (pymongo's default is to wait for
#: ever, so a Runs DB host that vanished without closing its connections would hang the daemon)
SOCKET_TIMEOUT_MS = 60_000


def _origin(config) -> str:
    """Where to fix the Runs DB's name: the option or variable that gave it, else the config."""
    origin = getattr(config, "runs_db_origin", None)
    return origin or f"'runs_db' in {config.path}"


def connect(config, *, dry_run: bool = False, timeout_ms: Optional[int] = None,
            create: bool = False, missing_ok: bool = False) -> RunsDB:
    """Open the Runs DB named by ``config.runs_db`` and create the indexes the tasks rely on.

    An embedded store is opened only if it exists and is a cax store: a missing path (a typo in
    ``runs_db``) or an emptied file would otherwise be a fresh, empty Runs DB in which every copy
    at the site is a stray and no copy is known anywhere. ``create`` (``cax runs add``) makes a
    missing store; an existing file that is not a store is an error even then. A dry run
    promises to change nothing, so it creates no index and opens the store read-only; with
    ``missing_ok`` (the daemon's dry run of a new config, ``runs add --dry-run``) a missing store
    is taken as empty, in memory. ``cax db init`` (:func:`init_embedded`) makes an empty store.

    ``timeout_ms`` (default: the config's ``runs_db_timeout``) bounds how long pymongo looks for
    a server before an operation fails: a lost Runs DB must end the pass in seconds, not after
    every task has waited out pymongo's 30 s default.
    """
    target = config.runs_db
    if timeout_ms is None:
        timeout_ms = int(1000 * getattr(config, "runs_db_timeout", 5.0))
    if target.startswith(("mongodb://", "mongodb+srv://")):
        uri = _uri_with_password(target, config.password_env)
        try:
            client = pymongo.MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=timeout_ms,
                                         connectTimeoutMS=timeout_ms,
                                         socketTimeoutMS=SOCKET_TIMEOUT_MS)
            coll = client[config.database][config.collection]
            db = RunsDB(coll, dry_run=dry_run, description=redact_uri(target))
            if dry_run:
                client.admin.command("ping")  # still fail early when the server is unusable
            else:
                db.ensure_indexes()
        except RunsDBLost as e:
            raise RunsDBError(f"cannot use Runs DB {redact_uri(target)}: {e.reason}")
        except PyMongoError as e:
            msg = re.sub(r"mongodb(\+srv)?://\S+", lambda m: redact_uri(m.group(0)), str(e))
            raise RunsDBError(f"cannot use Runs DB {redact_uri(target)}: {msg.splitlines()[0][:300]}")
        return db
    from cax.runsdb.embedded import NotAStore, open_collection

    parent = os.path.dirname(target)
    where, exists = target, os.path.lexists(target)
    if not exists and parent and not os.path.isdir(parent) \
            and not getattr(config, "runs_db_in_state_dir", False):
        raise RunsDBError(f"cannot use Runs DB {target}: directory {parent} does not exist; "
                          f"fix {_origin(config)}")
    if not exists and dry_run and missing_ok:
        log.warning("dry-run: Runs DB %s does not exist; taken as empty, not created (a real run "
                    "needs 'cax db init' or 'cax runs add' first)", target)
        where = ":memory:"
    elif not exists and create and not dry_run:
        try:
            init_embedded(config, announce=True)
        except StoreExists:
            pass  # another cax made it meanwhile: opened (and checked) below like any store
    elif not exists:
        raise RunsDBError(f"cannot use Runs DB {target}: it does not exist; run 'cax db init' "
                          f"to create an empty one, or fix {_origin(config)}")
    elif not os.path.isfile(target):
        raise RunsDBError(f"cannot use Runs DB {target}: it is not a file; fix "
                          f"{_origin(config)}")
    try:
        coll = open_collection(where, database=config.database, collection=config.collection,
                               readonly=dry_run and where != ":memory:", create=where == ":memory:")
        db = RunsDB(coll, dry_run=dry_run, description=target)
        if not dry_run:
            db.ensure_indexes()
    except RunsDBLost as e:
        raise RunsDBError(f"cannot use Runs DB {target}: {e.reason}")
    except NotAStore as e:
        raise RunsDBError(f"cannot use Runs DB {target}: {e}; restore it from a backup, or move it "
                          f"away and run 'cax db init' for an empty one")
    except (OSError, PyMongoError) as e:
        raise RunsDBError(f"cannot use Runs DB {target}: {e}")
    except Exception as e:  # sqlite3 errors and the like: still one clear line
        raise RunsDBError(f"cannot use Runs DB {target}: {type(e).__name__}: {e}")
    return db


def init_embedded(config=None, path: Optional[str] = None, announce: bool = False) -> str:
    """Make an empty embedded store at ``path`` (else ``config.runs_db``); returns its path.

    The one way cax creates a store (``cax db init``, and ``cax runs add`` on a missing one). The
    state directory of the packaged config is made on demand; any other missing directory is a
    mistake in the path, reported rather than created. An existing file is never replaced.
    """
    from cax.runsdb.embedded import init_store

    target = path or config.runs_db
    parent = os.path.dirname(os.path.abspath(target))
    if path is None and getattr(config, "runs_db_in_state_dir", False):
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as e:
            raise RunsDBError(f"cannot create Runs DB {target}: cannot create {parent}: "
                              f"{e.strerror}")
    if not os.path.isdir(parent):
        raise RunsDBError(f"cannot create Runs DB {target}: directory {parent} does not exist")
    try:
        init_store(target)
    except FileExistsError:
        raise StoreExists(f"cannot create Runs DB {target}: it already exists; nothing changed "
                          f"(move it away first to start an empty one)")
    except Exception as e:
        raise RunsDBError(f"cannot create Runs DB {target}: {type(e).__name__}: {e}")
    if announce:
        log.warning("created a new, empty Runs DB %s", target)
    return target
