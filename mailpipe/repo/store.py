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
from typing import Any, Protocol, TypeVar

from mailpipe.errors import UserError

log = logging.getLogger("mailpipe.repo")
T = TypeVar("T")

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")


class StoreError(UserError):
    """The store cannot do what was asked. The message is one line naming the store and what to do."""


class KeyNotFound(StoreError):
    pass


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists (create) or changed (replace)."""


def check_key(key: str) -> str:
    parts = key.split("/")
    if not parts or any(not _COMPONENT.match(p) or ".." in p for p in parts):
        raise ValueError(f"unsafe object key {key!r}")
    return key


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: str) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...
    def describe(self) -> str: ...
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

    def describe(self) -> str:
        return self.root

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
    mailbox leases; a store that ignores them gives no mutual exclusion (docs/ENGINE.md, "the lease")."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", attempts: int = 5,
                 base_delay: float = 0.2) -> None:
        self.client = client
        self.base_delay = base_delay
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.attempts = attempts
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

    def put_bytes(self, key: str, data: bytes) -> None:
        k = self._k(key)
        self._retry(f"PUT {k}", lambda: self.client.put_object(Bucket=self.bucket, Key=k, Body=data))

    def put_file(self, key: str, path: str) -> None:
        k = self._k(key)
        self._retry(f"PUT {k}", lambda: self.client.upload_file(path, self.bucket, k))

    def get_bytes(self, key: str) -> bytes:
        k = self._k(key)
        return self._retry(f"GET {k}", lambda: self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read())

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
        k = self._k(key)
        self._retry(f"DELETE {k}", lambda: self.client.delete_object(Bucket=self.bucket, Key=k))

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        k = self._k(key)
        resp = self._retry(f"GET {k}", lambda: self.client.get_object(Bucket=self.bucket, Key=k))
        return resp["Body"].read(), resp["ETag"]

    def put_if_absent(self, key: str, data: bytes) -> str:
        k = self._k(key)
        return self._retry(f"PUT {k}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=k, Body=data, IfNoneMatch="*"))["ETag"]

    def put_if_version(self, key: str, data: bytes, version: str) -> str:
        k = self._k(key)
        return self._retry(f"PUT {k}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=k, Body=data, IfMatch=version))["ETag"]

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


def make_s3_client(endpoint_url: str | None, region: str | None) -> Any:
    """A boto3 S3 client with the standard AWS credential chain and botocore's standard retries."""
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=32,
                 s3={"addressing_style": "path"} if endpoint_url else None)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
