"""Logs as a site admin reads them: UTC with an offset, JSON for shippers, quiet cron, rotation."""
import json
import logging
import os
import re

import pytest

from cax import logs
from cax.config import load
from cax.runsdb import connect
from tests.helpers import make_raw, run_cax, run_doc, three_sites



cax = run_cax


@pytest.fixture
def restore_logging():
    yield
    logs.setup("WARNING")


def test_text_lines_carry_utc_with_an_explicit_offset(tmp_path, restore_logging):
    path = tmp_path / "cax.log"
    logs.setup("INFO", str(path))
    logging.getLogger("cax.test").info("run=r1 task=T site=s hello")
    line = path.read_text().strip()
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 INFO ", line), line


def test_json_lines_are_objects_with_the_context_words_as_fields(tmp_path, restore_logging):
    path = tmp_path / "cax.log"
    logs.setup("INFO", str(path), "json")
    log = logging.getLogger("cax.test")
    log.info("run=%s task=%s site=%s datum=%s %s", "170101_0000", "CopyPush", "daq",
             "buffer/raw", 'copied 3 files "fast"')
    log.warning("site=daq a line with no run")
    try:
        raise ValueError("boom")
    except ValueError:
        log.error("site=daq failed", exc_info=True)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert events[0]["run"] == "170101_0000" and events[0]["task"] == "CopyPush"
    assert events[0]["site"] == "daq" and events[0]["datum"] == "buffer/raw"
    assert events[0]["message"] == 'copied 3 files "fast"'
    assert events[0]["level"] == "INFO" and events[0]["time"].endswith("+00:00")
    assert "run" not in events[1] and events[1]["message"] == "a line with no run"
    assert "ValueError: boom" in events[2]["exc"] and len(events) == 3


def test_log_file_follows_logrotate_moving_it(tmp_path, restore_logging):
    path = tmp_path / "cax.log"
    logs.setup("INFO", str(path))
    log = logging.getLogger("cax.test")
    log.info("before rotation")
    os.rename(path, tmp_path / "cax.log.1")
    log.info("after rotation")
    assert "before rotation" in (tmp_path / "cax.log.1").read_text()
    assert "after rotation" not in (tmp_path / "cax.log.1").read_text()
    assert "after rotation" in path.read_text()


def test_reopen_sees_copy_and_truncate(tmp_path, restore_logging):
    path = tmp_path / "cax.log"
    logs.setup("INFO", str(path))
    log = logging.getLogger("cax.test")
    log.info("x" * 100)
    os.truncate(path, 0)
    logs.reopen()
    log.info("fresh")
    assert path.read_text().startswith(tuple("0123456789"))  # no hole of NULs before it
    assert "fresh" in path.read_text()


def _site_with_a_run(tmp_path, copied: bool):
    cfg = three_sites(tmp_path)
    db = connect(load(cfg))
    loc = make_raw(tmp_path / "daq", "170101_0000")
    db.insert_run(run_doc(1, "170101_0000", loc, status="transferred"))
    if copied:  # the copies the passes would make, already there, and checked
        for host in ("daq", "daq", "buffer", "archive", "archive", "daq", "buffer", "archive"):
            assert cax("--config", cfg, "--host", host, "--once").returncode == 0
    return cfg


def test_idle_once_under_cron_prints_nothing(tmp_path):
    cfg = _site_with_a_run(tmp_path, copied=True)
    r = cax("--config", cfg, "--host", "daq", "--once")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""


def test_busy_once_under_cron_prints_the_routine_lines_around_the_work(tmp_path):
    cfg = _site_with_a_run(tmp_path, copied=False)
    r = cax("--config", cfg, "--host", "daq", "--once")
    assert r.returncode == 0
    lines = r.stderr.splitlines()
    starting = next(i for i, l in enumerate(lines) if "starting: config" in l)
    first = next(i for i, l in enumerate(lines) if "pass 1 start" in l)
    work = next(i for i, l in enumerate(lines) if "run=170101_0000" in l)
    end = next(i for i, l in enumerate(lines) if "pass 1 end" in l)
    assert starting < first < work < end, r.stderr


def test_an_explicit_level_keeps_the_routine_lines(tmp_path):
    cfg = _site_with_a_run(tmp_path, copied=True)
    r = cax("--config", cfg, "--host", "daq", "--once", "--log", "INFO")
    assert "pass 1 end" in r.stderr


def test_quiet_and_verbose(tmp_path):
    cfg = _site_with_a_run(tmp_path, copied=False)
    r = cax("--config", cfg, "--host", "daq", "--once", "-q")
    assert r.returncode == 0 and " INFO " not in r.stderr
    r = cax("--config", cfg, "--host", "buffer", "--once", "-v")
    assert r.returncode == 0 and " DEBUG " in r.stderr
    r = cax("--config", cfg, "--host", "daq", "--once", "-q", "--log", "DEBUG")
    assert r.returncode == 2 and "give one of them" in r.stderr


def test_json_format_from_the_command_line(tmp_path):
    cfg = _site_with_a_run(tmp_path, copied=False)
    r = cax("--config", cfg, "--host", "daq", "--once", "--log-format", "json")
    events = [json.loads(line) for line in r.stderr.splitlines()]
    assert any(e.get("run") == "170101_0000" and e.get("site") == "daq" for e in events)
