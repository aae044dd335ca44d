"""The datum lifecycle as a state machine: several daemons on the same runs, in any interleaving.

Hypothesis drives the real tasks (``Task.go()`` of the registry's classes), the real delete
protocol (:func:`cax.deletion.delete_steps`, a generator yielding between its decision, mark and
removal) and a mongomock Runs DB, on three local sites with real files:

* ``daq`` holds the origin and pushes to ``buffer``; ``archive`` pulls from ``buffer``; two daemons
  (``archive``, ``archive-2``) act as the archive site. ``daq`` and ``buffer`` purge
  (``BufferPurger``) with ``min_copies`` drawn; ``purge.reverify_days`` is 0 (every counted copy is
  re-hashed first), ``stalled_after`` and ``retry_delay`` are 0 (what is not finished is stalled
  at once, since nothing runs between two steps), ``max_retries`` is high (heals never run out).
* Steps: one task pass of one daemon; a *stale* pass (candidates read, other steps, then the pass
  acts on what it read, as a daemon does whose read raced another's write); a purger started,
  advanced one step, or crashed (abandoned); a fault armed for a daemon's next matching event; a
  copy going bad behind cax's back (a byte flipped, a file removed, the copy deleted).
* Faults are keyed on the one-line log events the tasks write (``copy start``, ``copy done``,
  ``checksum start``): the daemon dies there (an exception no task catches: what it wrote stays),
  is asked to stop (SIGTERM: the copy is ``interrupted``), finds its destination blocked for this
  attempt (the copy ``failed``), or the copy lands with a flipped byte (a ``checksum`` mismatch).

After every step (:meth:`LifecycleMachine.invariants`):

1. at most one datum per key (host, type, pax_version) in a run;
2. no step of cax takes a run's *real* good copies below ``min(min_copies, what it had)``: good
   means ``transferred`` with the reference checksum *and* files present that hash to it (copies
   go bad behind cax's back only outside a purger's check-to-removal window, as in
   tests/test_purge_property.py);
3. every ``error`` datum has a one-line ``error`` and an ``error_kind``;
4. every datum in a state that is not final has an owner that picks it up: a site of the config
   whose task list has the task that finishes it (:func:`finishers`, read off the tasks' queries);
5. no task died of an unexpected exception (``Task.go`` logs those and goes on).

At the end every fault is cleared, crashed purgers stay abandoned, and every daemon runs full
passes until nothing changes: then no datum may be left ``transferring``, ``verifying``,
``retrying``, ``deleting``, or ``error`` of a kind its owner heals while a good copy exists.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cax import config as cfgmod
from cax import deletion
from cax.checksum import checksum
from cax.daemon import run_pass
from cax.tasks import task_class
from cax.tasks.base import Context
from tests.helpers import mongomock_db
from tests.purge_helpers import add_run, sites_config

SITES = ("daq", "buffer", "archive")
#: daemon name -> the site it acts as: two daemons for the archive site
DAEMONS = {"daq": "daq", "buffer": "buffer", "archive": "archive", "archive-2": "archive"}
PURGING = ("daq", "buffer")
#: the tasks the machine runs one at a time (the rest, e.g. processing, have nothing to do here)
TASKS = ("AddChecksum", "CompareChecksums", "RetryStalledTransfer", "RetryBadChecksumTransfer",
         "AddSize", "VerifyCopies", "BufferPurger")
#: (daemon, task) steps; the copies and heals, where the faults happen, drawn more often
STEPS = tuple([(d, t) for d in DAEMONS for t in TASKS]
              + [("daq", "CopyPush")] * 4 + [("archive", "CopyPull")] * 3
              + [("archive-2", "CopyPull")] * 3
              + [(d, t) for d in DAEMONS for t in ("RetryStalledTransfer",
                                                   "RetryBadChecksumTransfer")])
#: the steps that copy or verify: where the faults' events happen
FAULT_STEPS = (("daq", "CopyPush"), ("archive", "CopyPull"), ("archive-2", "CopyPull"),
               ("buffer", "AddChecksum"), ("archive", "AddChecksum"))
#: (log event, what happens there)
FAULTS = (("copy start", "kill"), ("copy start", "interrupt"), ("copy start", "fail"),
          ("copy done", "corrupt"), ("copy done", "kill"), ("checksum start", "kill"))

FINAL = ("transferred", "error")
#: error kinds the owner's RetryStalledTransfer sends again; the datum's own site's
#: RetryBadChecksumTransfer replaces the copies found bad (from a good copy elsewhere)
RESENT = ("stalled", "interrupted", "failed", "unverified", "no-space")
REPLACED = ("checksum", "lost", "corrupt")
# ``size`` (AddSize) is not healed: AddSize judges a copy by the size recorded at the reference
# copy, and when that copy went bad before it was measured, the copy flagged is the good one
# (this machine finds that case: a good copy flagged, run below min_copies real good copies).


class DaemonKilled(BaseException):
    """The daemon's process ends here (kill -9): no task catches it, nothing more is written."""


def owner(datum) -> str:
    """The site that claimed the datum (``creation_place``), else the one holding it."""
    return datum.get("creation_place") or datum["host"]


def unfinished(datum) -> bool:
    """Not in a final state: on its way, or an error some task heals. An error no task heals
    (an origin's: it has nowhere to be copied from; kinds for a human) is final."""
    status, kind = datum.get("status"), datum.get("error_kind")
    if status not in FINAL:
        return True
    return status == "error" and (kind in REPLACED
                                  or (kind in RESENT and bool(datum.get("source"))))


def finishers(datum, config) -> list:
    """(site, task) pairs whose pass picks up ``datum`` in its current state and moves it on.

    Read off the tasks' candidate queries: a copy in flight or failed is its owner's
    (RetryStalledTransfer: stalled, then removed and sent again, or verified where it landed); a
    ``verifying`` datum is also its site's AddChecksum's, and a pushed one its pusher's; a copy
    found bad is its site's RetryBadChecksumTransfer's; ``deleting`` is its site's BufferPurger's
    (every site finishes those, even one that never purges). Other errors wait for a human.
    """
    status, kind = datum.get("status"), datum.get("error_kind")
    out = []
    if datum.get("source") and (status in ("transferring", "verifying", "retrying")
                                or (status == "error" and kind in RESENT)):
        out.append((owner(datum), "RetryStalledTransfer"))
    if status == "verifying":
        out.append((datum["host"], "AddChecksum"))
        pusher = config.sites.get(datum.get("creation_place"))
        if pusher is not None and datum["host"] in (pusher.upload_options or []):
            out.append((pusher.name, "AddChecksum"))
    if status == "retrying" or (status == "error" and kind in REPLACED):
        out.append((datum["host"], "RetryBadChecksumTransfer"))
    if status == "deleting":
        out.append((datum["host"], "BufferPurger"))
    return [(s, t) for s, t in out if s in config.sites and t in config.tasks_for(s)]


class _Events(logging.Filter):
    """Sees every line the tasks log: fires the armed faults, notes tasks that crashed."""

    CRASH = re.compile(r" (failed|copy worker failed): [A-Za-z_.]*(Error|Exception)\b")

    def __init__(self, machine):
        super().__init__()
        self.machine = machine

    def filter(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.ERROR and self.CRASH.search(msg):
            self.machine.crashes.append(msg)
        self.machine.on_event(msg)
        return True


class LifecycleMachine(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="caxlife"))
        self.crashes: list = []
        self.armed: dict = {}  # daemon -> (event, action)
        self.fired: list = []
        self.current = None  # (daemon, Context) of the step running now
        self.blockers: list = []
        self.purgers: list = []  # [generator, in_flight]
        self.pending: list = []  # stale passes: (daemon, task name, runs as read)
        self.logger = logging.getLogger("cax.task")
        self.filter = _Events(self)
        self.old_level = self.logger.level
        self.logger.setLevel(logging.INFO)  # the events are INFO lines
        self.logger.addFilter(self.filter)

    @initialize(min_copies=st.integers(1, 2), nruns=st.integers(1, 2))
    def setup(self, min_copies, nruns):
        self.m = min_copies
        # one copy at a time: a step is over when its task returns
        common = {"stalled_after": 0, "retry_delay": 0, "max_retries": 1000, "max_transfers": 1}
        extra = {n: dict(common) for n in SITES}
        extra["daq"]["upload_options"] = ["buffer"]
        extra["archive"]["download_options"] = ["buffer"]
        path = sites_config(self.tmp, names=SITES, extra=extra,
                            purge={n: {"min_copies": min_copies, "reverify_days": 0}
                                   for n in PURGING})
        self.config = cfgmod.load(path)
        self.db = mongomock_db()
        self.truth, self.run_ids = {}, []
        for number in range(1, nruns + 1):
            run = add_run(self.db, self.tmp, number, {"daq": "transferred"}, ref_host="daq")
            self.truth[run["_id"]] = run["references"][0]["checksum"]
            self.run_ids.append(run["_id"])
        self.baseline = self.real_good()

    def teardown(self):
        try:
            if getattr(self, "db", None) is not None:
                self.drain()
        finally:
            self.logger.removeFilter(self.filter)
            self.logger.setLevel(self.old_level)
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- reading the state ------------------------------------------------------------------
    def runs(self) -> list:
        return [self.db.run(rid) for rid in self.run_ids]

    def real_good(self) -> dict:
        """Copies cax counts as good whose files are really there and hash to the truth."""
        out = {}
        for run in self.runs():
            truth = self.truth[run["_id"]]
            out[run["_id"]] = sum(
                1 for d in run.get("data") or []
                if d.get("status") == "transferred" and d.get("checksum") == truth
                and os.path.isdir(d.get("location") or "") and checksum(d["location"]) == truth)
        return out

    def context(self, daemon) -> Context:
        return Context(config=self.config, host=DAEMONS[daemon], db=self.db)

    # -- faults -----------------------------------------------------------------------------
    def on_event(self, msg):
        if self.current is None:
            return
        daemon, ctx = self.current
        fault = self.armed.get(daemon)
        if fault is None or not msg.startswith(f"run=") or f" {fault[0]} " not in f" {msg} ":
            return
        event, action = self.armed.pop(daemon)
        self.fired.append((daemon, event, action))
        note(f"fault fired: {action} at {event}")
        if action == "kill":
            raise DaemonKilled(f"{daemon} killed at {event}")
        if action == "interrupt":
            ctx.stop.set()
            return
        location = self.location_of(msg)
        if action == "fail":  # something not ours sits under the final name, for this attempt
            Path(location).write_bytes(b"not ours")
            self.blockers.append(location)
        elif action == "corrupt":  # arrived with a byte flipped: same size, other checksum
            flip(location)

    def location_of(self, msg) -> str:
        run = re.search(r"run=(\S+)", msg).group(1)
        host = re.search(r"datum=\w+@(\w+)", msg).group(1)
        return os.path.join(self.config.site(host).data_dir("raw"), run)

    def clear_blockers(self):
        for b in self.blockers:
            if os.path.isfile(b):
                os.unlink(b)
        self.blockers.clear()

    def act(self, daemon, fn):
        """Run one step of ``daemon``; a kill ends it where it was, like kill -9."""
        ctx = self.context(daemon)
        self.current = (daemon, ctx)
        try:
            fn(ctx)
        except DaemonKilled:
            pass
        finally:
            self.current = None
            self.clear_blockers()

    # -- steps ------------------------------------------------------------------------------
    @rule(step=st.sampled_from(STEPS))
    def task_pass(self, step):
        daemon, name = step
        self.act(daemon, lambda ctx: task_class(name)(ctx).go())

    @rule(step=st.sampled_from(FAULT_STEPS), fault=st.sampled_from(FAULTS))
    def faulty_pass(self, step, fault):
        """The pass meets ``fault`` at its first matching event (if it has one)."""
        daemon, name = step
        self.armed[daemon] = fault
        self.act(daemon, lambda ctx: task_class(name)(ctx).go())
        self.armed.clear()

    @rule(step=st.sampled_from(STEPS))
    def stale_read(self, step):
        daemon, name = step
        task = task_class(name)(self.context(daemon))
        self.pending.append((daemon, name, list(task.candidates())))

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def stale_pass(self, data):
        daemon, name, runs = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))

        def go(ctx):
            task = task_class(name)(ctx)
            task.candidates = lambda: iter(runs)  # acts on what it read earlier
            task.go()
        self.act(daemon, go)

    @rule(site=st.sampled_from(PURGING), which=st.integers(0, 1))
    def start_purger(self, site, which):
        rid = self.run_ids[which % len(self.run_ids)]
        gen = deletion.delete_steps(self.db, self.config.site(site), rid,
                                    {"host": site, "type": "raw"}, min_copies=self.m,
                                    sites=self.config.sites, reverify_days=0)
        self.purgers.append([gen, False])

    @precondition(lambda self: self.purgers)
    @rule(data=st.data(), crash=st.booleans())
    def purger_step(self, data, crash):
        i = data.draw(st.integers(0, len(self.purgers) - 1))
        gen, _ = self.purgers[i]
        if crash:
            gen.close()  # abandoned mid-way: the next BufferPurger pass finishes what it began
            del self.purgers[i]
            return
        try:
            self.purgers[i][1] = next(gen) in ("decided", "marked")
        except StopIteration as end:
            note(f"purger: {getattr(end.value, 'action', end.value)}")
            del self.purgers[i]

    @precondition(lambda self: not any(p[1] for p in self.purgers))
    @rule(site=st.sampled_from(SITES), which=st.integers(0, 1),
          how=st.sampled_from(("corrupt", "truncate", "delete")))
    def harm(self, site, which, how):
        """A copy goes bad behind cax's back (never inside a purger's check-to-removal window)."""
        run = self.runs()[which % len(self.run_ids)]
        if any(d.get("status") == "deleting" for d in run["data"]):
            return
        d = next((d for d in run["data"] if d["host"] == site), None)
        if d is None or not os.path.isdir(d.get("location") or ""):
            return
        if how == "delete":
            shutil.rmtree(d["location"])
        elif how == "truncate":
            files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d["location"]) for f in fs)
            if files:
                os.unlink(files[0])
        else:
            flip(d["location"])
        self.baseline = self.real_good()

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def after_every_step(self):
        if getattr(self, "db", None) is not None:
            self.assert_invariants()

    def assert_invariants(self):
        now_good = self.real_good()
        for run in self.runs():
            data = run.get("data") or []
            keys = [(d["host"], d["type"], d.get("pax_version")) for d in data]
            assert len(keys) == len(set(keys)), f"two datums with one key: {data}"
            rid = run["_id"]
            assert now_good[rid] >= min(self.m, self.baseline[rid]), (
                f"run {run['name']}: a step of cax took it from {self.baseline[rid]} to "
                f"{now_good[rid]} real good copies (min_copies {self.m}): {data}")
            for d in data:
                note(f"seen: {d.get('status')} {d.get('error_kind') or ''}".strip())
                if d.get("status") == "error":
                    reason = d.get("error")
                    assert isinstance(reason, str) and reason.strip() and "\n" not in reason, d
                    assert d.get("error_kind"), f"error without a kind: {d}"
                if unfinished(d):
                    assert finishers(d, self.config), (
                        f"run {run['name']}: {d['host']} datum {d.get('status')} "
                        f"({d.get('error_kind')}) has no owner whose tasks finish it: {d}")
        assert not self.crashes, f"a task died of an unexpected exception: {self.crashes}"
        self.baseline = now_good

    # -- the end ----------------------------------------------------------------------------
    def drain(self):
        """Faults off; every daemon runs full passes until nothing changes."""
        self.armed.clear()
        for gen, _ in self.purgers:  # purgers still alive run to their end
            for _step in gen:
                self.assert_invariants()
        self.purgers.clear()
        before = None
        for _ in range(12):
            for daemon in sorted(DAEMONS):
                self.act(daemon, run_pass)
                self.assert_invariants()
            state = [run["data"] for run in self.runs()]
            if state == before:
                break
            before = state
        else:
            raise AssertionError(f"passes never settled: {before}")
        for run in self.runs():
            good = self.real_good()[run["_id"]]
            for d in run["data"]:
                assert d["status"] in FINAL, (
                    f"run {run['name']}: {d['host']} datum left {d['status']} after every daemon "
                    f"ran until nothing changed: {d}")
                if d["status"] == "error" and good:
                    assert not unfinished(d), (
                        f"run {run['name']}: {d['host']} datum left in error "
                        f"({d.get('error_kind')}: {d.get('error')}) though a good copy exists")


def note(what: str) -> None:
    """What the examples exercised (``--hypothesis-show-statistics``)."""
    event(what)


def flip(location):
    """One byte of the copy's first non-empty file flipped: same size, another checksum."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(location) for f in fs)
    victim = next((f for f in files if os.path.getsize(f)), None)
    if victim is None:
        return
    with open(victim, "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_bad_reference_copy_gets_no_good_copy_flagged(monkeypatch):
    """The machine's shortest find, replayed: daq's origin loses a file behind cax's back after
    the copies were made and verified; AddSize records the origin's (wrong) size, then flags
    buffer's good copy ``size``: two real good copies become one (min_copies 2)."""
    monkeypatch.setattr(sys.modules[__name__], "note", lambda what: None)
    machine = LifecycleMachine()
    try:
        machine.setup(min_copies=2, nruns=1)
        for step in (("daq", "CopyPush"), ("archive", "CopyPull")):
            machine.task_pass(step)
        machine.harm("daq", 0, "truncate")
        for step in (("daq", "AddSize"), ("buffer", "AddSize")):
            machine.task_pass(step)
            machine.assert_invariants()
    finally:
        machine.db = None  # no drain: the state is what is asserted on
        machine.teardown()


LifecycleMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("CAX_LIFECYCLE_EXAMPLES", "50")), stateful_step_count=40,
    deadline=None, report_multiple_bugs=False,
    # no explain phase: its tracing (Python < 3.12) makes every step many times slower
    phases=[Phase.explicit, Phase.reuse, Phase.generate]
    + ([Phase.shrink] if os.environ.get("CAX_LIFECYCLE_SHRINK", "1") == "1" else []),
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=list(HealthCheck))
test_lifecycle_machine = LifecycleMachine.TestCase
