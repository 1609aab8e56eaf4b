"""Object stores: a local folder and S3, behind one small interface.

Keys are ``/``-separated and made only of components checked by :func:`check_key` (the repository
builds them from hashes, validated ids and fixed names), so no input can address anything outside
the store's root or prefix.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mailpipe.errors import UserError

if TYPE_CHECKING:
    from mailpipe.config import ObjectLockConfig

log = logging.getLogger("mailpipe.repo")
T = TypeVar("T")

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")


class StoreError(UserError):
    """The store cannot do what was asked. The message is one line naming the store and what to do."""


class KeyNotFound(StoreError):
    pass


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists (create) or changed (replace)."""


class ObjectLocked(StoreError):
    """S3 Object Lock keeps the object: its retention date is in the future (or a legal hold is on). Nothing
    was deleted — not even hidden behind a delete marker. ``until`` is None for a legal hold."""

    def __init__(self, message: str, key: str, until: datetime | None) -> None:
        super().__init__(message)
        self.key = key
        self.until = until


# What the repository writes once and never replaces: under Object Lock these keys get a retention date.
# Everything else (lease.json, checkpoints/, damaged/, restores/, prune/ plans) is replaced or deleted in
# normal operation and is never locked.
_LOCKED_KEY = re.compile(r"^(?:(?:packs|index|keys|blobs)/|mailboxes/[^/]+/snapshots/|mailpipe\.json$)")


def is_locked_key(key: str) -> bool:
    """Whether ``key`` is written with a retention date when the store has Object Lock configured."""
    return bool(_LOCKED_KEY.match(key))


def check_key(key: str) -> str:
    parts = key.split("/")
    if not parts or any(not _COMPONENT.match(p) or ".." in p for p in parts):
        raise ValueError(f"unsafe object key {key!r}")
    return key


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: str) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_range(self, key: str, offset: int, length: int) -> bytes: ...
    def get_file(self, key: str, path: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def modified_at(self, key: str) -> datetime: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: list[str]) -> None: ...
    def describe(self) -> str: ...
    # S3 Object Lock: until when the object is retained (None: not retained now); extending never shortens
    def retained_until(self, key: str) -> datetime | None: ...
    def extend_retention(self, key: str, until: datetime) -> datetime | None: ...
    # conditional writes (leases): a version tag per object, compared on write
    def get_versioned(self, key: str) -> tuple[bytes, str]: ...
    def put_if_absent(self, key: str, data: bytes) -> str: ...
    def put_if_version(self, key: str, data: bytes, version: str) -> str: ...
    def delete_if_version(self, key: str, version: str) -> None: ...
    # leftovers of writers that died: temporary files, incomplete uploads
    def clean_leftovers(self, prefix: str, older_than: float) -> int: ...
    def remove_empty(self, prefix: str) -> None: ...


_OS_PROBLEMS = {  # errno → (what it means, what to do; {fix} names the setting that chose the path)
    errno.EACCES: ("permission denied", "fix the folder's permissions or {fix}"),
    errno.EPERM: ("permission denied", "fix the folder's permissions or {fix}"),
    errno.EROFS: ("read-only file system", "point {fix} at a writable folder"),
    errno.ENOSPC: ("disk full", "free space on that file system or change {fix}"),
    errno.EDQUOT: ("disk quota exceeded", "free space, raise the quota or change {fix}"),
    errno.ENOTDIR: ("a path component is a file, not a folder", "fix {fix}"),
    errno.EEXIST: ("a file is in the way of a folder", "fix {fix}"),
    errno.EISDIR: ("a folder is in the way of a file", "remove it, or fix {fix}"),
}


def explain_os_error(e: OSError, fix: str) -> str:
    """``what — what to do`` for an OSError on a path the user chose through ``fix`` (no traceback, no
    path text beyond what the caller adds)."""
    what, todo = _OS_PROBLEMS.get(e.errno, (e.strerror or type(e).__name__, "check the folder and the disk"))
    return f"{what} — {todo.format(fix=fix)}"


def os_problem(e: OSError, where: str) -> StoreError:
    """An OSError of a local store → one line: where, what, what to do."""
    return StoreError(f"storage {where}: {explain_os_error(e, '`storage` in the tenants file')}")


class LocalStore:
    """A folder. Writes go to a temporary file under ``.tmp/`` (never a key: keys start with a letter or
    digit), are fsynced, then renamed into place (atomic on POSIX) and the directory is fsynced: a crash
    leaves either the whole object or none, plus at most a stray temporary file that
    :meth:`clean_leftovers` removes once it is old enough not to belong to a live writer."""

    TMP = ".tmp"

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        try:
            os.makedirs(self.root, exist_ok=True)
            if not os.path.isdir(self.root):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        except OSError as e:
            raise os_problem(e, self.root) from None
        self._tmp = os.path.join(self.root, self.TMP)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise KeyNotFound(key) from None
        except OSError as e:
            raise os_problem(e, self.root) from None

    def _atomic(self, key: str, write: Callable[[Any], None]) -> None:
        path = self._path(key)
        d = os.path.dirname(path)
        with self._errors(key):
            os.makedirs(d, exist_ok=True)
            os.makedirs(self._tmp, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="tmp-", dir=self._tmp)
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str) -> None:
        def copy(f: Any) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1024 * 1024)

        self._atomic(key, copy)

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key), open(self._path(key), "rb") as f:
            return f.read()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the object)."""
        with self._errors(key), open(self._path(key), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def get_file(self, key: str, path: str) -> None:
        with self._errors(key):
            shutil.copyfile(self._path(key), path)

    def local_path(self, key: str) -> str:
        """The file behind ``key`` (local store only: lets Parquet be read in place)."""
        p = self._path(key)
        if not os.path.exists(p):
            raise KeyNotFound(key)
        return p

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def modified_at(self, key: str) -> datetime:
        """When the object was last written."""
        with self._errors(key):
            return datetime.fromtimestamp(os.stat(self._path(key)).st_mtime, timezone.utc)

    def list(self, prefix: str) -> Iterator[str]:
        base = os.path.join(self.root, *[p for p in prefix.strip("/").split("/") if p]) if prefix.strip("/") \
            else self.root
        if prefix.strip("/"):
            check_key(prefix.strip("/"))
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue  # an interrupted write of format 1 (.tmp-*) or a lock: never a key
                yield os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")

    def delete(self, key: str) -> None:
        with self._errors(key):
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.delete(key)

    def describe(self) -> str:
        return self.root

    def retained_until(self, key: str) -> datetime | None:
        """A folder has no Object Lock (the tenants file refuses ``s3.object_lock`` for one)."""
        if not os.path.exists(self._path(key)):
            raise KeyNotFound(key)
        return None

    def extend_retention(self, key: str, until: datetime) -> datetime | None:
        return None

    # -- conditional writes: a lock file serialises them between processes of this host (and NFSv4
    # clients, which forward fcntl locks); the version of an object is the sha256 of its bytes
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._errors(".lock"):
            fd = os.open(os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def put_if_absent(self, key: str, data: bytes) -> str:
        with self._locked():
            if self.exists(key):
                raise PreconditionFailed(f"{key} exists")
            self.put_bytes(key, data)
        return hashlib.sha256(data).hexdigest()

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        with self._locked():
            if self.get_versioned(key)[1] != version:
                raise PreconditionFailed(f"{key} changed")
            self.put_bytes(key, data)
        return hashlib.sha256(data).hexdigest()

    def delete_if_version(self, key: str, version: str) -> None:
        with self._locked():
            try:
                if self.get_versioned(key)[1] != version:
                    raise PreconditionFailed(f"{key} changed")
            except KeyNotFound:
                return
            self.delete(key)

    def remove_empty(self, prefix: str) -> None:
        """Remove the folder of ``prefix`` if nothing is left in it (object stores have no folders)."""
        try:
            os.rmdir(self._path(prefix))
        except OSError:
            pass

    def clean_leftovers(self, prefix: str, older_than: float) -> int:
        """Remove temporary files older than ``older_than`` seconds: ``.tmp/`` (where every write
        starts) and the ``.tmp-*`` files format 1 left beside their target under ``prefix``."""
        cutoff = time.time() - older_than
        removed = 0
        dirs = [self._tmp]
        base = self._path(prefix) if prefix else None
        if base and os.path.isdir(base):
            dirs += [dp for dp, _, _ in os.walk(base)]
        for d in dirs:
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for e in entries:
                if (d == self._tmp or e.name.startswith(".tmp-")) and e.is_file():
                    try:
                        if e.stat().st_mtime < cutoff:
                            os.unlink(e.path)
                            removed += 1
                    except FileNotFoundError:
                        pass
        return removed


_RETRY_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed",
                "503", "500", "502", "504", "Throttling", "ThrottlingException"}
# S3 error code → (what it means, what to do); the message never quotes keys or signatures
_S3_PROBLEMS = {
    "NoSuchBucket": ("the bucket does not exist", "create it, or fix `storage` in the tenants file"),
    "InvalidAccessKeyId": ("the AWS access key id is not known to this S3 endpoint",
                           "fix the AWS credentials (environment, ~/.aws, instance role) or `s3.endpoint_url`"),
    "SignatureDoesNotMatch": ("the AWS secret key does not match the access key id", "fix the AWS credentials"),
    "AccessDenied": ("access denied", "grant the credentials s3:ListBucket, s3:GetObject, s3:PutObject and "
                                      "s3:DeleteObject on the bucket and prefix"),
    "403": ("access denied", "check the AWS credentials and the bucket policy"),
    "AllAccessDisabled": ("access to the bucket is disabled", "check the bucket in the S3 console"),
    "InvalidBucketName": ("not a valid bucket name", "fix `storage` in the tenants file"),
    "PermanentRedirect": ("the bucket is in another region", "set `s3.region` in the tenants file"),
    "AuthorizationHeaderMalformed": ("the request was signed for the wrong region", "set `s3.region`"),
    "ExpiredToken": ("the AWS session token has expired", "refresh the AWS credentials"),
    "InvalidToken": ("the AWS session token is invalid", "fix the AWS credentials"),
}


class S3Store:
    """A bucket + prefix through boto3. botocore retries (standard mode) plus one more layer here for
    5xx/SlowDown/connection errors, so a client handed in with default settings is covered too. PUTs
    are single requests (or boto3's multipart upload for files), so an object is either complete or absent.

    Conditional writes (``If-None-Match: *``, ``If-Match: <etag>``, S3 since 2024, MinIO, moto) carry the
    mailbox leases; a store that ignores them gives no mutual exclusion (docs/ENGINE.md, "the lease").

    ``object_lock``: every write of a key :func:`is_locked_key` accepts carries an Object Lock mode and a
    retain-until date (now + days) and a CRC32 checksum (S3 refuses a locked PUT without Content-MD5 or a
    checksum; it is asked for explicitly so that ``request_checksum_calculation = when_required`` in an AWS
    config cannot turn it off). The bucket must have Object Lock enabled, so it is versioned, and
    :meth:`delete` then removes every version of the key (see there). Without ``object_lock`` nothing is
    locked and a delete in a versioned bucket only adds a delete marker, as S3 does."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", attempts: int = 5,
                 base_delay: float = 0.2, *, object_lock: ObjectLockConfig | None = None) -> None:
        self.client = client
        self.base_delay = base_delay
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.attempts = attempts
        self.object_lock = object_lock
        self._lock_checked = False  # the bucket's Object Lock configuration was looked at (first locked write)
        if self.prefix:
            for p in self.prefix.split("/"):
                if not p or p in (".", "..") or "\x00" in p:
                    raise ValueError(f"bad S3 prefix {prefix!r}")

    def _k(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _problem(self, code: str, what: str) -> StoreError:
        meaning, todo = _S3_PROBLEMS.get(code, (None, None))
        if meaning:
            if self.object_lock is not None and code in ("AccessDenied", "403"):
                todo += (" (with `s3.object_lock`, also s3:ListBucketVersions, s3:DeleteObjectVersion, "
                         "s3:GetObjectRetention, s3:PutObjectRetention and s3:GetBucketObjectLockConfiguration)")
            return StoreError(f"storage {self.describe()}: {meaning} ({code}) — {todo}")
        return StoreError(f"storage {self.describe()}: S3 {what}: {code}")

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError
        from botocore.exceptions import NoCredentialsError

        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in ("404", "NoSuchKey", "NotFound"):
                    raise KeyNotFound(what) from None
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status == 412:
                    raise PreconditionFailed(f"{what}: {code}") from None
                if attempt == self.attempts or not (code in _RETRY_CODES or status >= 500):
                    raise self._problem(code or str(status), what) from None
            except NoCredentialsError:
                raise StoreError(f"storage {self.describe()}: no AWS credentials found — set AWS_ACCESS_KEY_ID "
                                 "and AWS_SECRET_ACCESS_KEY, a profile (AWS_PROFILE) or an instance/task role") from None
            except (BotoConnectionError, HTTPClientError) as e:  # refused, reset, closed mid-response
                if attempt == self.attempts:
                    raise StoreError(f"storage {self.describe()}: cannot reach the S3 endpoint "
                                     f"({type(e).__name__}) — check `s3.endpoint_url` and the network") from None
            time.sleep(random.uniform(0, min(8.0, self.base_delay * 2 ** attempt)))
            log.info("retrying S3 %s (attempt %d)", what, attempt + 1)
        raise AssertionError("unreachable")

    # -- Object Lock ----------------------------------------------------------------------------------
    def _lock_args(self, key: str) -> dict[str, Any]:
        """The PUT arguments that lock ``key`` (none when it is not a write-once key or no lock is set)."""
        if self.object_lock is None or not is_locked_key(key):
            return {}
        self._require_lock_enabled()
        until = _whole_second(datetime.now(timezone.utc) + timedelta(days=self.object_lock.days))
        return {"ObjectLockMode": self.object_lock.mode, "ObjectLockRetainUntilDate": until,
                "ChecksumAlgorithm": "CRC32"}

    def _require_lock_enabled(self) -> None:
        """Once per store, before the first locked write: the bucket must have Object Lock enabled, or every
        locked PUT would fail with a bare ``InvalidRequest``. Credentials not allowed to read the bucket's
        configuration skip the check (the PUT itself then tells)."""
        if self._lock_checked:
            return
        from botocore.exceptions import ClientError

        def call() -> dict[str, Any] | None:
            try:
                return self.client.get_object_lock_configuration(Bucket=self.bucket)
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code == "ObjectLockConfigurationNotFoundError":
                    return None
                if code in ("AccessDenied", "403", "NotImplemented", "501"):
                    return {"ObjectLockConfiguration": {"ObjectLockEnabled": "Enabled"}}  # cannot tell
                raise

        resp = self._retry(f"GET object lock configuration of {self.bucket}", call)
        conf = (resp or {}).get("ObjectLockConfiguration") or {}
        if conf.get("ObjectLockEnabled") != "Enabled":
            raise StoreError(f"storage {self.describe()}: the bucket does not have S3 Object Lock enabled — "
                             "`s3.object_lock` needs a bucket created with Object Lock (docs/CONFIG.md), "
                             "or remove `s3.object_lock` from the tenants file")
        if conf.get("Rule"):
            log.warning("storage %s: the bucket has a default Object Lock retention: lease, checkpoint and "
                        "progress files get locked too; remove the default rule (mailpipe sets retention per "
                        "object, docs/CONFIG.md)", self.describe())
        self._lock_checked = True

    def _lock_state(self, k: str,
                    version_id: str | None = None) -> tuple[str | None, datetime | None, bool, str | None]:
        """(mode, retain-until date, legal hold on, version id) of the current version of full key ``k``
        (or of ``version_id``), from one HEAD."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": k}
        if version_id is not None:
            kw["VersionId"] = version_id
        resp = self._retry(f"HEAD {k}", lambda: self.client.head_object(**kw))
        until = resp.get("ObjectLockRetainUntilDate")
        if until is not None:
            until = until.replace(tzinfo=timezone.utc) if until.tzinfo is None else until.astimezone(timezone.utc)
        return (resp.get("ObjectLockMode"), until, resp.get("ObjectLockLegalHoldStatus") == "ON",
                resp.get("VersionId"))

    def retained_until(self, key: str) -> datetime | None:
        """The date until which Object Lock keeps the current version of ``key``, or None when nothing keeps
        it now (no retention, or its date has passed). :class:`KeyNotFound` when there is no such key. S3
        returns the date only to credentials with ``s3:GetObjectRetention``."""
        _, until, _, _ = self._lock_state(self._k(key))
        return until if until is not None and until > datetime.now(timezone.utc) else None

    def extend_retention(self, key: str, until: datetime) -> datetime | None:
        """Keep the current version of ``key`` locked at least until ``until`` (an aware datetime): the
        retain-until date is moved later, never earlier; the object's mode is kept (an object without one
        gets the configured mode). Returns the retain-until date now in force."""
        if until.tzinfo is None:
            raise ValueError("extend_retention needs an aware datetime")
        k = self._k(key)
        mode, current, _, version_id = self._lock_state(k)
        until = _whole_second(until)
        if current is not None and current >= until:
            return current
        mode = mode or (self.object_lock.mode if self.object_lock else None)
        if mode is None:
            raise StoreError(f"storage {self.describe()}: cannot set a retention date on {key}: "
                             "`s3.object_lock` is not configured for this tenant")
        self._set_retention(k, version_id, mode, until)
        return until

    def _set_retention(self, k: str, version_id: str | None, mode: str, until: datetime) -> None:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": k, "Retention": {"Mode": mode, "RetainUntilDate": until}}
        if version_id is not None:
            kw["VersionId"] = version_id
        self._retry(f"PUT retention {k}", lambda: self.client.put_object_retention(**kw))

    # -- objects ---------------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        k = self._k(key)
        lock = self._lock_args(key)
        self._retry(f"PUT {k}", lambda: self.client.put_object(Bucket=self.bucket, Key=k, Body=data, **lock))

    def put_file(self, key: str, path: str) -> None:
        k = self._k(key)
        lock = self._lock_args(key)
        self._retry(f"PUT {k}", lambda: self.client.upload_file(path, self.bucket, k, ExtraArgs=lock or None))
        if lock:
            # A large file goes up as a multipart upload: S3 applies the lock given at its creation, but some
            # S3-compatible servers (moto among them) drop it. Read it back; set it if it is not there.
            _, until, _, version_id = self._lock_state(k)
            if until is None or until < lock["ObjectLockRetainUntilDate"]:
                log.info("storage %s: the server did not lock %s on upload; setting its retention", self.describe(), k)
                self._set_retention(k, version_id, lock["ObjectLockMode"], lock["ObjectLockRetainUntilDate"])

    def get_bytes(self, key: str) -> bytes:
        k = self._k(key)
        return self._retry(f"GET {k}", lambda: self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read())

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``: one ranged GET."""
        k = self._k(key)
        rng = f"bytes={offset}-{offset + length - 1}"
        return self._retry(f"GET {k} {rng}", lambda: self.client.get_object(Bucket=self.bucket, Key=k,
                                                                           Range=rng)["Body"].read())

    def get_file(self, key: str, path: str) -> None:
        k = self._k(key)
        self._retry(f"GET {k}", lambda: self.client.download_file(self.bucket, k, path))

    def exists(self, key: str) -> bool:
        k = self._k(key)
        try:
            self._retry(f"HEAD {k}", lambda: self.client.head_object(Bucket=self.bucket, Key=k))
            return True
        except KeyNotFound:
            return False

    def modified_at(self, key: str) -> datetime:
        """When the object was last written (its LastModified)."""
        k = self._k(key)
        return self._retry(f"HEAD {k}", lambda: self.client.head_object(Bucket=self.bucket, Key=k))["LastModified"]

    def list(self, prefix: str) -> Iterator[str]:
        p = self._k(prefix.strip("/")) + "/" if prefix.strip("/") else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        token = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": p}
            if token:
                kw["ContinuationToken"] = token
            resp = self._retry(f"LIST {p}", lambda: self.client.list_objects_v2(**kw))
            for o in resp.get("Contents", []):
                yield o["Key"][strip:]
            if not resp.get("IsTruncated"):
                return
            token = resp["NextContinuationToken"]

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error.

        Without ``object_lock``: one DeleteObject (in a versioned bucket S3 then only adds a delete marker
        and keeps the data as a noncurrent version, which a lifecycle rule expires).

        With ``object_lock`` (the bucket is versioned): every version of the key is deleted by version id,
        so the space is really freed — older versions first, the current one last, delete markers after all
        data is gone. A version under retention (or a legal hold) stops it with :class:`ObjectLocked`
        before the current version is touched: the object stays readable, nothing hides it behind a delete
        marker, and the caller can report it as retained. (A plain DeleteObject would "succeed" on a locked
        object by adding a marker: the object would vanish from listings while its bytes stay billed.)"""
        k = self._k(key)
        if self.object_lock is None:
            self._retry(f"DELETE {k}", lambda: self.client.delete_object(Bucket=self.bucket, Key=k))
            return
        versions, markers = self._versions(k)
        # S3 lists the versions of a key newest first (LastModified has only second precision): reversed,
        # oldest first; the current version last in any case
        versions.reverse()
        versions.sort(key=lambda v: bool(v.get("IsLatest")))
        for v in versions:
            self._delete_version(key, k, v["VersionId"])
        for m in markers:
            self._delete_version(key, k, m["VersionId"])

    def delete_many(self, keys: list[str]) -> None:
        """Delete ``keys``: one DeleteObjects request per 1,000 (with ``object_lock``, key by key: see
        :meth:`delete`). A key that cannot be deleted raises a :class:`StoreError` naming it."""
        if self.object_lock is not None:
            for key in keys:
                self.delete(key)
            return
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._k(key)} for key in keys[i:i + 1000]]
            resp = self._retry(f"DELETE {len(batch)} objects", lambda batch=batch: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
            errors = resp.get("Errors") or []
            if errors:
                e = errors[0]
                raise self._problem(str(e.get("Code")), f"DELETE {e.get('Key')}: {e.get('Message')}")

    def _versions(self, k: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(object versions, delete markers) of exactly the full key ``k``."""
        versions: list[dict[str, Any]] = []
        markers: list[dict[str, Any]] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": k}
        while True:
            resp = self._retry(f"LIST versions {k}", lambda: self.client.list_object_versions(**kw))
            versions += [v for v in resp.get("Versions", []) or [] if v.get("Key") == k]
            markers += [m for m in resp.get("DeleteMarkers", []) or [] if m.get("Key") == k]
            if not resp.get("IsTruncated"):
                return versions, markers
            kw["KeyMarker"] = resp.get("NextKeyMarker")
            kw["VersionIdMarker"] = resp.get("NextVersionIdMarker")

    def _delete_version(self, key: str, k: str, version_id: str) -> None:
        from botocore.exceptions import ClientError

        def call() -> Any:
            try:
                return self.client.delete_object(Bucket=self.bucket, Key=k, VersionId=version_id)
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) in ("AccessDenied", "403"):
                    raise _Denied() from None  # not retried; looked at below
                raise

        try:
            self._retry(f"DELETE {k}", call)
        except KeyNotFound:
            pass  # already gone
        except _Denied:
            # S3 answers AccessDenied both for a locked version and for missing permissions: look which
            try:
                _, until, hold, _ = self._lock_state(k, version_id)
            except StoreError:
                until, hold = None, False
            if hold:
                raise ObjectLocked(f"storage {self.describe()}: {key} is under an S3 Object Lock legal hold — "
                                   "it can be deleted once the hold is removed", key, None) from None
            if until is not None and until > datetime.now(timezone.utc):
                raise ObjectLocked(f"storage {self.describe()}: {key} is retained by S3 Object Lock until "
                                   f"{until:%Y-%m-%d %H:%M:%S} UTC — it can be deleted after that",
                                   key, until) from None
            raise self._problem("AccessDenied", f"DELETE {k}") from None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        k = self._k(key)
        resp = self._retry(f"GET {k}", lambda: self.client.get_object(Bucket=self.bucket, Key=k))
        return resp["Body"].read(), resp["ETag"]

    def put_if_absent(self, key: str, data: bytes) -> str:
        k = self._k(key)
        lock = self._lock_args(key)
        return self._retry(f"PUT {k}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=k, Body=data, IfNoneMatch="*", **lock))["ETag"]

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        k = self._k(key)
        lock = self._lock_args(key)
        return self._retry(f"PUT {k}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=k, Body=data, IfMatch=version, **lock))["ETag"]

    def delete_if_version(self, key: str, version: str) -> None:
        k = self._k(key)
        try:
            self._retry(f"DELETE {k}", lambda: self.client.delete_object(Bucket=self.bucket, Key=k, IfMatch=version))
        except KeyNotFound:
            pass

    def remove_empty(self, prefix: str) -> None:
        pass  # S3 has no folders

    def clean_leftovers(self, prefix: str, older_than: float) -> int:
        """Abort multipart uploads under ``prefix`` started more than ``older_than`` seconds ago: what a
        writer killed during a large upload leaves (invisible, but billed)."""
        from datetime import datetime, timedelta, timezone

        p = self._k(prefix.strip("/")) + "/" if prefix.strip("/") else (self.prefix + "/" if self.prefix else "")
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than)
        resp = self._retry(f"LIST uploads {p}", lambda: self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=p))
        removed = 0
        for u in resp.get("Uploads", []) or []:
            if u.get("Initiated") and u["Initiated"] < cutoff:
                self._retry(f"ABORT {u['Key']}", lambda u=u: self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]))
                removed += 1
        return removed


class _Denied(Exception):
    """AccessDenied on a version delete: a locked version, or missing permissions (S3 says the same)."""


def _whole_second(t: datetime) -> datetime:
    """``t`` rounded up to a whole second (a retain-until date never ends earlier than asked)."""
    return t.replace(microsecond=0) + timedelta(seconds=1) if t.microsecond else t


def make_s3_client(endpoint_url: str | None, region: str | None) -> Any:
    """A boto3 S3 client with the standard AWS credential chain and botocore's standard retries."""
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=32,
                 s3={"addressing_style": "path"} if endpoint_url else None)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
