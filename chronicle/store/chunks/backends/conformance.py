"""A conformance check of an S3 endpoint: is it sound for Chronicle, alone and shared?

Chronicle relies on an S3 server for more than ``PUT`` and ``GET``:

- **create-only writes** (``PUT`` with ``If-None-Match: *``, RFC 9110
  §13.1.2): packs are uploaded create-only, and machines sharing a bucket
  store a chunk once by racing to create it; of concurrent creates of one
  key exactly one may succeed, and the object must then hold the winner's
  bytes;
- **compare-and-swap** (``PUT`` with ``If-Match: <ETag>``, RFC 9110
  §13.1.1): a workspace's head object shared by machines is advanced by CAS
  (issue 10: "a small head object advanced by compare-and-swap"); of
  concurrent updates from one ETag exactly one may succeed, and a stale ETag
  must always fail;
- **range reads** (RFC 9110 §14): chunks are read by byte range, and a range
  past the end must fail rather than come back short;
- **list after write** (S3 is strongly consistent since December 2020): a
  pack just written must be listed, a deleted one not, or GC could miss one.

SeaweedFS's conditional writes had bugs in older releases (three concurrent
``If-None-Match: *`` creates all succeeding, reported on 4.16), so
:func:`run_checks` probes each property ``rounds`` times with ``writers``
concurrent threads, under a fresh ``doctor-<random>/`` key prefix that it
deletes afterwards. Each :class:`Check` says whether it was sound and what
was seen. Single-machine use needs range reads, list-after-write and
create-only writes (a pack name collision would otherwise be silent);
multi-machine use needs all of them.

Threads: :func:`run_checks` starts its own threads (``writers`` at a time)
and returns when they are done.
"""

from __future__ import annotations

import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import botocore.exceptions

from chronicle.store.chunks.backends.s3 import S3Location, make_client, translate

MULTI = "multi-machine"
SINGLE = "single-machine"


@dataclass
class Check:
    """One property: its name, whether it held every round, what was seen,
    and which use needs it (``single-machine`` or ``multi-machine``)."""

    name: str
    sound: bool
    detail: str
    needed_for: str
    rounds: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    """What :func:`run_checks` found at ``location``."""

    location: str
    checks: list[Check]

    @property
    def single_machine_sound(self) -> bool:
        return all(c.sound for c in self.checks if c.needed_for == SINGLE)

    @property
    def multi_machine_sound(self) -> bool:
        return all(c.sound for c in self.checks)

    def as_dict(self) -> dict:
        return {"location": self.location, "single_machine_sound": self.single_machine_sound,
                "multi_machine_sound": self.multi_machine_sound, "checks": [c.as_dict() for c in self.checks]}


def _status(exc: botocore.exceptions.ClientError) -> tuple[int, str]:
    return (exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0),
            str(exc.response.get("Error", {}).get("Code", "")))


def run_checks(location: S3Location, rounds: int = 20, writers: int = 8, **client_options) -> Report:
    """Probe ``location`` (module docstring): ``rounds`` rounds of
    ``writers`` concurrent conditional ``PUT``\\ s for each conditional
    check. Raises :class:`~chronicle.errors.Unavailable` or
    :class:`~chronicle.errors.StoreError` if the endpoint cannot be used at
    all (unreachable, no such bucket, credentials refused)."""
    client_options.setdefault("attempts", 2)
    client = make_client(location, max_requests=max(writers, 4), **client_options)
    base = f"{location.prefix}doctor-{secrets.token_hex(6)}/"
    bucket = location.bucket
    try:
        client.head_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=base + "hello", Body=b"hello")
    except Exception as exc:          # noqa: BLE001 - translated into one clear error
        raise translate(exc, f"probing {location.describe()}", location) from exc
    pool = ThreadPoolExecutor(writers, thread_name_prefix="chronicle-doctor")
    try:
        checks = [_create_only(client, pool, bucket, base, rounds, writers),
                  _compare_and_swap(client, pool, bucket, base, rounds, writers),
                  _stale_etag(client, bucket, base),
                  _range_reads(client, bucket, base),
                  _list_after_write(client, bucket, base)]
    finally:
        pool.shutdown(wait=True)
        _clean(client, bucket, base)
    return Report(location.describe(), checks)


def _race(pool: ThreadPoolExecutor, writers: int, attempt) -> list:
    """Run ``attempt(i)`` in ``writers`` threads released together; their results."""
    barrier = threading.Barrier(writers)

    def one(i: int):
        try:
            barrier.wait(10)
        except threading.BrokenBarrierError:
            pass
        return attempt(i)
    return list(pool.map(one, range(writers)))


def _conditional_put(client, bucket: str, key: str, body: bytes, **condition) -> str:
    """``"won"``, ``"lost"`` (412/409) or ``"error <code>"``."""
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, **condition)
        return "won"
    except botocore.exceptions.ClientError as exc:
        status, code = _status(exc)
        return "lost" if status in (409, 412) or code == "PreconditionFailed" else f"error {code or status}"


def _create_only(client, pool, bucket: str, base: str, rounds: int, writers: int) -> Check:
    results = []
    for r in range(rounds):
        key = f"{base}create/{r}"
        outcomes = _race(pool, writers, lambda i, key=key: _conditional_put(
            client, bucket, key, f"writer {i}".encode(), IfNoneMatch="*"))
        winners = [i for i, o in enumerate(outcomes) if o == "won"]
        stored = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        ok = len(winners) == 1 and stored == f"writer {winners[0]}".encode()
        results.append({"winners": len(winners), "errors": [o for o in outcomes if o.startswith("error")],
                        "stored_is_winners": bool(winners) and stored == f"writer {winners[0]}".encode(), "ok": ok})
    bad = [x for x in results if not x["ok"]]
    detail = (f"{writers} concurrent If-None-Match: * creates of one key, {rounds} times: exactly one winner "
              "every time" if not bad else
              f"{len(bad)}/{rounds} rounds without exactly one winner holding the object "
              f"(winners per round: {[x['winners'] for x in results]})")
    return Check("create-only writes (If-None-Match: *)", not bad, detail, SINGLE, results)


def _compare_and_swap(client, pool, bucket: str, base: str, rounds: int, writers: int) -> Check:
    results = []
    for r in range(rounds):
        key = f"{base}cas/{r}"
        etag = client.put_object(Bucket=bucket, Key=key, Body=b"base")["ETag"]
        outcomes = _race(pool, writers, lambda i, key=key, etag=etag: _conditional_put(
            client, bucket, key, f"update {i}".encode(), IfMatch=etag))
        winners = [i for i, o in enumerate(outcomes) if o == "won"]
        stored = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        ok = len(winners) == 1 and stored == f"update {winners[0]}".encode()
        results.append({"winners": len(winners), "errors": [o for o in outcomes if o.startswith("error")], "ok": ok})
    bad = [x for x in results if not x["ok"]]
    errors = sorted({e for x in results for e in x["errors"]})
    detail = (f"{writers} concurrent If-Match updates from one ETag, {rounds} times: exactly one winner every time"
              if not bad else
              f"{len(bad)}/{rounds} rounds without exactly one winner (winners per round: "
              f"{[x['winners'] for x in results]}{'; errors ' + ', '.join(errors) if errors else ''}): "
              "a stale writer could overwrite a newer head")
    return Check("compare-and-swap (If-Match)", not bad, detail, MULTI, results)


def _stale_etag(client, bucket: str, base: str) -> Check:
    key = f"{base}stale"
    first = client.put_object(Bucket=bucket, Key=key, Body=b"one")["ETag"]
    second = _conditional_put(client, bucket, key, b"two", IfMatch=first)
    stale = _conditional_put(client, bucket, key, b"three", IfMatch=first)
    exists = _conditional_put(client, bucket, key, b"four", IfNoneMatch="*")
    stored = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    ok = second == "won" and stale == "lost" and exists == "lost" and stored == b"two"
    detail = (f"update with the current ETag: {second}; with a stale ETag: {stale}; "
              f"If-None-Match: * on an existing key: {exists}; object holds {stored!r}")
    return Check("conditional writes, one at a time", ok, detail, MULTI)


def _range_reads(client, bucket: str, base: str) -> Check:
    key = f"{base}range"
    data = os.urandom(3 * 1024 * 1024 + 17)
    client.put_object(Bucket=bucket, Key=key, Body=data)
    problems = []
    for start, end in ((0, 0), (5, 99), (1024 * 1024 - 3, 1024 * 1024 + 3), (len(data) - 10, len(data) - 1)):
        got = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}")["Body"].read()
        if got != data[start:end + 1]:
            problems.append(f"bytes={start}-{end} gave {len(got)} wrong bytes")
    try:
        got = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={len(data)}-{len(data) + 10}")["Body"].read()
        problems.append(f"a range past the end gave {len(got)} bytes instead of an error")
    except botocore.exceptions.ClientError as exc:
        status, code = _status(exc)
        if status != 416 and code != "InvalidRange":
            problems.append(f"a range past the end answered {code or status}, not 416")
    detail = "ranges inside, across 1 MiB and at the end read exactly; past the end: 416" if not problems \
        else "; ".join(problems)
    return Check("range reads", not problems, detail, SINGLE)


def _list_after_write(client, bucket: str, base: str) -> Check:
    prefix = f"{base}list/"
    keys = [f"{prefix}{i:03d}" for i in range(30)]
    problems = []
    for i, key in enumerate(keys):
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * i)
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    if [o["Key"] for o in listed] != keys:
        problems.append(f"listed {len(listed)} of {len(keys)} keys just written (or out of order)")
    elif [o["Size"] for o in listed] != list(range(len(keys))):
        problems.append("listed sizes differ from the written ones")
    for key in keys[::2]:
        client.delete_object(Bucket=bucket, Key=key)
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    if listed != keys[1::2]:
        problems.append(f"after deleting {len(keys[::2])} keys the listing shows {len(listed)} of "
                        f"{len(keys[1::2])} remaining")
    page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=4)
    rest = client.list_objects_v2(Bucket=bucket, Prefix=prefix, ContinuationToken=page["NextContinuationToken"]) \
        if page.get("IsTruncated") else {}
    paged = [o["Key"] for o in page.get("Contents", [])] + [o["Key"] for o in rest.get("Contents", [])]
    if paged != keys[1::2]:
        problems.append("listing in pages of 4 does not give every key once, in order")
    detail = "30 keys listed at once after writing, in order, with sizes; deleted ones gone; pages join up" \
        if not problems else "; ".join(problems)
    return Check("list after write and delete", not problems, detail, SINGLE)


def _clean(client, bucket: str, base: str) -> None:
    """Delete everything under the probe's prefix (errors ignored: best effort)."""
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            for obj in page.get("Contents", ()):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
    except Exception:                 # noqa: BLE001 - leftovers of a probe are harmless
        pass
