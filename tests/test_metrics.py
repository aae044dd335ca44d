"""The Prometheus textfile (site key metrics_file), parsed by prometheus_client's own parser."""
import json
import os

from prometheus_client.parser import text_string_to_metric_families

from cax.checksum import checksum
from cax.config import load
from cax.runsdb import connect
from tests.helpers import make_raw, run_cax, run_doc, three_sites



def once(cfg, host):
    return run_cax("--config", cfg, "--host", host, "--once").returncode


def samples(path):
    out = {}
    for family in text_string_to_metric_families(open(path).read()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_file_after_a_copy_and_after_a_failure(tmp_path):
    cfg = three_sites(tmp_path)
    doc = json.loads(open(cfg).read())
    prom = tmp_path / "textfile" / "cax.prom"
    prom.parent.mkdir()
    doc["sites"][0]["metrics_file"] = str(prom)
    open(cfg, "w").write(json.dumps(doc))
    db = connect(load(cfg))
    for number, name in ((1, "170101_0000"), (2, "170101_0001")):
        loc = make_raw(tmp_path / "daq", name, size=5000)
        run = run_doc(number, name, loc, status="transferred")
        run["data"][0]["checksum"] = checksum(loc)
        db.insert_run(run)
    os.rename(tmp_path / "daq" / "170101_0001", tmp_path / "daq-gone")  # its copy will fail

    assert once(cfg, "daq") == 3
    s = samples(prom)
    site = (("site", "daq"),)
    push = (("direction", "push"), ("method", "local"), ("site", "daq"))
    assert s[("cax_pass_copies", push)] == 1
    assert s[("cax_pass_bytes", push)] >= 3 * 5000
    assert sum(v for (n, _), v in s.items() if n == "cax_pass_failures") >= 1
    assert s[("cax_pass_duration_seconds", site)] > 0
    assert s[("cax_pass_runsdb_queries", site)] > 0
    assert ("cax_last_complete_pass_timestamp_seconds", site) not in s  # none complete yet
    assert not [f for f in os.listdir(prom.parent) if f != "cax.prom"]  # no temp file left

    os.rename(tmp_path / "daq-gone", tmp_path / "daq" / "170101_0001")
    codes = [once(cfg, "daq") for _ in range(3)]
    assert 0 in codes, codes
    s = samples(prom)
    complete = s[("cax_last_complete_pass_timestamp_seconds", site)]
    assert complete <= s[("cax_last_pass_timestamp_seconds", site)]

    loc = make_raw(tmp_path / "daq", "170101_0002")  # a run whose source vanishes: incomplete
    run = run_doc(3, "170101_0002", loc, status="transferred")
    run["data"][0]["checksum"] = checksum(loc)
    db.insert_run(run)
    os.rename(loc, tmp_path / "daq-gone-too")
    assert once(cfg, "daq") == 3
    assert samples(prom)[("cax_last_complete_pass_timestamp_seconds", site)] == complete
