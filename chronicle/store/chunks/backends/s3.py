"""The S3 backend: objects in an S3-compatible bucket, through a local cache.

Object ``packs/000001/00000001a3.pack`` is the key
``<prefix>/packs/000001/00000001a3.pack`` of the bucket (see ``base`` for
names and the contract). Any S3 API works (AWS S3, MinIO, Ceph RGW,
SeaweedFS); the client is boto3 (``botocore``), credentials are what boto3
finds (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``~/.aws/credentials``, instance roles): the store never records them.

Writing. An object store cannot append, so :attr:`S3Backend.durable_while_open`
is False: a writer (:meth:`S3Backend.create`) appends to a local **spool
file** (``spool/<name with / as +>`` under the cache directory, ``flock``\\ ed
by its writer), and :meth:`~_S3Writer.close` uploads it in one ``PUT`` with
``If-None-Match: *`` (create-only: a name another writer took fails with
:class:`~chronicle.errors.Exists`; a pack is at most 16 MiB, so no multipart
upload is needed). At close the spool file first moves to ``outbox/``; it
leaves it once the upload succeeded (its bytes then fill the read cache).
An upload that fails (the bucket unreachable) leaves the object in the
outbox: it is still read from there, listed, and uploaded again by the next
:meth:`S3Backend.sync`, which raises until it succeeds (so an ``fsync``
fails rather than promise what the bucket does not hold). A spool file whose
writer died (its ``flock`` is free: a killed process) holds bytes the
metadata may refer to (close-durability, SPEC §3), so :meth:`S3Backend.sync`
moves it to the outbox and uploads it as it is; spool files of other live
processes are ``fdatasync``\\ ed by it, as the local backend syncs their
packs. :meth:`S3Backend.create` is local only (a write never waits for the
network); pack numbers are drawn from 62 random bits
(:meth:`S3Backend.allocate_pack_no`) so that two machines all but never
pick one name, and the create-only ``PUT`` refuses it if they do.

Reading. :meth:`S3Backend.read` serves, in order: this process's open
writers, local spool and outbox files (open or not yet uploaded objects of
any process of the store), then the block cache (``cache``: 1 MiB blocks,
LRU, bounded by ``cache_size``, kept across restarts), fetching missing
blocks with range ``GET``\\ s. :meth:`S3Backend.advise` fetches blocks ahead
in background threads. Blocks fetched by two threads at once are fetched
once. Inside :meth:`S3Backend.cached_only` (the FUSE loop's reads) a miss
raises :class:`~chronicle.store.chunks.backends.base.NotCached` instead of
waiting for the network: the adapter fetches in a worker thread and reads
again.

Errors and time. Every request goes through botocore's "standard" retry mode
(exponential backoff with jitter for throttling, 5xx answers, timeouts and
connection errors; ``attempts`` tries in all) with connect and read timeouts,
so no call hangs: the worst case is about ``attempts * (connect_timeout +
read_timeout)`` plus the backoff. What is still failing then becomes
:class:`~chronicle.errors.Unavailable` (EIO at the mount; transient in the
sense of ``base``); a missing bucket, refused credentials and the like are a
:class:`~chronicle.errors.StoreError` naming the cause; an answer saying the
storage is full (HTTP 507, MinIO's ``XMinioStorageFull``, quota errors) is
:class:`~chronicle.errors.NoSpace` (ENOSPC). Cached blocks and local files
keep being served while the bucket is unreachable.

Concurrency: at most ``max_requests`` requests at once per backend (the
connection pool and a semaphore); block fetches ahead run in
``max_requests // 2`` threads, and so do the uploads of the packs one sync
closes (:meth:`S3Backend.close_writers`).

Threads: see ``base``; tables are guarded by one lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.exceptions
from botocore.config import Config

from chronicle.errors import Busy, Corrupt, Exists, InvalidArgument, NoSpace, NotFound, StoreError, Unavailable
from chronicle.store.chunks.backends.base import Buffer, NotCached, ObjectInfo
from chronicle.store.chunks.backends.cache import BLOCK_SIZE, BlockCache
from chronicle.store.chunks.backends.local import _writev_all, check_name, pread_exact

DEFAULT_CACHE_SIZE = 2 * 1024 ** 3     # bytes of blocks kept by default
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_FULL_CODES = {"XMinioStorageFull", "QuotaExceeded", "InsufficientStorage", "StorageFull"}
_RECENT = 16                      # blocks just fetched kept in memory (a cache of size 0 still serves a retry)
_cached_only = threading.local()
_CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                     "InvalidToken", "AllAccessDisabled"}


@dataclass(frozen=True)
class S3Location:
    """Where a store's objects live: ``s3://BUCKET/PREFIX`` plus endpoint and region."""

    bucket: str
    prefix: str                   # "" or ending in "/"
    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def parse(cls, url: str, endpoint: str | None = None, region: str | None = None) -> S3Location:
        """Parse ``s3://BUCKET[/PREFIX]``. Raises :class:`InvalidArgument` for
        anything else (a bucket name must follow S3's rules: 3-63 characters
        of lowercase letters, digits, dots and hyphens)."""
        if not isinstance(url, str) or not url.startswith("s3://"):
            raise InvalidArgument(f"not an S3 location: {url!r} (expected s3://BUCKET/PREFIX)")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise InvalidArgument(f"not a valid bucket name: {bucket!r} (3-63 characters: a-z, 0-9, '.', '-')")
        prefix = prefix.strip("/")
        if prefix and any(not p or p in (".", "..") for p in prefix.split("/")):
            raise InvalidArgument(f"not a valid prefix: {prefix!r}")
        if endpoint is not None and not re.match(r"https?://[^/]+", endpoint):
            raise InvalidArgument(f"not an endpoint URL: {endpoint!r} (expected http(s)://HOST[:PORT])")
        return cls(bucket, prefix + "/" if prefix else "", endpoint, region)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def describe(self) -> str:
        return self.url + (f" at {self.endpoint}" if self.endpoint else "")


def make_client(location: S3Location, *, connect_timeout: float = 3, read_timeout: float = 20,
                attempts: int = 4, max_requests: int = 8):
    """A boto3 S3 client for ``location``: path-style addressing when an
    endpoint is given (SeaweedFS, MinIO), "standard" retries, the timeouts
    in seconds, a pool of ``max_requests`` connections. Checksums are only
    computed where the API requires them (pack records carry their own
    BLAKE3 ids, checked on read)."""
    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={"mode": "standard", "total_max_attempts": max(1, attempts)},
                    max_pool_connections=max_requests,
                    s3={"addressing_style": "path" if location.endpoint else "auto"},
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    with _session_lock:               # building a session loads botocore's models: once per process
        global _session
        if _session is None:
            _session = boto3.session.Session()
        return _session.client("s3", endpoint_url=location.endpoint, region_name=location.region or "us-east-1",
                               config=config)


_session = None
_session_lock = threading.Lock()


def translate(exc: Exception, what: str, location: S3Location) -> Exception:
    """The Chronicle error for a botocore failure of ``what`` (module docstring)."""
    where = location.describe()
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "NotFound") or (status == 404 and code not in ("NoSuchBucket",)):
            return NotFound(f"{what}: no such object in {where}")
        if code == "NoSuchBucket":
            return StoreError(f"{what}: the bucket {location.bucket!r} does not exist at "
                              f"{location.endpoint or 'AWS S3'} (create it first)")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return Exists(f"{what}: the object already exists in {where}")
        if code == "InvalidRange" or status == 416:
            return Corrupt(f"{what}: the object in {where} is shorter than the range asked for")
        if code in _FULL_CODES or status == 507:
            return NoSpace(f"{what}: the bucket {where} is full ({code or status})")
        if code in _CREDENTIAL_CODES or status == 403:
            return StoreError(f"{what}: {where} refused access ({code or status}: {err.get('Message', '')}): "
                              "check that the bucket exists and that the credentials (AWS_ACCESS_KEY_ID/"
                              "AWS_SECRET_ACCESS_KEY, AWS_PROFILE) may use it")
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"):
            return Unavailable(f"{what}: {where} keeps failing ({code or status}) after retries")
        return StoreError(f"{what}: {where} answered {code or status}: {err.get('Message', '')}")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return StoreError(f"{what}: no AWS credentials found for {where}: set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                        botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError,
                        botocore.exceptions.HTTPClientError)):
        return Unavailable(f"{what}: cannot reach {where} ({exc})")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return StoreError(f"{what}: {where}: {exc}")
    return exc


def _spool_name(name: str) -> str:
    return name.replace("/", "+")


class S3Backend:
    """Objects in ``location``'s bucket; spool, outbox and block cache under
    ``cache_dir`` (``cache_size`` bytes of blocks at most). ``client`` (a
    boto3 S3 client) is made by :func:`make_client` from the timeouts,
    ``attempts`` and ``max_requests`` unless given."""

    durable_while_open = False

    def __init__(self, location: S3Location, cache_dir: os.PathLike | str, *, cache_size: int = DEFAULT_CACHE_SIZE,
                 block_size: int = BLOCK_SIZE, connect_timeout: float = 3, read_timeout: float = 20,
                 attempts: int = 4, max_requests: int = 8, client=None, file_mode: int = 0o600,
                 dir_mode: int = 0o700):
        self.location = location
        self.cache_dir = Path(cache_dir)
        self.file_mode = file_mode
        self.spool_dir = self.cache_dir / "spool"
        self.outbox_dir = self.cache_dir / "outbox"
        for d in (self.cache_dir, self.spool_dir, self.outbox_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, dir_mode)
        self.cache = BlockCache(self.cache_dir / "blocks", cache_size, block_size, file_mode=file_mode,
                                dir_mode=dir_mode)
        # Building a client loads botocore's service models (about 0.3 s of CPU): in a thread of its
        # own, so that opening a store (a mount) does not wait for it; the first request does.
        self._client = client
        self._client_ready = threading.Event()
        if client is None:
            options = dict(connect_timeout=connect_timeout, read_timeout=read_timeout, attempts=attempts,
                           max_requests=max_requests)
            threading.Thread(target=self._build_client, args=(options,), name="chronicle-s3-client",
                             daemon=True).start()
        else:
            self._client_ready.set()
        self._requests = threading.BoundedSemaphore(max_requests)
        self._lock = threading.Lock()
        self._writers: dict[str, _S3Writer] = {}
        self._sizes: dict[str, int] = {}          # sizes of closed objects seen (they never change)
        self._fetching: dict[tuple[str, int], threading.Event] = {}
        self._recent: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._ahead = ThreadPoolExecutor(max(1, max_requests // 2), thread_name_prefix="chronicle-s3-ahead")
        self._ahead_queued: set[tuple[str, int]] = set()
        self._uploads = ThreadPoolExecutor(max(1, max_requests // 2), thread_name_prefix="chronicle-s3-upload")
        self._closed = False
        self._lock_fd = os.open(self.cache_dir / "cache.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                self.cache.reconcile()    # no other process uses the cache: repair what a crash left
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        except BlockingIOError:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def _build_client(self, options: dict) -> None:
        try:
            self._client = make_client(self.location, **options)
        finally:
            self._client_ready.set()

    @property
    def client(self):
        """The boto3 S3 client (waits for it to be built)."""
        self._client_ready.wait()
        if self._client is None:
            raise StoreError(f"could not set up an S3 client for {self.location.describe()}")
        return self._client

    @client.setter
    def client(self, client) -> None:
        self._client = client
        self._client_ready.set()

    def key(self, name: str) -> str:
        """The bucket key of object ``name`` (raises :class:`InvalidArgument` for a bad name)."""
        check_name(name)
        return self.location.prefix + name

    # -- requests ------------------------------------------------------------------

    def _call(self, what: str, method: str, **kwargs):
        with self._requests:
            try:
                return getattr(self.client, method)(Bucket=self.location.bucket, **kwargs)
            except Exception as exc:      # noqa: BLE001 - translated into the backend's errors
                raise translate(exc, what, self.location) from exc

    # -- writing -------------------------------------------------------------------

    @staticmethod
    def allocate_pack_no() -> int:
        """A fresh random pack number of 62 bits, for the pack writer
        (``packs.PackWriter``): packs of many machines share one bucket, and
        :meth:`create` asks no one whether a name is free (a write never
        waits for the network), so numbers are drawn wide enough that a
        collision stays all but impossible (10 million packs: about 1 in
        100,000; the create-only upload still refuses one). The chunk index
        stores pack numbers as 64-bit integers."""
        return secrets.randbits(62) | 1

    def create(self, name: str) -> _S3Writer:
        """Start ``name`` as a local spool file. Exclusive against this
        store's spool and outbox; the bucket is only asked at close (the
        create-only upload), so creating never waits for the network."""
        self.key(name)
        local = _spool_name(name)
        if (self.outbox_dir / local).exists():
            raise Exists(f"object {name} already exists")
        path = self.spool_dir / local
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.file_mode)
        except FileExistsError:
            raise Exists(f"object {name} already exists") from None
        except OSError as exc:
            _no_space_or_raise(exc, f"creating {name}")
        fcntl.flock(fd, fcntl.LOCK_EX)
        writer = _S3Writer(self, name, fd, path)
        with self._lock:
            self._writers[name] = writer
        return writer

    def close_writers(self, writers: Sequence[_S3Writer]) -> None:
        """Close (upload) ``writers``, up to ``max_requests // 2`` at once;
        every one is tried, then the first error is raised (each failed one
        waits in the outbox, as :meth:`_S3Writer.close` says)."""
        if len(writers) <= 1:
            for writer in writers:
                writer.close()
            return
        futures = [self._uploads.submit(writer.close) for writer in writers]
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def put(self, name: str, data: Buffer) -> None:
        key = self.key(name)
        data = bytes(data)
        try:
            self._call(f"writing {name}", "put_object", Key=key, Body=data, IfNoneMatch="*")
        except Exists:
            if self._read_whole(name) != data:
                raise Exists(f"object {name} already exists with other content") from None
        with self._lock:
            self._sizes[name] = len(data)

    def delete(self, name: str) -> None:
        key = self.key(name)
        with self._lock:
            if name in self._writers:
                raise Busy(f"object {name} is still being written")
            self._sizes.pop(name, None)
            for k in [k for k in self._recent if k[0] == name]:
                del self._recent[k]
        self._call(f"deleting {name}", "delete_object", Key=key)
        (self.outbox_dir / _spool_name(name)).unlink(missing_ok=True)
        self.cache.drop(name)

    def sync(self) -> None:
        """Upload every object in the outbox (closed ones whose upload
        failed, and spool files of dead processes, moved there first;
        ``max_requests // 2`` at once) and ``fdatasync`` the spool files of
        other live processes. Raises the first upload's error
        (:class:`Unavailable`, :class:`NoSpace`, :class:`Exists` for a
        collided name) after trying them all."""
        self._adopt_orphans()
        names = sorted(e.name.replace("+", "/") for e in os.scandir(self.outbox_dir) if not e.name.startswith("."))
        futures = [self._uploads.submit(self._upload_outbox, name) for name in names]
        errors = [f.exception() for f in futures]
        failure = next((e for e in errors if e is not None), None)
        if failure is not None:
            raise failure

    def needs_sync(self) -> bool:
        """True while an object waits in the outbox (:meth:`sync` uploads it)."""
        try:
            return any(not e.name.startswith(".") for e in os.scandir(self.outbox_dir))
        except FileNotFoundError:
            return False

    def _adopt_orphans(self) -> None:
        with self._lock:
            own = set(self._writers)
        for entry in os.scandir(self.spool_dir):
            name = entry.name.replace("+", "/")
            if name in own or entry.name.startswith("."):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    try:                  # a live writer's: make its bytes durable locally, as local packs
                        os.fdatasync(fd)
                    except OSError as exc:
                        _no_space_or_raise(exc, f"fdatasync of {name}")
                    continue
                os.fdatasync(fd)
                try:
                    os.rename(entry.path, self.outbox_dir / entry.name)    # its writer died: upload it as it is
                except FileNotFoundError:
                    pass
            finally:
                os.close(fd)

    def _upload_outbox(self, name: str) -> None:
        """Upload outbox object ``name`` create-only, then move its bytes to
        the read cache. Uploading bytes the bucket already holds under that
        name (a retry whose answer was lost) succeeds."""
        path = self.outbox_dir / _spool_name(name)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return                        # another process uploaded it meanwhile
        with f:
            size = os.fstat(f.fileno()).st_size
            try:
                self._call(f"uploading {name}", "put_object", Key=self.key(name), Body=f, ContentLength=size,
                           IfNoneMatch="*")
            except Exists:
                f.seek(0)
                if not self._same_as_stored(name, f, size):
                    # Two writers chose one name: this object cannot be stored under it. It is kept
                    # aside (collided/) so that later syncs go on; reads of its chunks find the other
                    # object's bytes and fail their BLAKE3 check (Corrupt), never silently.
                    kept = self.cache_dir / "collided"
                    kept.mkdir(exist_ok=True)
                    os.rename(path, kept / path.name)
                    raise Exists(f"object {name} already exists in {self.location.describe()} with other "
                                 f"content (two writers chose one pack name); kept in {kept}") from None
            with self._lock:
                self._sizes[name] = size
            self._fill_cache(name, f, size)
        path.unlink(missing_ok=True)

    def _same_as_stored(self, name: str, f, size: int) -> bool:
        head = self._call(f"checking {name}", "head_object", Key=self.key(name))
        if head.get("ContentLength") != size:
            return False
        md5 = hashlib.md5(usedforsecurity=False)
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
        etag = str(head.get("ETag", "")).strip('"')
        if re.fullmatch(r"[0-9a-f]{32}", etag):
            return etag == md5.hexdigest()
        f.seek(0)
        return self._read_whole(name) == f.read()

    def _fill_cache(self, name: str, f, size: int) -> None:
        bs = self.cache.block_size
        for block in range((size + bs - 1) // bs):
            f.seek(block * bs)
            try:
                self.cache.put(name, block, f.read(bs))
            except OSError:
                return                    # a full disk: the cache is only a cache

    # -- reading -------------------------------------------------------------------

    def read(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"bad range of {name}: {length} bytes at {offset}")
        check_name(name)
        with self._lock:
            writer = self._writers.get(name)
        if writer is not None:
            return pread_exact(writer.fd, name, offset, length)
        local = self._local_read(name, offset, length)
        if local is not None:
            return local
        if length == 0:
            self.size(name)
            return b""
        bs = self.cache.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        parts = []
        for block in range(first, last + 1):
            start = offset - block * bs if block == first else 0
            end = offset + length - block * bs if block == last else bs
            data = self._block(name, block, start, end)
            if len(data) < end - start:
                raise Corrupt(f"object {name} is truncated: it ends before byte {offset + length} "
                              f"({length} bytes at {offset} were asked for)")
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _local_read(self, name: str, offset: int, length: int) -> bytes | None:
        """From a spool or outbox file of ``name`` (any process's), or None."""
        local = _spool_name(name)
        for d in (self.spool_dir, self.outbox_dir):
            try:
                fd = os.open(d / local, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                return pread_exact(fd, name, offset, length)
            finally:
                os.close(fd)
        return None

    @contextmanager
    def cached_only(self):
        """Within this block, in this thread, a read that would fetch from
        the bucket raises :class:`~chronicle.store.chunks.backends.base.NotCached`
        instead (the FUSE loop's reads: the adapter fetches in a worker
        thread, then reads again)."""
        before = getattr(_cached_only, "on", False)
        _cached_only.on = True
        try:
            yield
        finally:
            _cached_only.on = before

    def _block(self, name: str, block: int, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of block ``block`` of ``name`` (fewer where
        the object ends): from the cache, or the block fetched (once, if
        several threads want it) and cached."""
        while True:
            data = self.cache.get(name, block, start, end)
            if data is not None:
                return data
            with self._lock:
                data = self._recent.get((name, block))
            if data is not None:
                return data[start:end]
            if getattr(_cached_only, "on", False):
                raise NotCached(name, partial(self._block, name, block))
            with self._lock:
                pending = self._fetching.get((name, block))
                if pending is None:
                    mine = self._fetching[(name, block)] = threading.Event()
            if pending is not None:
                pending.wait()
                continue
            try:
                data = self._fetch(name, block)
                try:
                    self.cache.put(name, block, data)
                except OSError:
                    pass                  # a full disk: serve it uncached
                with self._lock:
                    self._recent[(name, block)] = data
                    if len(self._recent) > _RECENT:
                        self._recent.popitem(last=False)
                return data[start:end]
            finally:
                with self._lock:
                    del self._fetching[(name, block)]
                mine.set()

    def _fetch(self, name: str, block: int) -> bytes:
        bs = self.cache.block_size
        start = block * bs
        try:
            answer = self._call(f"reading {name}", "get_object", Key=self.key(name),
                                Range=f"bytes={start}-{start + bs - 1}")
            with self._requests:
                return answer["Body"].read()
        except Corrupt:
            raise Corrupt(f"object {name} is truncated: it ends before byte {start + 1}") from None
        except NotFound:
            raise NotFound(f"no object {name}") from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:     # the body broke off
            raise translate(exc, f"reading {name}", self.location) from exc

    def _read_whole(self, name: str) -> bytes:
        answer = self._call(f"reading {name}", "get_object", Key=self.key(name))
        return answer["Body"].read()

    def size(self, name: str) -> int:
        key = self.key(name)
        with self._lock:
            writer = self._writers.get(name)
            known = self._sizes.get(name)
        if writer is not None:
            return writer.size
        if known is not None:
            return known
        local = _spool_name(name)
        for d in (self.spool_dir, self.outbox_dir):
            try:
                return os.stat(d / local).st_size
            except FileNotFoundError:
                continue
        try:
            size = self._call(f"reading the size of {name}", "head_object", Key=key)["ContentLength"]
        except NotFound:
            raise NotFound(f"no object {name}") from None
        with self._lock:
            self._sizes[name] = size
        return size

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        found: dict[str, int] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=self.location.prefix + prefix)
        cut = len(self.location.prefix)
        with self._requests:
            try:
                for page in pages:
                    for obj in page.get("Contents", ()):
                        found[obj["Key"][cut:]] = obj["Size"]
            except Exception as exc:      # noqa: BLE001 - translated
                raise translate(exc, f"listing {prefix!r}", self.location) from exc
        for entry in os.scandir(self.outbox_dir):          # closed, not yet uploaded
            name = entry.name.replace("+", "/")
            if not entry.name.startswith(".") and name.startswith(prefix):
                try:
                    found[name] = entry.stat().st_size
                except FileNotFoundError:
                    pass
        return iter([ObjectInfo(name, size) for name, size in sorted(found.items())])

    def advise(self, name: str, offset: int, length: int) -> None:
        if length <= 0 or self._closed:
            return
        bs = self.cache.block_size
        for block in range(offset // bs, (offset + length - 1) // bs + 1):
            with self._lock:
                if (name, block) in self._ahead_queued or name in self._writers:
                    continue
                self._ahead_queued.add((name, block))
            try:
                self._ahead.submit(self._fetch_ahead, name, block)
            except RuntimeError:          # shut down
                return

    def _fetch_ahead(self, name: str, block: int) -> None:
        try:
            if self._local_read(name, 0, 0) is None:
                self._block(name, block)
        except Exception:                 # noqa: BLE001 - a hint: the read itself reports errors
            pass
        finally:
            with self._lock:
                self._ahead_queued.discard((name, block))

    def release_deleted(self) -> None:
        with self._lock:
            self._sizes.clear()

    def close(self) -> None:
        """Close every open writer (uploading it), stop the fetches ahead.
        An upload that fails leaves its object in the outbox for the next
        process's sync; the error is raised."""
        with self._lock:
            writers = list(self._writers.values())
        try:
            self.close_writers(writers)
        finally:
            if not self._closed:
                self._closed = True
                self._ahead.shutdown(wait=True, cancel_futures=True)
                self._uploads.shutdown(wait=True)
                self.cache.close()
                os.close(self._lock_fd)

    def _forget(self, writer: _S3Writer) -> None:
        with self._lock:
            if self._writers.get(writer.name) is writer:
                del self._writers[writer.name]


class _S3Writer:
    """An object being written to its spool file (see ``base.ObjectWriter``)."""

    def __init__(self, backend: S3Backend, name: str, fd: int, path: Path):
        self.name = name
        self.fd = fd
        self.size = 0
        self._backend = backend
        self._path = path
        self._closed = False
        self._lock = threading.Lock()

    def append(self, buffers: Sequence[Buffer]) -> None:
        """Append to the spool file; a failed append is truncated back (as the local backend's)."""
        if self._closed:
            raise ValueError(f"object {self.name} is closed")
        try:
            _writev_all(self.fd, buffers)
        except BaseException:
            try:
                os.ftruncate(self.fd, self.size)
                os.lseek(self.fd, self.size, os.SEEK_SET)
            except OSError:
                pass
            raise
        self.size = os.lseek(self.fd, 0, os.SEEK_CUR)

    def sync(self) -> None:
        """A no-op: only :meth:`close` makes an object durable (``durable_while_open`` is False)."""

    def close(self) -> None:
        """Move the spool file to the outbox and upload it (module docstring).
        Raises :class:`Unavailable`/:class:`NoSpace` if the upload fails: the
        object then waits in the outbox for :meth:`S3Backend.sync`."""
        with self._lock:
            if self._closed:
                return
            backend = self._backend
            try:
                # No fdatasync: the upload makes the object durable, and until it succeeded no sync
                # has promised its bytes (Store.sync fails with it); a killed process leaves them in
                # the page cache, which is what close-durability asks (SPEC §3).
                os.rename(self._path, backend.outbox_dir / self._path.name)
            except OSError as exc:
                _no_space_or_raise(exc, f"closing {self.name}")
            self._closed = True
            os.close(self.fd)
            backend._forget(self)
        backend._upload_outbox(self.name)


def _no_space_or_raise(exc: OSError, what: str) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpace(f"no space left on the device that holds the store's cache ({what})") from exc
    raise exc


def check_new_location(location: S3Location, **client_options) -> None:
    """Check that a new store may use ``location``: the bucket answers, and
    no packs are under the prefix yet (two stores sharing one prefix would
    each collect the other's packs as garbage). Raises :class:`StoreError`,
    :class:`Unavailable` or :class:`Exists` with the reason."""
    client = make_client(location, **client_options)
    what = f"checking {location.describe()}"
    try:
        client.head_bucket(Bucket=location.bucket)
        answer = client.list_objects_v2(Bucket=location.bucket, Prefix=location.prefix + "packs/", MaxKeys=1)
    except Exception as exc:      # noqa: BLE001 - translated
        err = translate(exc, what, location)
        if isinstance(err, NotFound):
            err = StoreError(f"{what}: the bucket {location.bucket!r} does not exist (create it first)")
        raise err from exc
    if answer.get("KeyCount", len(answer.get("Contents", ()))):
        raise Exists(f"{location.describe()} already holds packs (of another store?): choose another prefix")
