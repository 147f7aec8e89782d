"""Google Cloud Storage (gcsfs), for packerfs.source.objects.

Configuration is gcsfs's and google-auth's: GOOGLE_APPLICATION_CREDENTIALS, gcloud's application
default credentials, the metadata server, or -o token=anon for public buckets;
STORAGE_EMULATOR_HOST points at an emulator. -o options go to gcsfs.GCSFileSystem.

Requests go through gcsfs's authorised session but are sent here, so that the status of each
answer is ours to word and retry (objects.RETRY_SECONDS) instead of gcsfs's fixed retries.

Pinning: every read names the listed generation, which changes on every write, so an overwritten
object reads as the version packed while that generation exists (object versioning), and as
404 (the read fails) once it does not.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from urllib.parse import quote

from packerfs.source.objects import (
    BUCKET_MISSING, CHANGED, DENIED, MISSING, OTHER, THROTTLED, UNREACHABLE, Backend, Failure, Listed, ObjectUrl,
)

# Without this, gcsfs first probes each bucket for hierarchical namespaces, which an emulator
# answers only after a long TLS timeout (measured: 60 s per bucket).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

PAGE = 1000


class GCSError(Exception):
    def __init__(self, status: int, reason: str, url: str):
        super().__init__(f"{status} {reason}".strip())
        self.status = status
        self.reason = reason


def _mtime_ns(text: str) -> int:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(when.timestamp()) * 10**9 + when.microsecond * 1000


class GCSBackend(Backend):
    def __init__(self, url: ObjectUrl, options: dict):
        import gcsfs

        super().__init__(url, options)
        self.fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False, **options)

    async def _get(self, url: str, params: dict | None = None, headers: dict | None = None) -> bytes:
        fs = self.fs
        await fs._set_session()
        async with fs.session.request(
            "GET", url, params=fs._get_params(params or {}), headers=fs._get_headers(headers),
            timeout=fs.requests_timeout,
        ) as answer:
            body = await answer.read()
            if answer.status >= 400:
                reason = ""
                try:
                    error = json.loads(body)["error"]
                    reason = error.get("message", "") if isinstance(error, dict) else str(error)
                except (ValueError, KeyError, TypeError, AttributeError):
                    reason = body[:200].decode("utf-8", "replace")
                raise GCSError(answer.status, reason.splitlines()[0] if reason else answer.reason or "", url)
            return body

    def _objects_url(self) -> str:
        return f"{self.fs._location}/storage/v1/b/{quote(self.url.bucket, safe='')}/o"

    async def check(self) -> None:
        try:
            await self._get(f"{self.fs._location}/storage/v1/b/{quote(self.url.bucket, safe='')}")
        except GCSError as exc:
            if exc.status == 404:
                raise GCSError(404, "bucket not found", "") from None
            raise

    async def list_level(self, prefix: str):
        params = {"delimiter": "/", "prefix": prefix, "maxResults": PAGE}
        while True:
            page = json.loads(await self._get(self._objects_url(), params))
            out = [Listed(p, True) for p in page.get("prefixes", ())]
            for item in page.get("items", ()):
                out.append(Listed(item["name"], False, int(item.get("size", 0)), "g:" + str(item.get("generation", "")),
                                  _mtime_ns(item["updated"]) if item.get("updated") else 0))
            yield out
            token = page.get("nextPageToken")
            if not token:
                return
            params["pageToken"] = token

    async def read(self, key: str, token: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        kind, _, generation = token.partition(":")
        params = {"alt": "media"}
        if kind == "g" and generation:
            params["generation"] = generation
        url = f"{self._objects_url()}/{quote(key, safe='')}"
        return await self._get(url, params, {"Range": f"bytes={start}-{end - 1}"})

    def classify(self, exc: BaseException) -> Failure:
        import aiohttp

        if isinstance(exc, GCSError):
            text = str(exc)
            if exc.status == 404:
                return Failure(BUCKET_MISSING if exc.reason == "bucket not found" else MISSING, text)
            if exc.status == 412:
                return Failure(CHANGED, text)
            if exc.status in (401, 403):
                return Failure(DENIED, text)
            if exc.status in (429, 503):
                return Failure(THROTTLED, text)
            if exc.status >= 500:
                return Failure(UNREACHABLE, text)
            return Failure(OTHER, text)
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            return Failure(UNREACHABLE, f"{type(exc).__name__}: {exc}")
        try:
            import google.auth.exceptions

            if isinstance(exc, google.auth.exceptions.GoogleAuthError):
                return Failure(DENIED, f"credentials: {exc}")
        except ImportError:
            pass
        return Failure(OTHER, f"{type(exc).__name__}: {exc}")
