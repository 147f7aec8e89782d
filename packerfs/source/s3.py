"""S3 and S3-compatible stores (s3fs / aiobotocore), for packerfs.source.objects.

Configuration is botocore's: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ~/.aws/config and credentials, AWS_REQUEST_CHECKSUM_CALCULATION, …; -o options go to
s3fs.S3FileSystem. Two options are packerfs's own and not passed on: `list_version=1` (ListObjects
v1, for stores without v2 such as Huawei OBS) and `versions=false` (pin reads by ETag even on a
versioned bucket).

Pinning: on a bucket with versioning enabled, the listing is ListObjectVersions (its latest
entries) and every read names the VersionId, so an object overwritten later still reads as the
version packed until that version is deleted. Otherwise reads carry If-Match with the listed ETag:
an overwrite gives 412 and the read fails rather than mixing versions.
"""

from __future__ import annotations

import calendar

from packerfs.source.objects import (
    BUCKET_MISSING, CHANGED, CONCURRENCY, DENIED, MISSING, OTHER, THROTTLED, UNREACHABLE, Backend, Failure, Listed,
    ObjectUrl,
)

PAGE = 1000
THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                  "ServiceUnavailable", "RequestTimeout", "InternalError"}


def _mtime_ns(value) -> int:
    """LastModified (a datetime from botocore) in ns since the epoch."""
    return calendar.timegm(value.utctimetuple()) * 10**9 + value.microsecond * 1000


class S3Backend(Backend):
    def __init__(self, url: ObjectUrl, options: dict):
        import s3fs

        super().__init__(url, options)
        self.list_version = int(options.pop("list_version", 2))
        use_versions = options.pop("versions", True)
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

    def classify(self, exc: BaseException) -> Failure:
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError

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
