"""S3 and S3-compatible stores (s3fs / aiobotocore), for packerfs.source.objects.

Configuration is botocore's: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ~/.aws/config and credentials, AWS_REQUEST_CHECKSUM_CALCULATION, …; -o options go to
s3fs.S3FileSystem. Two options are packerfs's own and not passed on: `list_version=1` (ListObjects
v1, for stores without v2 such as Huawei OBS) and `versions=false` (pin reads by ETag even on a
versioned bucket).

Writing (packerfs.source.upload, `pack SRC s3://…`): multipart uploads; each part carries its
SHA-256 (ChecksumAlgorithm=SHA256, x-amz-checksum-sha256), which AWS S3 verifies before it stores
the part (moto accepts the header without checking it). After the complete, the object's checksum
the store reports (the SHA-256 of the parts' SHA-256s, which moto too computes from the bytes it
stored) is compared with ours; an object that differs is deleted at once. `-o upload_checksum=md5` sends Content-MD5
instead, which S3-compatible stores without the newer checksums verify (MinIO, Ceph RGW, …).
Unfinished multipart uploads of an interrupted run are listed and aborted by the next one.
A CAR uploaded during the scan (upload.ObjectWriter) sends its first part last, once the header
naming its root is fixed up: S3 assembles the parts by number, whatever order they came in.

Pinning: on a bucket with versioning enabled, the listing is ListObjectVersions (its latest
entries) and every read names the VersionId, so an object overwritten later still reads as the
version packed until that version is deleted. Otherwise reads carry If-Match with the listed ETag:
an overwrite gives 412 and the read fails rather than mixing versions.
"""

from __future__ import annotations

import base64
import calendar
import hashlib

from packerfs.source.objects import (
    BUCKET_MISSING, CHANGED, CONCURRENCY, DENIED, MISSING, OTHER, THROTTLED, UNREACHABLE, Backend, Failure, Listed,
    ObjectUrl,
)

PAGE = 1000
THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                  "ServiceUnavailable", "RequestTimeout", "InternalError"}


class ChecksumMismatch(Exception):
    """What the store holds is not what was sent."""


def _mtime_ns(value) -> int:
    """LastModified (a datetime from botocore) in ns since the epoch."""
    return calendar.timegm(value.utctimetuple()) * 10**9 + value.microsecond * 1000


class S3Backend(Backend):
    def __init__(self, url: ObjectUrl, options: dict):
        import s3fs

        super().__init__(url, options)
        self.list_version = int(options.pop("list_version", 2))
        use_versions = options.pop("versions", True)
        self.upload_checksum = str(options.pop("upload_checksum", "sha256")).lower()
        if self.upload_checksum not in ("sha256", "md5"):
            raise ValueError(f"upload_checksum={self.upload_checksum!r}: use sha256 or md5")
        config = dict(options.pop("config_kwargs", None) or {})
        # Retries are ours (objects.RETRY_SECONDS, every failure worded), not botocore's on top.
        config.setdefault("retries", {"total_max_attempts": 1})
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 120)
        # botocore's pool holds 10 connections: fewer than the requests objects.py keeps in flight
        config.setdefault("max_pool_connections", CONCURRENCY)
        self.fs = s3fs.S3FileSystem(
            skip_instance_cache=True, use_listings_cache=False, config_kwargs=config, **options
        )
        self.fs.retries = 1
        self.versioned = False
        self.use_versions = bool(use_versions)

    async def _client(self):
        await self.fs.set_session()
        return await self.fs.get_s3(self.url.bucket)

    async def check(self) -> None:
        client = await self._client()
        if self.use_versions:
            try:
                answer = await client.get_bucket_versioning(Bucket=self.url.bucket)
                self.versioned = answer.get("Status") in ("Enabled", "Suspended")
            except Exception as exc:
                failure = self.classify(exc)
                if failure.kind in (BUCKET_MISSING, THROTTLED, UNREACHABLE):
                    raise
                self.versioned = False  # may not ask (no s3:GetBucketVersioning): pin by ETag
        await client.list_objects_v2(Bucket=self.url.bucket, MaxKeys=1, Prefix=self.url.prefix)

    async def list_level(self, prefix: str):
        client = await self._client()
        kwargs = dict(Bucket=self.url.bucket, Prefix=prefix, Delimiter="/", MaxKeys=PAGE)
        while True:
            if self.versioned:
                page = await client.list_object_versions(**kwargs)
                objects = [
                    Listed(v["Key"], False, v["Size"], "v:" + v["VersionId"], _mtime_ns(v["LastModified"]))
                    for v in page.get("Versions", ())
                    if v.get("IsLatest")
                ]
            elif self.list_version == 1:
                page = await client.list_objects(**kwargs)
                objects = [self._object(o) for o in page.get("Contents", ())]
            else:
                page = await client.list_objects_v2(**kwargs)
                objects = [self._object(o) for o in page.get("Contents", ())]
            prefixes = [Listed(p["Prefix"], True) for p in page.get("CommonPrefixes", ())]
            yield objects + prefixes
            if not page.get("IsTruncated"):
                return
            if self.versioned:
                kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
                kwargs["VersionIdMarker"] = page.get("NextVersionIdMarker", "")
            elif self.list_version == 1:
                last = page.get("NextMarker") or max(
                    [o.key for o in objects] + [p.key for p in prefixes], default=""
                )
                kwargs["Marker"] = last
            else:
                kwargs["ContinuationToken"] = page["NextContinuationToken"]

    @staticmethod
    def _object(o: dict) -> Listed:
        return Listed(o["Key"], False, o["Size"], "e:" + o.get("ETag", ""), _mtime_ns(o["LastModified"]))

    async def read(self, key: str, token: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        client = await self._client()
        kwargs = dict(Bucket=self.url.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        kind, _, value = token.partition(":")
        if kind == "v" and value != "null":
            kwargs["VersionId"] = value
        elif kind == "e" and value:
            kwargs["IfMatch"] = value
        answer = await client.get_object(**kwargs)
        body = answer["Body"]
        try:
            return await body.read()
        finally:
            body.close()

    # ---------------------------------------------------------------- writing (packerfs.source.upload)

    parts_in_flight = 2
    parts_any_order = True  # parts are assembled by PartNumber: the first may go last (upload.ObjectWriter)

    async def upload_start(self, key: str, size: int, content_type: str) -> str:
        client = await self._client()
        kwargs = dict(Bucket=self.url.bucket, Key=key, ContentType=content_type)
        if self.upload_checksum == "sha256":
            kwargs["ChecksumAlgorithm"] = "SHA256"
        answer = await client.create_multipart_upload(**kwargs)
        return answer["UploadId"]

    def prepare_part(self, upload_id: str, data: bytes) -> str:
        """The part's checksum, base64 (computed in the producing thread, not on the event loop)."""
        digest = hashlib.sha256(data) if self.upload_checksum == "sha256" else hashlib.md5(data)
        return base64.b64encode(digest.digest()).decode()

    async def upload_part(self, key: str, upload_id: str, number: int, offset: int, data: bytes,
                          total: int | None, checksum: str) -> dict:
        client = await self._client()
        kwargs = dict(Bucket=self.url.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data)
        if self.upload_checksum == "sha256":
            kwargs["ChecksumSHA256"] = checksum  # verified by S3; a mismatch is 400 BadDigest
        else:
            kwargs["ContentMD5"] = checksum  # verified by S3 and S3-compatible stores (400 BadDigest)
        answer = await client.upload_part(**kwargs)
        part = {"PartNumber": number, "ETag": answer["ETag"]}
        if self.upload_checksum == "sha256":
            part["ChecksumSHA256"] = answer.get("ChecksumSHA256") or checksum
        return part

    async def upload_complete(self, key: str, upload_id: str, parts: list[dict]) -> None:
        client = await self._client()
        answer = await client.complete_multipart_upload(
            Bucket=self.url.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
        if self.upload_checksum != "sha256":
            return
        # The object's checksum as the store computed it: SHA-256 of the parts' SHA-256s ("…-N" on
        # AWS). AWS has checked every part's already; an emulator that does not (moto) still computes
        # this from the bytes it stored, so a mismatch means stored bytes differ from ours.
        reported = answer.get("ChecksumSHA256")
        if not reported:  # moto answers without it; HEAD gives it
            head = await client.head_object(Bucket=self.url.bucket, Key=key, ChecksumMode="ENABLED")
            reported = head.get("ChecksumSHA256")
        reported = str(reported or "").partition("-")[0]
        composite = hashlib.sha256(b"".join(base64.b64decode(p["ChecksumSHA256"]) for p in parts))
        mine = base64.b64encode(composite.digest()).decode()
        if reported and reported != mine:
            try:
                await client.delete_object(Bucket=self.url.bucket, Key=key)
            finally:
                raise ChecksumMismatch(f"the stored object's SHA-256 (of its parts) is {reported}, the data's is {mine}; "
                                       f"the object was deleted")

    async def upload_abort(self, key: str, upload_id: str) -> None:
        client = await self._client()
        await client.abort_multipart_upload(Bucket=self.url.bucket, Key=key, UploadId=upload_id)

    async def stale_uploads(self, prefix: str) -> list[tuple[str, str]]:
        client = await self._client()
        kwargs = dict(Bucket=self.url.bucket, Prefix=prefix, MaxUploads=PAGE)
        out = []
        while True:
            page = await client.list_multipart_uploads(**kwargs)
            out.extend((u["Key"], u["UploadId"]) for u in page.get("Uploads", ()))
            if not page.get("IsTruncated"):
                return out
            kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")

    async def head(self, key: str, length: int) -> tuple[int, bytes] | None:
        """(size, its first `length` bytes) of the object, or None if there is none: one ranged GET."""
        client = await self._client()
        try:
            answer = await client.get_object(Bucket=self.url.bucket, Key=key, Range=f"bytes=0-{max(length, 1) - 1}")
        except Exception as exc:
            failure = self.classify(exc)
            if failure.kind == MISSING:
                return None
            status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 416:  # an empty object: not ours
                return 0, b""
            raise
        body = answer["Body"]
        try:
            data = await body.read(length)  # never more, even from a store that ignores Range
        finally:
            body.close()
        total = str(answer.get("ContentRange", "")).rpartition("/")[2]
        size = int(total) if total.isdigit() else int(answer.get("ContentLength", len(data)))
        return size, data

    def classify(self, exc: BaseException) -> Failure:
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError

        if isinstance(exc, ChecksumMismatch):
            return Failure(OTHER, str(exc))
        if isinstance(exc, NoCredentialsError):
            return Failure(DENIED, "no credentials found (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/credentials)")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            text = f"{status} {code}".strip()
            if code == "NoSuchBucket":
                return Failure(BUCKET_MISSING, text)
            if code in ("PreconditionFailed",) or status == 412:
                return Failure(CHANGED, text)
            if code in ("NoSuchKey", "NoSuchVersion", "InvalidArgument") and status in (400, 404):
                return Failure(MISSING, text)
            if status == 404:
                return Failure(MISSING if code else BUCKET_MISSING, text or "404")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                        "ExpiredToken", "InvalidToken") or status in (401, 403):
                return Failure(DENIED, text)
            if code in THROTTLE_CODES or status in (429, 500, 502, 503, 504):
                return Failure(THROTTLED if status in (429, 503) or "Throttl" in code or code == "SlowDown"
                               else UNREACHABLE, text)
            return Failure(OTHER, f"{text}: {error.get('Message', '')}".rstrip(": "))
        if isinstance(exc, (ConnectionError, HTTPClientError, OSError)):
            return Failure(UNREACHABLE, f"{type(exc).__name__}: {exc}")
        try:
            import aiohttp

            if isinstance(exc, aiohttp.ClientError):
                return Failure(UNREACHABLE, f"{type(exc).__name__}: {exc}")
        except ImportError:
            pass
        return Failure(OTHER, f"{type(exc).__name__}: {exc}")
