"""The retention selection (``chronicle.store.gc.policy.select``), pure: properties with hypothesis."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronicle.errors import InvalidArgument
from chronicle.store.gc.policy import (DEFAULT_POLICY, NS, Policy, VersionInfo, format_duration, parse_duration,
                                       select)

HOUR = 3600 * NS
DAY = 24 * HOUR
T0 = int(datetime(2026, 1, 5, tzinfo=timezone.utc).timestamp()) * NS     # a Monday, 00:00 UTC


@st.composite
def histories(draw):
    """A path's versions: increasing seqs, non-decreasing times (as the event log writes them)."""
    gaps = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 3 * DAY)), max_size=40))
    seq, t, out = 0, T0, []
    for dseq, dt in gaps:
        seq += dseq
        t += dt
        out.append(VersionInfo(seq, t))
    return out


counts = st.one_of(st.none(), st.integers(0, 12))
policies = st.builds(Policy, keep_last=counts, keep_within=st.one_of(st.none(), st.integers(0, 10 * 86400)),
                     keep_hourly=counts, keep_daily=counts, keep_weekly=counts)


@st.composite
def cases(draw):
    versions = draw(histories())
    top = versions[-1].seq + 3 if versions else 3
    pins = draw(st.sets(st.integers(0, top), max_size=5))
    now = (versions[-1].time_ns if versions else T0) + draw(st.integers(0, 20 * DAY))
    return versions, pins, now


def _bigger(policy: Policy, draw) -> Policy:
    def more(v, limit):
        return None if v is None and not draw(st.booleans()) else (v or 0) + draw(st.integers(0, limit))
    return Policy(keep_last=more(policy.keep_last, 5), keep_within=more(policy.keep_within, 86400),
                  keep_hourly=more(policy.keep_hourly, 5), keep_daily=more(policy.keep_daily, 5),
                  keep_weekly=more(policy.keep_weekly, 5))


@settings(max_examples=300, deadline=None)
@given(cases(), policies)
def test_kept_versions_exist_and_include_every_pin(case, policy):
    versions, pins, now = case
    kept = select(versions, policy, pins, now)
    seqs = [v.seq for v in versions]
    assert kept <= set(seqs)
    for pin in pins:
        at_pin = [s for s in seqs if s <= pin]
        if at_pin:
            assert max(at_pin) in kept          # the version current at the pin


@settings(max_examples=300, deadline=None)
@given(cases(), policies)
def test_keep_last_keeps_the_newest(case, policy):
    versions, pins, now = case
    kept = select(versions, policy, pins, now)
    n = policy.keep_last or 0
    assert {v.seq for v in versions[len(versions) - n:]} <= kept if n else True
    only_last = select(versions, Policy(keep_last=n), (), now)
    assert only_last == ({v.seq for v in versions[-n:]} if n else set())


@settings(max_examples=300, deadline=None)
@given(cases(), st.sampled_from(["hourly", "daily", "weekly"]), st.integers(1, 12))
def test_bucket_rules_keep_the_newest_of_each_of_the_newest_buckets(case, kind, n):
    versions, _pins, now = case
    kept = select(versions, Policy(**{f"keep_{kind}": n}), (), now)

    def bucket(v):
        d = datetime.fromtimestamp(v.time_ns // NS, timezone.utc)
        return {"hourly": (d.date(), d.hour), "daily": d.date(), "weekly": d.isocalendar()[:2]}[kind]

    newest: dict = {}
    for v in versions:
        newest[bucket(v)] = v.seq                      # the last one (newest) per bucket
    expected = set(sorted(newest.values())[-n:])
    assert kept == expected
    assert len({bucket(v) for v in versions if v.seq in kept}) == len(kept)    # one per bucket


@settings(max_examples=300, deadline=None)
@given(cases(), policies)
def test_selection_is_idempotent(case, policy):
    versions, pins, now = case
    kept = select(versions, policy, pins, now)
    survivors = [v for v in versions if v.seq in kept]
    assert select(survivors, policy, pins, now) == kept


@settings(max_examples=300, deadline=None)
@given(cases(), policies, st.data())
def test_selection_is_monotonic_in_the_policy(case, policy, data):
    versions, pins, now = case
    bigger = _bigger(policy, data.draw)
    assert select(versions, policy, pins, now) <= select(versions, bigger, pins, now)
    more_pins = pins | data.draw(st.sets(st.integers(0, 200), max_size=3))
    assert select(versions, policy, pins, now) <= select(versions, policy, more_pins, now)


def test_keep_within_keeps_what_is_younger():
    versions = [VersionInfo(i + 1, T0 + i * HOUR) for i in range(10)]
    now = T0 + 9 * HOUR
    assert select(versions, Policy(keep_within=3 * 3600), (), now) == {7, 8, 9, 10}
    assert select(versions, Policy(), (), now) == set()
    assert select([], DEFAULT_POLICY, {5}, now) == set()


def test_default_policy_over_a_long_history():
    """One version an hour for 400 days: a day of everything, 48 hourly, 30 daily, 52 weekly, last 10."""
    versions = [VersionInfo(i + 1, T0 + i * HOUR) for i in range(400 * 24)]
    now = versions[-1].time_ns
    kept = select(versions, DEFAULT_POLICY, {versions[-1].seq}, now)
    assert len(kept) < 24 + 48 + 30 + 52 + 10
    assert {v.seq for v in versions[-24:]} <= kept
    assert versions[0].seq not in kept                 # older than 52 weeks of buckets


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600),
                                           ("90s", 90), ("1d12h", 129600)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7 days", "-1d", "1.5h", "7y", "99999999w"])
def test_bad_durations_are_one_line_errors(text):
    with pytest.raises(InvalidArgument) as err:
        parse_duration(text)
    assert "\n" not in str(err.value)


def test_policy_records_round_trip_and_validate():
    assert Policy.decode(DEFAULT_POLICY.encode()) == DEFAULT_POLICY
    assert format_duration(86400) == "1d" and format_duration(90) == "90s" and format_duration(7200) == "2h"
    changed = DEFAULT_POLICY.changed(keep_last=3, ignore_add=["build/"], ignore_remove=["*.pyc"])
    assert changed.keep_last == 3 and changed.keep_daily == DEFAULT_POLICY.keep_daily
    assert "build/" in changed.ignore and "*.pyc" not in changed.ignore
    for bad in ({"keep_last": -1}, {"keep_daily": True}, {"ignore": ("",)}, {"ignore": ("a\nb",)}):
        with pytest.raises(InvalidArgument):
            Policy(**bad)
    with pytest.raises(InvalidArgument):
        Policy.decode(b"{not json")
