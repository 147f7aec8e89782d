"""Google Cloud Storage (gcsfs), for packerfs.source.objects.

Configuration is gcsfs's and google-auth's: GOOGLE_APPLICATION_CREDENTIALS, gcloud's application
default credentials, the metadata server, or -o token=anon for public buckets;
STORAGE_EMULATOR_HOST points at an emulator. -o options go to gcsfs.GCSFileSystem.

Requests go through gcsfs's authorised session but are sent here, so that the status of each
answer is ours to word and retry (objects.RETRY_SECONDS) instead of gcsfs's fixed retries.

Writing (packerfs.source.upload, `pack SRC gs://…`): a resumable upload session per object, its
chunks sent one after another; the object exists only once the last chunk is stored. The last chunk
carries X-Goog-Hash with the CRC32C of the whole object (MD5 if google-crc32c is missing), which GCS
verifies before it creates the object; the hash the server reports back is compared as well (that
is the check an emulator gives), and an object that does not match is deleted at once.

Pinning: every read names the listed generation, which changes on every write, so an overwritten
object reads as the version packed while that generation exists (object versioning), and as
404 (the read fails) once it does not.
"""

from __future__ import annotations

import base64
import hashlib
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
        return (await self._request("GET", url, params=params or {}, headers=headers, redirects=True))[2]

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

    # ---------------------------------------------------------------- writing (packerfs.source.upload)

    parts_in_flight = 1  # a resumable session takes its chunks in order

    async def _request(self, method: str, url: str, *, params: dict | None = None, headers: dict | None = None,
                       data: bytes | None = None, json_body: dict | None = None, redirects: bool = False):
        """(status, headers, body) of one request; >= 400 raises GCSError. Without `redirects`, 308 (a
        resumable session's "go on") is an answer, not a redirect."""
        fs = self.fs
        await fs._set_session()
        kwargs = {"data": data} if json_body is None else {"json": json_body}
        async with fs.session.request(
            method, url, params=None if params is None else fs._get_params(params), headers=fs._get_headers(headers),
            timeout=fs.requests_timeout, allow_redirects=redirects, **kwargs,
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
            return answer.status, answer.headers, body

    async def upload_start(self, key: str, size: int, content_type: str) -> "_Session":
        url = f"{self.fs._location}/upload/storage/v1/b/{quote(self.url.bucket, safe='')}/o"
        _, headers, _ = await self._request(
            "POST", url, params={"uploadType": "resumable", "name": key},
            headers={"X-Upload-Content-Type": content_type, "X-Upload-Content-Length": str(size)},
            json_body={"name": key, "contentType": content_type},
        )
        location = headers.get("Location")
        if not location:
            raise GCSError(500, "no resumable session in the answer (no Location header)", url)
        return _Session(location)

    def prepare_part(self, session: "_Session", data: bytes) -> None:
        session.hash.update(data)  # once per part, in order: the whole object's hash

    async def upload_part(self, key: str, session: "_Session", number: int, offset: int, data: bytes,
                          total: int | None, prepared: None) -> None:
        end = offset + len(data)
        if session.uncertain:  # an attempt failed on the way: ask how much the session holds
            status, headers, body = await self._request(
                "PUT", session.url, headers={"Content-Range": f"bytes */{total if total is not None else '*'}"}
            )
            if status in (200, 201):
                session.persisted = end
                session.uncertain = False
                return self._check(key, session, json.loads(body) if body else {})
            session.persisted = _persisted(headers)
        session.persisted = max(session.persisted, offset)
        while True:
            start = session.persisted
            headers = {"Content-Range": f"bytes {start}-{end - 1}/{total if total is not None else '*'}"}
            if total is not None:
                headers["X-Goog-Hash"] = session.hash.header()  # GCS verifies it against what it stored
            session.uncertain = True
            status, answer_headers, body = await self._request(
                "PUT", session.url, headers=headers, data=data[start - offset:]
            )
            session.uncertain = False
            if status in (200, 201):
                session.persisted = end
                return self._check(key, session, json.loads(body) if body else {})
            session.persisted = _persisted(answer_headers)  # 308: GCS may have kept less than was sent
            if session.persisted >= end:
                return None

    def _check(self, key: str, session: "_Session", resource: dict) -> None:
        reported = {name: resource.get(field) for name, field in (("crc32c", "crc32c"), ("md5", "md5Hash"))}
        mine = session.hash.values()
        wrong = [name for name, value in mine.items() if reported.get(name) and reported[name] != value]
        if wrong:
            session.corrupt = (resource.get("generation"), wrong[0], reported[wrong[0]], mine[wrong[0]])
        return None

    async def upload_complete(self, key: str, session: "_Session", tokens: list) -> None:
        if session.corrupt is None:
            return
        generation, name, theirs, mine = session.corrupt
        params = {"ifGenerationMatch": str(generation)} if generation else {}
        try:
            await self._request("DELETE", f"{self._objects_url()}/{quote(key, safe='')}", params=params)
        except GCSError:
            pass
        raise GCSError(400, f"the stored object's {name} is {theirs}, the data's is {mine}; the object was deleted", "")

    async def upload_abort(self, key: str, session: "_Session") -> None:
        try:
            await self._request("DELETE", session.url)
        except GCSError as exc:
            if exc.status != 499:  # GCS answers a cancelled session with 499
                raise

    async def stale_uploads(self, prefix: str) -> list:
        return []  # resumable sessions cannot be listed; they hold no object and expire after a week

    async def head(self, key: str, length: int) -> tuple[int, bytes] | None:
        url = f"{self._objects_url()}/{quote(key, safe='')}"
        try:
            meta = json.loads(await self._get(url))
        except GCSError as exc:
            if exc.status == 404:
                return None
            raise
        size = int(meta.get("size", 0))
        if size == 0:
            return 0, b""
        generation = str(meta.get("generation", ""))
        params = {"alt": "media", **({"generation": generation} if generation else {})}
        data = await self._get(url, params, {"Range": f"bytes=0-{min(length, size) - 1}"})
        return size, data[:length]

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


class _Hash:
    """The whole object's CRC32C (what GCS checks best) and MD5."""

    def __init__(self):
        try:
            import google_crc32c

            self.crc = google_crc32c.Checksum()
        except ImportError:  # pragma: no cover - gcsfs depends on it
            self.crc = None
        self.md5 = hashlib.md5()

    def update(self, data: bytes) -> None:
        if self.crc is not None:
            self.crc.update(data)
        self.md5.update(data)

    def values(self) -> dict[str, str]:
        out = {"md5": base64.b64encode(self.md5.digest()).decode()}
        if self.crc is not None:
            out["crc32c"] = base64.b64encode(self.crc.digest()).decode()
        return out

    def header(self) -> str:
        values = self.values()
        return f"crc32c={values['crc32c']}" if "crc32c" in values else f"md5={values['md5']}"


class _Session:
    __slots__ = ("url", "hash", "persisted", "uncertain", "corrupt")

    def __init__(self, url: str):
        self.url = url
        self.hash = _Hash()
        self.persisted = 0  # bytes the session holds, as far as we know
        self.uncertain = False  # a chunk was sent without an answer: ask before sending again
        self.corrupt: tuple | None = None  # (generation, hash name, theirs, ours) if the stored hash differs


def _persisted(headers) -> int:
    """Bytes a resumable session holds, from a 308's Range header ("bytes=0-N"; none: 0)."""
    value = headers.get("Range", "")
    _, _, last = value.rpartition("-")
    return int(last) + 1 if last.isdigit() else 0
