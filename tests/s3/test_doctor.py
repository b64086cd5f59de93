"""``chronicle doctor`` against the SeaweedFS server: what it reports, its exit code."""

from __future__ import annotations

import json

from click.testing import CliRunner

from chronicle.cli import cli
from chronicle.store.chunks.backends import conformance


def test_doctor_reports_each_check_and_cleans_up(seaweed, s3_location):
    result = CliRunner().invoke(cli, ["doctor", "--backend", s3_location.url, "--endpoint", s3_location.endpoint,
                                      "--rounds", "2", "--writers", "3", "--json"])
    report = json.loads(result.output)
    names = [c["name"] for c in report["checks"]]
    assert names == ["create-only writes (If-None-Match: *)", "compare-and-swap (If-Match)",
                     "conditional writes, one at a time", "range reads", "list after write and delete"]
    assert all(len(c["rounds"]) == 2 for c in report["checks"][:2])
    # SeaweedFS 4.48: create-only writes, range reads and listings are sound (the exit code follows If-Match)
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["create-only writes (If-None-Match: *)"]["sound"]
    assert by_name["range reads"]["sound"] and by_name["list after write and delete"]["sound"]
    assert result.exit_code == (0 if report["multi_machine_sound"] else 1)
    left = seaweed.client().list_objects_v2(Bucket=s3_location.bucket, Prefix=s3_location.prefix)
    assert not left.get("Contents")                       # the probe's objects are gone


def test_doctor_text_output_and_a_broken_server(monkeypatch, s3_location):
    def fake_put(client, bucket, key, body, **condition):
        client.put_object(Bucket=bucket, Key=key, Body=body)     # a server that ignores the conditions
        return "won"
    monkeypatch.setattr(conformance, "_conditional_put", fake_put)
    result = CliRunner().invoke(cli, ["doctor", "--backend", s3_location.url, "--endpoint", s3_location.endpoint,
                                      "--rounds", "2", "--writers", "3"])
    assert result.exit_code == 1
    assert "FAIL create-only writes (If-None-Match: *): 2/2 rounds without exactly one winner" in result.output
    assert "FAIL compare-and-swap (If-Match)" in result.output
    assert "ok   range reads" in result.output
    assert "NOT sound: do not use this endpoint" in result.output


def test_doctor_on_an_unreachable_endpoint_is_a_one_line_error(s3_location):
    result = CliRunner().invoke(cli, ["doctor", "--backend", s3_location.url, "--endpoint", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert "cannot reach" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["doctor", "--backend", "/some/dir"])
    assert result.exit_code == 2
