"""Loading and validating ``cax.json``.

Every problem is reported as one line naming the file, the site and the key, before cax touches
anything: a daemon that starts on a half-understood config can move or delete the wrong data.
Keys cax does not know are warned about once (classic configs carry many), never fatal.
"""
from __future__ import annotations

import json
import json.decoder
import json.scanner
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

import jsonschema

from cax import classic
from cax.tasks import TASK_NAMES

log = logging.getLogger("cax.config")

DATA_TYPES = ("raw", "processed", "untriggered")
METHODS = ("local", "scp", "sftp", "rsync", "gfal")

#: Default task order (DESIGN.md); ``task_list`` narrows it and keeps this order. The order lives
#: with the task registry (cax.tasks), which needs nothing from the config.
DEFAULT_TASKS = TASK_NAMES

#: longest pause between passes (a week); longer waits overflow the timers, and mean no daemon
MAX_INTERVAL = 7 * 24 * 3600

_str_list_or_null = {"anyOf": [{"type": "null"}, {"type": "array", "items": {"type": "string"}}]}
_pos_int = {"type": "integer", "minimum": 0}
_pos_num = {"type": "number", "minimum": 0}
_path = {"type": "string", "minLength": 1}
_path_or_null = {"anyOf": [{"type": "null"}, _path]}

PURGE_SCHEMA = {
    "type": "object",
    "properties": {
        "min_copies": {"type": "integer", "minimum": 1},
        "older_than_days": _pos_num,
        "min_free_fraction": {"type": "number", "minimum": 0, "maximum": 1},
        "types": {"type": "array", "items": {"enum": list(DATA_TYPES)}},
        "versions": {"type": "array", "items": {"type": "string"}},
        "old_versions": {"type": "boolean"},
        "enabled": {"type": "boolean"},
        # null: re-hash every counted copy before an origin goes, others after 30 days
        "reverify_days": {"anyOf": [{"type": "null"}, _pos_num]},
        # hosts whose transferred records cax cannot verify (classic Rucio/tape) still count
        "count_unverified_at": {"type": "array", "items": {"type": "string", "minLength": 1}},
    },
    "additionalProperties": False,
}

SCRUB_SCHEMA = {
    "type": "object",
    "properties": {
        "bytes_per_pass": {"type": "integer", "minimum": 1},
        "every_days": _pos_num,
        "enabled": {"type": "boolean"},
    },
    "additionalProperties": False,
}

#: what ``"scrub": true`` means: re-hash up to 10 GiB a pass of copies last verified 30 days ago
SCRUB_DEFAULTS = {"bytes_per_pass": 10 * 2 ** 30, "every_days": 30.0}

PROCESSING_SCHEMA = {
    "type": "object",
    "properties": {
        "backend": {"enum": ["slurm", "local"]},
        "versions": {"type": "array", "items": {"type": "string"}},
        "pax_versions": {"type": "array", "items": {"type": "string"}},
        "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "ncpus": {"type": "integer", "minimum": 1},
        "mem_per_cpu": {"type": ["integer", "string"]},
        "walltime": {"type": ["integer", "string"]},
        "partition": {"type": "string"},
        "account": {"type": "string"},
        "qos": {"type": "string"},
        "reservation": {"type": "string"},
        "max_queued": {"type": "integer", "minimum": 0},
        "max_retries": _pos_int,
        "log_dir": _path,
        "output_dir": _path,
        "env_setup": {"type": "array", "items": {"type": "string"}},
        "max_local_jobs": {"type": "integer", "minimum": 1},
        "max_jobs": {"type": "integer", "minimum": 1},
        "state_dir": _path,
        "script_dir": _path,
        "extra_args": {"type": "array", "items": {"type": "string"}},
        "submit_grace": _pos_num,
    },
    "additionalProperties": False,
}

SITE_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"},
        "hostname": {"type": ["string", "null"]},  # null: a classic pseudo-site (tsm-server)
        "username": {"type": ["string", "null"]},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        # null and the classic methods cax does not offer load as "not reachable" (cax.classic)
        "method": {"enum": [*METHODS, *classic.RENAMED_METHODS,
                            *sorted(classic.UNREACHABLE_METHODS), None]},
        "receive": {"enum": [*METHODS, *classic.RENAMED_METHODS,
                             *sorted(classic.UNREACHABLE_METHODS), None]},
        # null: no directory (classic configs write "dir_processed": null at raw-only sites)
        "directory": _path_or_null,
        "dir_raw": _path_or_null,
        "dir_processed": _path_or_null,
        "dir_untriggered": _path_or_null,
        "upload_options": _str_list_or_null,
        "download_options": _str_list_or_null,
        "data_type": {"type": "array", "items": {"enum": list(DATA_TYPES)}},
        "purge": {"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": 1}, PURGE_SCHEMA]},
        "scrub": {"anyOf": [{"type": "boolean"}, SCRUB_SCHEMA]},
        "pax_versions": {"type": "array", "items": {"type": "string"}},
        # classic: this site's processed data of this version are purged (cax.classic)
        "pax_version_purge": {"anyOf": [{"type": "null"}, {"type": "string"},
                                        {"type": "array", "items": {"type": "string"}}]},
        "task_list": {"type": "array", "items": {"type": "string"}},
        "dataset_list": {"type": "array", "items": {"type": ["string", "integer"]}},
        "key_file": _path,
        "known_hosts": _path,
        "max_transfers": {"type": "integer", "minimum": 1},
        "stalled_after": _pos_num,
        "max_retries": _pos_int,
        "retry_delay": _pos_num,
        "nstreams": {"type": "integer", "minimum": 1},  # accepted, ignored (docs/configuration.rst)
        "parallel": {"type": "integer", "minimum": 1},
        "checksum_type": {"enum": ["sha512", "adler32", "xxh3", "blake3"]},
        "processing": PROCESSING_SCHEMA,
        # where processing and copies write processed data: <version>/<name>, or the classic
        # pax_<version>/<run>.root (both are read everywhere; cax.paths)
        "processed_layout": {"enum": ["version", "classic"]},
        "group": {"type": "string"},
        "mode": {"type": "string", "pattern": "^0?[0-7]{3,4}$"},
        "stray_grace_days": _pos_num,
        # this site's verified sha512 is the reference of runs that record none (classic DBs)
        "reference": {"type": "boolean"},
        "metrics_file": _path,
    },
}

KNOWN_SITE_KEYS = set(SITE_SCHEMA["properties"])

TOP_SCHEMA = {
    "type": "object",
    "required": ["sites"],
    "properties": {
        "runs_db": {"type": "string", "minLength": 1},
        "password_env": {"type": "string", "minLength": 1},
        "database": {"type": "string", "minLength": 1},
        "collection": {"type": "string", "minLength": 1},
        "sites": {"type": "array", "items": {"type": "object"}},
        "task_list": {"type": "array", "items": {"type": "string"}},
        "dataset_list": {"type": "array", "items": {"type": ["string", "integer"]}},
        "interval": {"type": "number", "minimum": 0, "maximum": MAX_INTERVAL},
        "wake_on_change": {"type": "boolean"},
        "runs_db_timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "lock_dir": _path,
        # unknown keys are errors, not warnings (also: cax --strict)
        "strict": {"type": "boolean"},
    },
}
KNOWN_TOP_KEYS = set(TOP_SCHEMA["properties"])


class ConfigError(Exception):
    """A config problem; ``str()`` is the one line shown to the admin."""


@dataclass
class Site:
    """One site of ``cax.json``, with classic synonyms resolved and defaults filled in."""

    name: str
    hostname: str = "localhost"
    username: Optional[str] = None
    port: int = 22
    method: str = "local"
    dirs: dict = field(default_factory=dict)  # data type -> absolute directory
    upload_options: list = field(default_factory=list)
    download_options: list = field(default_factory=list)
    data_type: list = field(default_factory=lambda: ["raw", "processed"])
    purge: Optional[dict] = None  # None: this site never purges
    scrub: Optional[dict] = None  # None: VerifyCopies does nothing here
    pax_versions: list = field(default_factory=list)
    task_list: Optional[list] = None
    dataset_list: Optional[list] = None
    key_file: Optional[str] = None
    known_hosts: Optional[str] = None
    max_transfers: int = 2
    stalled_after: float = 3600.0
    max_retries: int = 3
    retry_delay: float = 300.0  # seconds before a failed copy is retried, doubled per retry
    checksum_type: str = "sha512"
    processing: Optional[dict] = None
    #: "version": processed data written to <dir>/<version>/<name>; "classic": to the classic
    #: cax's <dir>/pax_<version>/<run>.root (cax.paths reads both at every site)
    processed_layout: str = "version"
    group: Optional[str] = None
    mode: Optional[int] = None
    stray_grace_days: float = 7.0
    #: this site's verified sha512 is the reference of runs that record none (classic Runs DBs)
    reference: bool = False
    #: Prometheus textfile this site's daemon rewrites after every pass (cax.metrics), or None
    metrics_file: Optional[str] = None
    #: why no cax reaches this site (a classic method it does not offer, no hostname), or None
    unreachable: Optional[str] = None
    #: the config error a cax acting as this site stops on (an unknown name in its task_list);
    #: other sites' daemons only warn about it
    task_problem: Optional[str] = None
    raw: dict = field(default_factory=dict, repr=False)  # the site object as written

    def data_dir(self, dtype: str) -> Optional[str]:
        return self.dirs.get(dtype)


@dataclass
class Config:
    path: str
    sites: dict  # name -> Site, in file order
    runs_db: str
    password_env: str = "MONGO_PASSWORD"
    database: str = "run"
    collection: str = "runs_new"
    task_list: Optional[list] = None
    dataset_list: Optional[list] = None
    interval: float = 60.0
    wake_on_change: bool = False  # MongoDB change streams start a pass early
    #: seconds pymongo looks for the Runs DB server before an operation fails (a lost DB)
    runs_db_timeout: float = 5.0
    lock_dir: Optional[str] = None
    #: the embedded store lives in the user state directory, created on first use
    runs_db_in_state_dir: bool = False
    #: whether a Runs DB was named (``runs_db``, ``--runs-db``, ``$CAX_RUNS_DB``) or the object
    #: form's default applies; a classic list config names none, and a daemon refuses to start
    #: on a store nobody named
    runs_db_named: bool = True
    #: where the Runs DB was named, for "fix it there" in errors: ``--runs-db``,
    #: ``$CAX_RUNS_DB``, or None for the config's ``runs_db``
    runs_db_origin: Optional[str] = None

    @property
    def reference_sites(self) -> tuple:
        """Sites whose verified sha512 is the reference of a run that records none, in file
        order (cax.runsdb.copies.reference ``prefer``)."""
        return tuple(n for n, s in self.sites.items() if s.reference)

    def site(self, name: str) -> Site:
        try:
            return self.sites[name]
        except KeyError:
            raise ConfigError(f"{self.path}: unknown host {name!r}; known sites: "
                              f"{', '.join(self.sites) or '(none)'}")

    def tasks_for(self, host: str) -> list:
        """Task names to run at ``host``, in the default order, narrowed by task_list."""
        site = self.site(host)
        # None: not given; [] from a classic list whose every task cax skips: run nothing
        wanted = site.task_list if site.task_list is not None else self.task_list
        if wanted is None:
            return list(DEFAULT_TASKS)
        return [t for t in DEFAULT_TASKS if t in wanted]

    def reach_problem(self, host: str) -> Optional[str]:
        """Why a cax acting as ``host`` cannot do its work, or None: the host itself, or a site
        its upload/download options name, is not reachable from this cax. Other unreachable
        sites are only warned about at load (no site's tasks touch them)."""
        me = self.site(host)
        if me.task_problem:
            return me.task_problem
        if me.unreachable:
            return f"{self.path}: site {host!r}: this host is not reachable from this cax: " \
                   f"{me.unreachable}"
        for key in ("upload_options", "download_options"):
            for other in getattr(me, key):
                if self.sites[other].unreachable:
                    return f"{_where(self.path, host, key)}: names site {other!r}, which is not " \
                           f"reachable from this cax: {self.sites[other].unreachable}"
        return None

    def datasets_for(self, host: str) -> Optional[list]:
        return self.site(host).dataset_list or self.dataset_list

    def is_uri(self) -> bool:
        return self.runs_db.startswith(("mongodb://", "mongodb+srv://"))


def packaged_config_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "cax.json")


def state_dir() -> str:
    """Where the packaged config keeps its embedded Runs DB: ``$XDG_STATE_HOME/cax``, else
    ``~/.local/state/cax``. Beside the packaged file would mean inside site-packages, which a
    read-only command must not write to (and an upgrade would wipe)."""
    base = os.environ.get("XDG_STATE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "cax")


#: the config every command finds when none is named (after ``$CAX_CONFIG`` and ``./cax.json``)
SYSTEM_CONFIG = "/etc/cax/cax.json"
CONFIG_ENV = "CAX_CONFIG"


def default_config_path() -> str:
    """``$CAX_CONFIG``, else ``./cax.json``, else ``/etc/cax/cax.json``. Never the example
    packaged inside cax: a site that lost its config must not act on the example's sites and
    Runs DB; without a config cax stops and says where it looked."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        if not os.path.exists(named):
            raise ConfigError(f"${CONFIG_ENV}={named}: no such file")
        return os.path.abspath(named)
    for candidate in ("cax.json", SYSTEM_CONFIG):
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    raise ConfigError(f"no config: looked for --config, ${CONFIG_ENV}, ./cax.json and "
                      f"{SYSTEM_CONFIG} (the example config: {packaged_config_path()}; a "
                      f"working demo: cax demo DIR)")


def default_host() -> str:
    return os.environ.get("CAX_HOST") or socket.gethostname().split(".")[0]


def _where(path: str, site: Optional[str], key: Optional[str]) -> str:
    parts = [path]
    if site is not None:
        parts.append(f"site {site!r}")
    if key is not None:
        parts.append(f"key {key!r}")
    return ": ".join(parts)


def _schema_error(path: str, site: Optional[str], err: jsonschema.ValidationError,
                  key_prefix: str = "") -> ConfigError:
    keys = [str(p) for p in err.absolute_path]
    key = ".".join(keys) if keys else None
    if key_prefix:
        key = key_prefix + ("." + key if key else "")
    if err.validator in ("anyOf", "oneOf") and isinstance(err.instance, dict):
        # "purge": {...} also may be true or a number: report what is wrong inside the object
        for sub in err.validator_value:
            if sub.get("type") == "object":
                inner = _first_error(sub, err.instance)
                if inner is not None:
                    return _schema_error(path, site, inner, key or "")
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        if extra:
            where = (key + "." if key else "") + extra[0]
            return ConfigError(f"{_where(path, site, where)}: "
                               f"{unknown_key(extra[0], err.schema.get('properties', {}))}")
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        key = (key + "." if key else "") + missing
        msg = "is required"
    elif err.validator in ("anyOf", "oneOf"):
        msg = f"has an invalid value {err.instance!r}"
    elif err.validator == "enum":
        msg = f"must be one of {', '.join(map(str, err.validator_value))}, not {err.instance!r}"
    elif err.validator == "additionalProperties":
        msg = err.message
    else:
        msg = err.message
    return ConfigError(f"{_where(path, site, key)}: {msg}")


def _one_edit(a: str, b: str) -> bool:
    """Whether ``b`` is ``a`` with one character inserted, deleted, replaced or two adjacent ones
    swapped: the typos worth a "did you mean" (a wider net suggests unrelated keys)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def unknown_key(key: str, known) -> str:
    """``unknown key 'x'``, with a "did you mean" when a known key is one edit away."""
    import difflib
    close = [k for k in difflib.get_close_matches(key, list(known), n=5, cutoff=0.6)
             if _one_edit(key, k)]
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _first_error(schema: dict, instance: Any):
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(instance),
                    key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    return errors[0] if errors else None


def _site_from(raw: dict, path: str, base_dir: str, strict: bool = False) -> Site:
    name = raw["name"]
    for key in sorted(set(raw) - KNOWN_SITE_KEYS):
        if strict:
            raise ConfigError(f"{_where(path, name, key)}: {unknown_key(key, KNOWN_SITE_KEYS)} "
                              f"(strict)")
        log.warning("%s: site %r: %s ignored", path, name, unknown_key(key, KNOWN_SITE_KEYS))
    method, unreachable, notes = classic.resolve_method(raw, METHODS)
    for note in notes:
        log.warning("%s: site %r: %s", path, name, note)
    if unreachable:
        log.warning("%s: site %r: not reachable from this cax: %s; its copies are left to other "
                    "tools", path, name, unreachable)

    def absolute(p: str) -> str:
        p = os.path.expanduser(p)
        return os.path.normpath(p if os.path.isabs(p) else os.path.join(base_dir, p))

    dirs = {}
    for dtype in DATA_TYPES:
        # an explicit "dir_<type>": null says the site has none, even when "directory" is set
        d = raw[f"dir_{dtype}"] if f"dir_{dtype}" in raw else raw.get("directory")
        if d:
            dirs[dtype] = absolute(d)
    data_type = raw.get("data_type") or [t for t in ("raw", "processed") if t in dirs] or ["raw"]
    for dtype in data_type:
        if dtype not in dirs and not unreachable:
            raise ConfigError(f"{_where(path, name, 'dir_' + dtype)}: site handles {dtype!r} data "
                              f"but has no directory for it (set 'directory' or 'dir_{dtype}')")

    purge = raw.get("purge")
    if purge is True:
        purge = {}
    elif purge is False or purge is None:
        purge = None
    elif isinstance(purge, int):
        purge, note = classic.purge_days(purge)
        log.warning("%s: site %r: %s", path, name, note)
    if purge is not None and purge.get("enabled") is False:
        purge = None
    else:
        proc = raw.get("processing") or {}
        current = set(raw.get("pax_versions") or []) | set(
            proc.get("versions") or proc.get("pax_versions") or [])
        purge, notes = classic.version_purge(raw.get("pax_version_purge"), purge, current)
        for note in notes:
            log.warning("%s: site %r: %s", path, name, note)
    if purge is not None:
        purge = {"min_copies": 2, "older_than_days": 0, "min_free_fraction": 0.0,
                 "types": ["raw"], "reverify_days": None, **purge}
        if purge.get("enabled") is False:
            purge = None

    scrub = raw.get("scrub")
    scrub = None if scrub in (None, False) else dict(SCRUB_DEFAULTS, **(scrub if isinstance(
        scrub, dict) else {}))
    if scrub is not None and scrub.get("enabled") is False:
        scrub = None

    processing = raw.get("processing")
    if processing is not None:
        processing = dict(processing)
        versions = processing.pop("pax_versions", None)
        processing.setdefault("versions", versions or raw.get("pax_versions") or [])
        local_jobs = processing.pop("max_local_jobs", None)
        if local_jobs is not None:
            processing.setdefault("max_jobs", local_jobs)
        processing.setdefault("backend", "local")
        for key in ("log_dir", "output_dir", "state_dir", "script_dir"):
            if key in processing:
                processing[key] = absolute(processing[key])
        for version in processing["versions"]:
            if not version or "/" in version or version.startswith((".", "-")) or ".." in version \
                    or not all(c.isalnum() or c in "_+=,@%:.-" for c in version):
                raise ConfigError(f"{_where(path, name, 'processing.versions')}: unsafe processor "
                                  f"version {version!r} (it becomes a directory name)")
        if processing["versions"] or "command" in processing:
            # processed data must land where AddChecksum, copies and purges look for them
            if "processed" not in dirs:
                raise ConfigError(f"{_where(path, name, 'processing')}: the site processes data but "
                                  f"has no directory for processed data (set 'dir_processed')")
            out = processing.setdefault("output_dir", dirs["processed"])
            root = dirs["processed"]
            if out != root and not out.startswith(root.rstrip(os.sep) + os.sep):
                raise ConfigError(f"{_where(path, name, 'processing.output_dir')}: {out} is outside "
                                  f"the site's processed-data directory {root}")
            if processing["versions"] and "command" not in processing:
                raise ConfigError(f"{_where(path, name, 'processing.command')}: is required when "
                                  f"'versions' are set")
        if "command" in processing:
            from cax.tasks.process import check_template  # late import: task modules import config
            try:
                check_template(processing["command"])
            except ValueError as e:
                raise ConfigError(f"{_where(path, name, 'processing.command')}: {e}")
        # the same checks a Job makes: found at submit time they would fail every run
        from cax.batch.base import RESOURCE_KEYS, resource_problem
        for key in RESOURCE_KEYS:
            problem = resource_problem(key, processing.get(key))
            if problem:
                raise ConfigError(f"{_where(path, name, 'processing.' + key)}: {problem}")

    mode = raw.get("mode")
    return Site(
        name=name,
        hostname=raw.get("hostname", "localhost") or "",
        username=raw.get("username"),
        port=raw.get("port", 22),
        method=method,
        dirs=dirs,
        upload_options=list(raw.get("upload_options") or []),
        download_options=list(raw.get("download_options") or []),
        data_type=list(data_type),
        purge=purge,
        scrub=scrub,
        pax_versions=list(raw.get("pax_versions") or []),
        task_list=raw.get("task_list"),
        dataset_list=raw.get("dataset_list"),
        key_file=absolute(raw["key_file"]) if raw.get("key_file") else None,
        known_hosts=absolute(raw["known_hosts"]) if raw.get("known_hosts") else None,
        max_transfers=raw.get("max_transfers", raw.get("parallel", 2)),
        stalled_after=float(raw.get("stalled_after", 3600)),
        max_retries=raw.get("max_retries", 3),
        retry_delay=float(raw.get("retry_delay", 300)),
        checksum_type=raw.get("checksum_type", "sha512"),
        processing=processing,
        processed_layout=raw.get("processed_layout", "version"),
        group=raw.get("group"),
        mode=int(mode, 8) if mode else None,
        stray_grace_days=float(raw.get("stray_grace_days", 7)),
        reference=bool(raw.get("reference", False)),
        metrics_file=absolute(raw["metrics_file"]) if raw.get("metrics_file") else None,
        unreachable=unreachable,
        raw=raw,
    )


class DuplicateKey(Exception):
    """args: (key, the object's 'name' or None, line where the object starts)"""


def strict_json(text: str):
    """``json.loads`` that refuses duplicate keys, naming the key, its site and the line.

    Python's json keeps the last of duplicate keys silently: a config where ``purge`` or a
    directory is given twice would run on whichever came last, not on what the admin read. The
    pure-Python scanner is used because it lets us see where each object starts.
    """
    decoder = json.JSONDecoder()

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
        s, start = s_and_end

        def pairs_hook(pairs):
            seen = set()
            for k, _v in pairs:
                if k in seen:
                    name = next((v for kk, v in pairs if kk == "name" and isinstance(v, str)),
                                None)
                    raise DuplicateKey(k, name, s.count("\n", 0, start) + 1)
                seen.add(k)
            return dict(pairs)

        return json.decoder.JSONObject(s_and_end, strict, scan_once, None, pairs_hook, memo)

    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    return decoder.decode(text)


def _non_finite(doc, path: str, text: str) -> None:
    """NaN and Infinity are not JSON, but Python accepts them (and 1e999 becomes Infinity):
    an ``interval`` of Infinity crashes the daemon after its first pass."""
    def walk(value, site, key):
        if isinstance(value, float) and not math.isfinite(value):
            import re
            m = re.search(r"(?<![\w\"])-?(Infinity|NaN)(?![\w\"])|\d[\d.]*[eE]\+?\d{3,}", text)
            line = f"line {text.count(chr(10), 0, m.start()) + 1}: " if m else ""
            raise ConfigError(f"{_where(path, site, key)}: {line}{value} is not allowed "
                              f"(numbers must be finite)")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, site, k if key is None else f"{key}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, site, f"{key}[{i}]")

    sites = doc.get("sites") if isinstance(doc, dict) else doc
    if isinstance(doc, dict):
        walk({k: v for k, v in doc.items() if k != "sites"}, None, None)
    for i, raw in enumerate(sites if isinstance(sites, list) else []):
        label = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) \
            else f"#{i + 1}"
        walk(raw, label, None)


def same_machine(a: Site, b: Site) -> bool:
    """Whether two sites' directories are on one filesystem namespace (same host, or both local)."""
    return a.hostname == b.hostname or (a.method == "local" and b.method == "local")


def _overlap(a: str, b: str) -> bool:
    a, b = a.rstrip(os.sep) or os.sep, b.rstrip(os.sep) or os.sep
    return (a == b or a.startswith(b.rstrip(os.sep) + os.sep)
            or b.startswith(a.rstrip(os.sep) + os.sep))


def _check_shared_directories(path: str, sites: list) -> None:
    """Two site names over one directory tree would make one physical copy count as two good
    copies, and a purge at either site would delete "the other" copy's files. Refused at load."""
    for i, a in enumerate(sites):
        for b in sites[i + 1:]:
            if not same_machine(a, b):
                continue
            both_local = a.method == "local" and b.method == "local"
            for ta, da in a.dirs.items():
                for tb, db_ in b.dirs.items():
                    pairs = [(da, db_)]
                    if both_local:
                        pairs.append((os.path.realpath(da), os.path.realpath(db_)))
                    if any(_overlap(x, y) for x, y in pairs):
                        key = next((k for k in (f"dir_{tb}", "directory") if b.raw.get(k)),
                                   "directory")
                        raise ConfigError(
                            f"{_where(path, b.name, key)}: {db_} overlaps the {ta} directory {da} "
                            f"of site {a.name!r} on the same host ({b.hostname}); one copy would "
                            f"count as two")


#: the environment variable naming the Runs DB (URI or path); ``--runs-db`` wins over it
RUNS_DB_ENV = "CAX_RUNS_DB"


def parse(text: str, path: str, runs_db: Optional[str] = None, strict: bool = False) -> Config:
    """Parse and validate config text; raises ConfigError with a one-line message.
    ``runs_db`` (``--runs-db``) or else ``$CAX_RUNS_DB`` replaces the config's ``runs_db``."""
    try:
        return _parse(text, path, runs_db, strict)
    except RecursionError:
        # the JSON scanner, the schema and cax's own walks all recurse per level
        raise ConfigError(f"{path}: {TOO_DEEP}")


#: what a JSON document nested beyond Python's recursion limit is told (config and runs add)
TOO_DEEP = "nested too deeply (lists or objects inside each other beyond Python's recursion limit)"


def utf8_text(data: bytes, where: str) -> str:
    """``data`` decoded as UTF-8 (what JSON must be), or one ConfigError line naming the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8")


def uri_problem(uri: str) -> str:
    """Why a ``mongodb://`` URI cannot be used, in one line without its password; '' if it can.

    Checked at load so a typo is a config error (exit 2) before anything runs, not a traceback
    from the driver. ``mongodb+srv://`` URIs are only split: resolving them is a DNS query.
    """
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (raises on a bad port)
        password = parts.password
        if not parts.hostname:
            return "no host"
        if uri.startswith("mongodb://"):
            from pymongo import uri_parser
            uri_parser.parse_uri(uri, warn=True)
    except Exception as e:  # ValueError, InvalidURI, ConfigurationError: all one line here
        msg = " ".join(str(e).split())[:200]
        try:
            password = urlsplit(uri).password
        except ValueError:
            password = None
        return msg.replace(password, "***") if password else msg
    return ""


def _parse(text: str, path: str, override: Optional[str] = None, strict: bool = False) -> Config:
    try:
        doc = strict_json(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
    except DuplicateKey as e:
        key, site, line = e.args
        raise ConfigError(f"{_where(path, site, key)}: appears twice in the object starting at "
                          f"line {line}")
    _non_finite(doc, path, text)
    classic_form = isinstance(doc, list)
    if classic_form:  # the classic form: a bare list of sites
        doc = {"sites": doc}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a list of sites or an object with 'sites'")
    err = _first_error(TOP_SCHEMA, doc)
    if err is not None:
        raise _schema_error(path, None, err)
    strict = strict or bool(doc.get("strict"))
    for key in sorted(set(doc) - KNOWN_TOP_KEYS):
        if strict:
            raise ConfigError(f"{_where(path, None, key)}: {unknown_key(key, KNOWN_TOP_KEYS)} "
                              f"at the top level (strict)")
        log.warning("%s: %s at the top level ignored", path, unknown_key(key, KNOWN_TOP_KEYS))

    base_dir = os.path.dirname(os.path.abspath(path))
    sites: dict = {}
    for i, raw in enumerate(doc["sites"]):
        label = raw.get("name") if isinstance(raw.get("name"), str) else f"#{i + 1}"
        err = _first_error(SITE_SCHEMA, raw)
        if err is not None:
            raise _schema_error(path, label, err)
        if raw["name"] in sites:
            raise ConfigError(f"{_where(path, raw['name'], 'name')}: duplicate site name")
        sites[raw["name"]] = _site_from(raw, path, base_dir, strict)

    for site in sites.values():
        for key in ("upload_options", "download_options"):
            for other in getattr(site, key):
                if other not in sites:
                    raise ConfigError(f"{_where(path, site.name, key)}: names unknown site "
                                      f"{other!r} (known: {', '.join(sites)})")
                if other == site.name:
                    raise ConfigError(f"{_where(path, site.name, key)}: names the site itself")

    # cax never reads or writes an unreachable site's directories
    _check_shared_directories(path, [s for s in sites.values() if not s.unreachable])

    def check_tasks(names, site_name):
        """The task_list in this cax's names (None: not given), and the error for an unknown
        name (or None). Classic names are mapped or skipped, each with a warning."""
        if not names:
            return None, None
        tasks, notes, unknown = classic.map_tasks(names, TASK_NAMES)
        for note in notes:
            log.warning("%s: %s", _where(path, site_name, "task_list"), note)
        problem = None
        if unknown:
            problem = (f"{_where(path, site_name, 'task_list')}: unknown task {unknown[0]!r} "
                       f"(known: {', '.join(DEFAULT_TASKS)})")
        return tasks, problem

    task_list, problem = check_tasks(doc.get("task_list"), None)
    if problem:  # the top-level list is every site's
        raise ConfigError(problem)
    for site in sites.values():
        site.task_list, site.task_problem = check_tasks(site.raw.get("task_list"), site.name)
        if site.task_problem:
            log.warning("%s; a cax daemon started as %r exits 2", site.task_problem, site.name)

    runs_db = doc.get("runs_db") or "cax.runsdb"
    named = "runs_db" in doc or not classic_form
    where = _where(path, None, "runs_db")
    packaged = os.path.abspath(path) == packaged_config_path()
    db_dir = state_dir() if packaged else base_dir
    if override is None and os.environ.get(RUNS_DB_ENV):
        override, where = os.environ[RUNS_DB_ENV], f"${RUNS_DB_ENV}"
    elif override is not None:
        where = "--runs-db"
    if override is not None:  # a path on the command line or in the environment is the shell's
        runs_db, named, packaged, db_dir = override, True, False, os.getcwd()
    if runs_db.startswith(("mongodb://", "mongodb+srv://")):
        problem = uri_problem(runs_db)
        if problem:
            from cax.runsdb import redact_uri
            raise ConfigError(f"{where}: not a valid MongoDB URI "
                              f"{redact_uri(runs_db)}: {problem}")
    else:
        runs_db = os.path.normpath(os.path.join(db_dir, os.path.expanduser(runs_db)))
    from cax import children
    children.hide(doc.get("password_env", "MONGO_PASSWORD"))  # no child of cax inherits it
    return Config(
        path=path,
        sites=sites,
        runs_db=runs_db,
        password_env=doc.get("password_env", "MONGO_PASSWORD"),
        database=doc.get("database", "run"),
        collection=doc.get("collection", "runs_new"),
        task_list=task_list,
        dataset_list=doc.get("dataset_list"),
        interval=float(doc.get("interval", 60)),
        wake_on_change=bool(doc.get("wake_on_change", False)),
        runs_db_timeout=float(doc.get("runs_db_timeout", 5.0)),
        lock_dir=doc.get("lock_dir"),
        runs_db_in_state_dir=packaged and not runs_db.startswith(("mongodb://", "mongodb+srv://")),
        runs_db_named=named,
        runs_db_origin=where if override is not None else None,
    )


def load(path: Optional[str] = None, runs_db: Optional[str] = None, strict: bool = False) -> Config:
    path = os.path.abspath(path or default_config_path())
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}")
    return parse(utf8_text(data, path), path, runs_db, strict)
