"""The shipped deployment files (contrib/): the systemd unit's daemon as the unit starts it,
SIGHUP with a changed and with a broken config, logrotate, and the cron line."""
import configparser
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from cax.config import load
from cax.runsdb import connect
from tests.helpers import make_raw, run_doc, statuses, three_sites
from tests.waiting import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib")


def unit():
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read(os.path.join(CONTRIB, "systemd", "cax.service"))
    return parser


def env_file(path):
    """KEY=VALUE lines as systemd's EnvironmentFile reads them (comments and blanks skipped)."""
    out = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_unit_is_hardened_and_restarts_on_failure():
    service = unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert service["Type"] in ("simple", "notify")
    assert service["User"] == "cax" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["PrivateTmp"] == "yes"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/cax/cax.env"
    assert "-HUP" in service["ExecReload"]
    # the password comes from the environment file, never from the command line
    assert "PASSWORD" not in service["ExecStart"].upper()
    assert "PASSWORD" in open(os.path.join(CONTRIB, "cax.env.example")).read()
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                            os.path.join(CONTRIB, "systemd", "cax.service")],
                           capture_output=True, text=True)
        assert "Unknown key" not in r.stderr and "Invalid" not in r.stderr, r.stderr


def _as_the_unit_would(tmp_path, config_path, log_path):
    """ExecStart's argv with the installed paths replaced by this checkout's, and the
    environment the unit gives it (EnvironmentFile, then Environment=)."""
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/cax/.venv/bin/cax"
    argv = [sys.executable, "-m", "cax"] + [
        {"/etc/cax/cax.json": config_path, "/var/log/cax/cax.log": log_path}.get(a, a)
        for a in argv[1:]]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": ROOT}
    env.update(env_file(os.path.join(CONTRIB, "cax.env.example")))
    key, _, value = service["Environment"].partition("=")
    env[key] = str(tmp_path / "state") if value == "/var/lib/cax" else value
    return argv, env


def test_daemon_under_the_units_settings_reloads_on_sighup_and_follows_logrotate(tmp_path):
    cfg = three_sites(tmp_path, interval=3600)
    doc = json.loads(open(cfg).read())
    doc["sites"][0]["upload_options"] = []  # the daq pushes nowhere yet
    open(cfg, "w").write(json.dumps(doc))
    db = connect(load(cfg))
    loc = make_raw(tmp_path / "daq", "170101_0000")
    db.insert_run(run_doc(1, "170101_0000", loc, status="transferred"))
    log_path = str(tmp_path / "log" / "cax.log")
    os.makedirs(os.path.dirname(log_path))
    argv, env = _as_the_unit_would(tmp_path, cfg, log_path)
    daemon = subprocess.Popen(argv + ["--host", "daq"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    def logged(text, path=log_path):
        return os.path.exists(path) and text in open(path).read()

    try:
        wait_for(lambda: logged("pass 1 end"), timeout=60, what="first pass")
        assert ("buffer", "raw") not in statuses(db, 1)

        doc["sites"][0]["upload_options"] = ["buffer"]  # now it pushes to the buffer
        open(cfg, "w").write(json.dumps(doc))
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: logged("config " + cfg + " re-read"), timeout=60, what="reload logged")
        # with a 3600 s interval only the reload can have started the pass that copies
        wait_for(lambda: statuses(db, 1).get(("buffer", "raw")) in ("verifying", "transferred"),
                 timeout=60, what="the copy the new config asks for")

        open(cfg, "w").write("{ not json")
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: logged("new config refused, keeping the old one"), timeout=60,
                 what="broken config refused")
        assert daemon.poll() is None

        os.rename(log_path, log_path + ".1")  # logrotate's default: move, then signal
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: logged("SIGHUP"), timeout=60, what="a new log file after rotation")
        assert daemon.poll() is None

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
        assert logged("stopped cleanly")
        secret = env_file(os.path.join(CONTRIB, "cax.env.example"))
        for path in (log_path, log_path + ".1"):
            assert all(v not in open(path).read() for k, v in secret.items() if "PASSWORD" in k)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_cron_line_runs_one_quiet_pass(tmp_path):
    line = next(l for l in open(os.path.join(CONTRIB, "cron", "cax"))
                if l.strip() and not l.startswith("#") and "=" not in l.split()[0])
    fields = line.split(None, 6)
    assert fields[5] == "cax"  # runs as the dedicated user, not root
    command = fields[6].strip()
    assert "--once" in command and " . /etc/cax/cax.env" in command
    cfg = three_sites(tmp_path)
    envfile = tmp_path / "cax.env"
    shutil.copy(os.path.join(CONTRIB, "cax.env.example"), envfile)
    command = (command.replace("/etc/cax/cax.env", str(envfile))
               .replace("/etc/cax/cax.json", cfg)
               .replace("/var/log/cax/cax.log", str(tmp_path / "cax.log"))
               .replace("exec /opt/cax/.venv/bin/cax", f"exec {sys.executable} -m cax"))
    r = subprocess.run(["/bin/sh", "-c", command + " --host daq"], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr


def test_logrotate_snippet_rotates_the_units_log(tmp_path):
    text = open(os.path.join(CONTRIB, "logrotate", "cax")).read()
    service = unit()["Service"]
    log_dir = os.path.dirname(shlex.split(service["ExecStart"])[-1])
    assert text.count("{") == 1 and f"{log_dir}/*.log" in text
    if not shutil.which("logrotate"):
        return  # the shape above is all that can be checked without it
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "cax.log").write_text("a line\n")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text.replace(log_dir, str(logs)).replace(" cax cax", " root root"))
    r = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stderr
    assert (logs / "cax.log.1").read_text() == "a line\n"
    assert (logs / "cax.log").read_text() == ""  # "create" made the new, empty one
