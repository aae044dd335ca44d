"""The Prometheus textfile a site's daemon rewrites after every pass (site key ``metrics_file``).

A site's monitoring already scrapes node_exporter; its textfile collector picks up any
``*.prom`` file in a directory, which needs no port opened by cax and works for ``cax --once``
from cron as well as for the daemon. The file is written with prometheus_client (its format, and
an atomic rename, so a scrape never reads half a file). Values are those of the last pass, plus
the time of the last complete pass, which survives restarts (read back from the previous file):
alert on ``time() - cax_last_complete_pass_timestamp_seconds``.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("cax.metrics")

LAST_COMPLETE = "cax_last_complete_pass_timestamp_seconds"


def _previous_complete(path: str) -> Optional[float]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == LAST_COMPLETE:
                    return sample.value
    except (OSError, ValueError):  # no file yet, or not ours: start afresh
        return None
    return None


#: error kinds nothing heals by itself: a human must look (docs/operations.rst)
NEEDS_A_HUMAN = ("retry-failed", "unsafe-location")


def stuck_datums(db, host: str) -> int:
    """Datums at ``host`` that no task will move on by itself (``stuck``, or an error of a kind
    nothing heals)."""
    def stuck(d):
        return d.get("host") == host and (d.get("status") == "stuck" or (
            d.get("status") == "error" and d.get("error_kind") in NEEDS_A_HUMAN))
    query = {"data": {"$elemMatch": {"host": host, "$or": [
        {"status": "stuck"}, {"status": "error", "error_kind": {"$in": list(NEEDS_A_HUMAN)}}]}}}
    return sum(sum(1 for d in run.get("data") or [] if isinstance(d, dict) and stuck(d))
               for run in db.find_runs(query, {"data": 1}))


def write(path: str, site: str, report, *, seconds: float, queries: int, stuck: int,
          complete: bool) -> None:
    """Rewrite ``path`` with the pass just ended."""
    t = time.time()
    reg = CollectorRegistry()
    labels = {"site": site}
    copies = Gauge("cax_pass_copies", "Copies made by the last pass",
                   ["site", "direction", "method"], registry=reg)
    nbytes = Gauge("cax_pass_bytes", "Bytes copied by the last pass",
                   ["site", "direction", "method"], registry=reg)
    for (direction, method), n in report.copies.items():
        copies.labels(site, direction, method).set(n)
        nbytes.labels(site, direction, method).set(report.bytes[(direction, method)])
    failures = Gauge("cax_pass_failures", "Failures recorded by the last pass, by error kind",
                     ["site", "kind"], registry=reg)
    for kind, n in report.failures.items():
        failures.labels(site, kind).set(n)
    unreachable = Gauge("cax_pass_unreachable_sites", "Sites the last pass could not reach",
                        ["site", "remote"], registry=reg)
    for remote in report.unreachable:
        unreachable.labels(site, remote).set(1)
    for name, doc, value in (
            ("cax_pass_retries", "Copies sent again by the last pass's healing", report.retries),
            ("cax_pass_duration_seconds", "Duration of the last pass", seconds),
            ("cax_pass_runsdb_queries", "Runs DB round trips of the last pass", queries),
            ("cax_stuck_datums", "Datums at this site that need a human", stuck),
            ("cax_last_pass_timestamp_seconds", "When the last pass ended", t)):
        Gauge(name, doc, ["site"], registry=reg).labels(**labels).set(value)
    last = t if complete else _previous_complete(path)
    if last is not None:
        Gauge(LAST_COMPLETE, "When the last pass that did everything it could ended",
              ["site"], registry=reg).labels(**labels).set(last)
    try:
        write_to_textfile(path, reg)
    except OSError as e:
        log.warning("site=%s metrics file %s not written: %s", site, path, e.strerror or e)
