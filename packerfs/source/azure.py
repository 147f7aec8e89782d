"""Azure Blob Storage (adlfs / azure-storage-blob), for packerfs.source.objects.

Configuration is adlfs's: AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with
AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or a service principal (AZURE_STORAGE_CLIENT_ID,
…_CLIENT_SECRET, …_TENANT_ID); -o options go to adlfs.AzureBlobFileSystem. The account may also
come from the URL: abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX.

Pinning: every read carries If-Match with the listed ETag (which changes on every write), so an
overwritten blob gives 412 and the read fails rather than mixing versions.
"""

from __future__ import annotations

import calendar

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
