"""Azure Blob Storage (adlfs / azure-storage-blob), for packerfs.source.objects.

Configuration is adlfs's: AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with
AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or a service principal (AZURE_STORAGE_CLIENT_ID,
…_CLIENT_SECRET, …_TENANT_ID); -o options go to adlfs.AzureBlobFileSystem. The account may also
come from the URL: abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX.

Writing (packerfs.source.upload, `pack SRC az://…`): each part is a block staged with Put Block and
the blob is committed with Put Block List, so it exists only once complete. Every block carries its
Content-MD5 (validate_content=True), which Azure (and Azurite) verify before they store the block
(400 Md5Mismatch otherwise). Blocks of an interrupted run stay uncommitted, invisible to listings,
until the next commit of the name discards them (or Azure does, after a week).
A CAR uploaded during the scan (upload.ObjectWriter) stages its first block last, once the header
naming its root is fixed up: the block list, in block order, is what the blob is.

Pinning: every read carries If-Match with the listed ETag (which changes on every write), so an
overwritten blob gives 412 and the read fails rather than mixing versions.
"""

from __future__ import annotations

import base64
import calendar
import secrets

from packerfs.source.objects import (
    BUCKET_MISSING, CHANGED, DENIED, MISSING, OTHER, THROTTLED, UNREACHABLE, Backend, Failure, Listed, ObjectUrl,
)

PAGE = 1000


def _mtime_ns(value) -> int:
    return calendar.timegm(value.utctimetuple()) * 10**9 + value.microsecond * 1000


class AzureBackend(Backend):
    def __init__(self, url: ObjectUrl, options: dict):
        import adlfs

        super().__init__(url, options)
        if url.account and "account_name" not in options and "connection_string" not in options:
            options["account_name"] = url.account
        self.fs = adlfs.AzureBlobFileSystem(skip_instance_cache=True, use_listings_cache=False, **options)

    def _container(self):
        return self.fs.service_client.get_container_client(self.url.bucket)

    async def check(self) -> None:
        async with self._container() as container:
            await container.get_container_properties(retry_total=0)

    async def list_level(self, prefix: str):
        from azure.storage.blob.aio import BlobPrefix

        async with self._container() as container:
            pages = container.walk_blobs(
                name_starts_with=prefix or None, delimiter="/", results_per_page=PAGE, retry_total=0
            ).by_page()
            async for page in pages:
                out = []
                async for item in page:
                    if isinstance(item, BlobPrefix):
                        out.append(Listed(item.name, True))
                    else:
                        out.append(Listed(item.name, False, item.size, "e:" + (item.etag or ""),
                                          _mtime_ns(item.last_modified)))
                yield out

    async def read(self, key: str, token: str, start: int, end: int) -> bytes:
        from azure.core import MatchConditions

        if end <= start:
            return b""
        kind, _, etag = token.partition(":")
        conditions = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if kind == "e" and etag else {}
        async with self.fs.service_client.get_blob_client(self.url.bucket, key) as blob:
            download = await blob.download_blob(
                offset=start, length=end - start, max_concurrency=1, retry_total=0, **conditions
            )
            return await download.readall()

    # ---------------------------------------------------------------- writing (packerfs.source.upload)

    parts_in_flight = 2
    parts_any_order = True  # the block list gives the order: the first block may be staged last

    async def upload_start(self, key: str, size: int, content_type: str) -> dict:
        # Nothing is sent: blocks are staged under ids unique to this upload (all of one length, as
        # Azure requires), so that blocks an interrupted run left behind are never committed.
        return {"nonce": secrets.token_hex(8), "content_type": content_type}

    def prepare_part(self, handle: dict, data: bytes) -> None:
        return None  # the SDK computes the Content-MD5 (validate_content)

    async def upload_part(self, key: str, handle: dict, number: int, offset: int, data: bytes,
                          total: int | None, prepared: None) -> str:
        block_id = base64.b64encode(f"{handle['nonce']}-{number:06d}".encode()).decode()
        async with self.fs.service_client.get_blob_client(self.url.bucket, key) as blob:
            await blob.stage_block(block_id, data, length=len(data), validate_content=True, retry_total=0)
        return block_id

    async def upload_complete(self, key: str, handle: dict, block_ids: list[str]) -> None:
        from azure.storage.blob import BlobBlock, ContentSettings

        async with self.fs.service_client.get_blob_client(self.url.bucket, key) as blob:
            await blob.commit_block_list(
                [BlobBlock(block_id=block_id) for block_id in block_ids],
                content_settings=ContentSettings(content_type=handle["content_type"]), retry_total=0,
            )

    async def upload_abort(self, key: str, handle: dict) -> None:
        return None  # uncommitted blocks cannot be deleted alone; see the module docstring

    async def stale_uploads(self, prefix: str) -> list:
        return []

    async def head(self, key: str, length: int) -> tuple[int, bytes] | None:
        """(size, its first `length` bytes) of the blob, or None if there is none: one ranged GET."""
        async with self.fs.service_client.get_blob_client(self.url.bucket, key) as blob:
            try:
                download = await blob.download_blob(offset=0, length=length, max_concurrency=1, retry_total=0)
            except Exception as exc:
                failure = self.classify(exc)
                if failure.kind == MISSING:
                    return None
                if getattr(exc, "status_code", 0) == 416:  # an empty blob: not ours
                    return 0, b""
                raise
            data = await download.readall()
            # properties.size is the range's; the blob's is in "bytes 0-N/SIZE"
            total = str(download.properties.content_range or "").rpartition("/")[2]
            return (int(total) if total.isdigit() else download.properties.size), data

    def classify(self, exc: BaseException) -> Failure:
        from azure.core.exceptions import (
            ClientAuthenticationError, HttpResponseError, ResourceModifiedError, ResourceNotFoundError,
            ServiceRequestError, ServiceResponseError,
        )

        code = str(getattr(exc, "error_code", "") or "")
        status = getattr(exc, "status_code", 0) or 0
        text = f"{status} {code}".strip() if (status or code) else type(exc).__name__
        if isinstance(exc, ResourceModifiedError) or status == 412 or code == "ConditionNotMet":
            return Failure(CHANGED, text)
        if isinstance(exc, ResourceNotFoundError) or status == 404:
            return Failure(BUCKET_MISSING if code == "ContainerNotFound" else MISSING, text)
        if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
            return Failure(DENIED, text)
        if status in (429, 503) or code in ("ServerBusy", "OperationTimedOut"):
            return Failure(THROTTLED, text)
        if isinstance(exc, (ServiceRequestError, ServiceResponseError, OSError)) or status >= 500:
            return Failure(UNREACHABLE, f"{text}: {str(exc).splitlines()[0][:200]}" if str(exc) else text)
        if isinstance(exc, HttpResponseError):
            return Failure(OTHER, f"{text}: {str(exc).splitlines()[0][:200]}")
        return Failure(OTHER, f"{type(exc).__name__}: {exc}")
