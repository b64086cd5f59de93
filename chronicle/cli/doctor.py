"""``chronicle doctor``: is an S3 endpoint sound for Chronicle (``chunks.backends.conformance``)?"""

from __future__ import annotations

import json

import click

from chronicle.cli.app import cli, json_option
from chronicle.errors import UsageError


@cli.command()
@click.option("--backend", required=True, metavar="s3://BUCKET/PREFIX", help="The bucket (and prefix) to probe.")
@click.option("--endpoint", metavar="URL", help="S3 endpoint (http(s)://HOST:PORT) of a non-AWS server.")
@click.option("--region", metavar="REGION", help="S3 region (default: us-east-1).")
@click.option("--rounds", default=20, show_default=True, type=click.IntRange(1, 1000),
              help="Rounds of each concurrent conditional-write race.")
@click.option("--writers", default=8, show_default=True, type=click.IntRange(2, 64),
              help="Concurrent writers in each race.")
@json_option
def doctor(backend: str, endpoint: str | None, region: str | None, rounds: int, writers: int, as_json) -> None:
    """Check that an S3 endpoint's conditional writes, range reads and listings are sound.

    Races WRITERS concurrent If-None-Match: * creates of one key and
    WRITERS concurrent If-Match updates from one ETag, ROUNDS times each
    (exactly one may win), tries stale ETags, range reads and listings,
    under a temporary prefix it deletes. Exit 0: sound for several machines
    sharing the bucket; 1: not (what fails is printed; a single machine may
    still be fine); an unreachable endpoint is an error."""
    from chronicle.store.chunks.backends import conformance, s3    # boto3 is loaded only here

    if not backend.startswith("s3://"):
        raise UsageError(f"doctor checks S3 endpoints: --backend s3://BUCKET/PREFIX, not {backend!r}")
    location = s3.S3Location.parse(backend, endpoint, region)
    report = conformance.run_checks(location, rounds=rounds, writers=writers)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        click.echo(f"S3 conformance of {report.location}:")
        for check in report.checks:
            mark = "ok  " if check.sound else "FAIL"
            click.echo(f"  {mark} {check.name}: {check.detail}")
        if report.multi_machine_sound:
            click.echo("Sound: safe for one machine and for many machines sharing the bucket.")
        elif report.single_machine_sound:
            click.echo("NOT sound for several machines sharing this bucket (a stale writer could win a "
                       "compare-and-swap); one machine alone may use it.")
        else:
            click.echo("NOT sound: do not use this endpoint for a Chronicle store.")
    if not report.multi_machine_sound:
        raise SystemExit(1)
