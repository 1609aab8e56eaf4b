"""Object stores: a local folder and S3, behind one small interface.

Keys are ``/``-separated and made only of components checked by :func:`check_key` (the repository
builds them from hashes, validated ids and fixed names), so no input can address anything outside
the store's root or prefix.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

log = logging.getLogger("mailpipe.repo")
T = TypeVar("T")

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")


class StoreError(Exception):
    pass


class KeyNotFound(StoreError):
    pass


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


class LocalStore:
    """A folder. Writes go to a temporary file in the same directory, are fsynced, then renamed into
    place (atomic on POSIX) and the directory is fsynced: a crash leaves either the whole object or none."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def _atomic(self, key: str, write: Callable[[Any], None]) -> None:
        path = self._path(key)
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
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
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyNotFound(key) from None

    def get_file(self, key: str, path: str) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise KeyNotFound(key) from None

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
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".tmp-"):
                    continue  # an interrupted write: never visible
                yield os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def describe(self) -> str:
        return self.root


_RETRY_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed",
                "503", "500", "502", "504", "Throttling", "ThrottlingException"}


class S3Store:
    """A bucket + prefix through boto3. botocore retries (standard mode) plus one more layer here for
    5xx/SlowDown/connection errors, so a client handed in with default settings is covered too. PUTs
    are single requests (or boto3's multipart upload for files), so an object is either complete or absent."""

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

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError

        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in ("404", "NoSuchKey", "NotFound"):
                    raise KeyNotFound(what) from None
                if attempt == self.attempts or not (code in _RETRY_CODES or status >= 500):
                    raise StoreError(f"S3 {what}: {code or status}") from None
            except BotoConnectionError as e:
                if attempt == self.attempts:
                    raise StoreError(f"S3 {what}: {type(e).__name__}") from None
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


def make_s3_client(endpoint_url: str | None, region: str | None) -> Any:
    """A boto3 S3 client with the standard AWS credential chain and botocore's standard retries."""
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=32,
                 s3={"addressing_style": "path"} if endpoint_url else None)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
