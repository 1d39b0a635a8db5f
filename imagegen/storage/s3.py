"""Objects in an S3-compatible bucket (AWS S3, Google Cloud Storage, Cloudflare R2, MinIO).

boto3 is blocking, so every call runs on one of S3 storage's own threads (:data:`MAX_THREADS`,
not the event loop's default executor, which the rest of the process shares); one client is
created per storage and shared by those threads (boto3 clients are thread-safe, sessions are
not). Retries with backoff are botocore's own (standard mode, within its per-client retry
quota); what is still failing afterwards is translated:

* connection errors, timeouts, 5xx and throttling, a body cut short or damaged on the way, a
  session token to refresh: :class:`DependencyUnavailable`;
* a missing bucket, refused credentials, a clock minutes off or a region the endpoint will not
  sign for (told by the error code before the status: a clock is a 403 too), an archived
  object, a redirect (followed by botocore only to a bucket's region on AWS's own endpoints,
  :mod:`~imagegen.storage._s3_client`): :class:`DependencyUnavailable` with a message that
  says so, as a deployment can be fixed without changing the request;
* an upload refused for want of a ``Content-Length`` (411), or a request refused for the
  checksum headers boto3 adds under the ``aws`` preset at another endpoint:
  :class:`ConfigurationError` naming ``s3_preset``;
* a missing object: :class:`NotFound` from ``get``, None from ``head``;
* a failed upload precondition (412, another writer won): False from ``create``;
* a store that ignores the upload precondition (MinIO before RELEASE.2024-05-07T06-41-25Z,
  GCS under a preset other than ``gcs``), or refuses it as not implemented (501
  ``NotImplemented``): :class:`ConfigurationError`, from the first ``create`` (or
  :meth:`S3Storage.check`), before anything of a generation is written.

Messages name the bucket and the error code, never a credential; nor does any exception they
chain to (botocore's network errors, which quote the endpoint URL as configured, password and
query included, are left out of the chain and named by their type).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar
from urllib.parse import urlsplit

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    InvalidRegionError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from imagegen._redact import redact_url
from imagegen._threads import DaemonPool, PoolExhausted
from imagegen.errors import (
    ConfigurationError,
    DependencyUnavailable,
    ImageGenError,
    InternalError,
    InvalidRequest,
    NotFound,
)
from imagegen.storage._bucket_names import _check_bucket
from imagegen.storage._s3_client import CONNECTIONS, make_client
from imagegen.storage.base import ObjectStore, StoredObject, validate_key
from imagegen.storage.presets import _PRECONDITION_HEADERS, S3Options, _on_aws

__all__ = ["MAX_THREADS", "THREAD_WAIT", "S3Storage"]

T = TypeVar("T")

MAX_THREADS = CONNECTIONS
"""Threads S3 storage's calls may hold at once, across every :class:`S3Storage` of the process:
as many as a client keeps connections (:data:`~imagegen.storage._s3_client.CONNECTIONS`), so a
call on a thread never waits for a connection, nor opens one the client then throws away. Their
own threads, not the event loop's default executor (``min(32, CPUs + 4)`` threads, shared with
persist's check of a PNG, derive's encoding, the ledger's calls): a store that stalls holds
these, each for a read timeout per attempt, and leaves the rest of the process its threads.
Started only as needed."""
THREAD_WAIT = 30.0
"""Seconds a call past :data:`MAX_THREADS` waits for a thread while no thread takes any call,
before it fails with a retryable 503: the presets' read timeout, so every thread has been held
that long by a store that does not answer. Calls that end, however many wait, are each run in
turn."""

_THROTTLING = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
}
# R2 answers credentials it does not know 401 Unauthorized, where S3 answers 403
# (https://developers.cloudflare.com/r2/api/error-codes/): both are a refusal.
_DENIED = {
    "AccessDenied",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    # A session token the store wants refreshed (ErrorResponses.html, 400): credentials from
    # the environment are not refreshed by botocore, so each attempt meets it again, as it
    # meets ExpiredToken.
    "TokenRefreshRequired",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "Unauthorized",
}
_DENIED_STATUSES = {401, 403}
_MISSING = {"NoSuchKey", "NotFound", "404"}
# A key no object has, read by check(): a valid key (storage.keys) that no generation writes.
_PROBE_KEY = "imagegen-check/absent"
_PRECONDITION_FAILED = {"PreconditionFailed", "412"}
# Written only with the upload precondition, to see that the store honours it
# (S3Storage._check_conditional_writes); under the prefix of _PROBE_KEY, never a generation's.
_CONDITIONS_PROBE_KEY = "imagegen-check/create-if-absent"
_CONDITIONS_PROBE_BODY = (
    b"Written by imagegen, only if absent, to check that this store refuses an upload over an"
    b" existing object when asked to (docs/storage.md#first-writer-wins).\n"
)
# AWS answers 409 while another conditional write of the key is in flight: "retry the upload".
_CONFLICT_RETRIES = 5
# GCS's XML API answers user metadata as x-goog-meta-*, which boto3 leaves out of Metadata.
_GCS_META = "x-goog-meta-"
_DEFAULT_CONTENT_TYPE = "application/octet-stream"


class S3Storage(ObjectStore):
    """A :class:`~imagegen.storage.base.Storage` on an S3-compatible bucket.

    Args:
        bucket: The bucket name.
        prefix: Prepended to every key (``images`` stores ``k`` at ``images/k``).
        options: Endpoint, region, credentials, timeouts; see :mod:`imagegen.storage.presets`.
    """

    name = "s3"

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        self.options = options or S3Options()
        self.bucket = _check_bucket(bucket, field="bucket", preset=self.options.preset)
        self.prefix = _check_prefix(prefix, field="prefix")
        self._client = self._make_client()
        # Once shown, per storage; a store found to ignore it is asked again next time (it
        # may be upgraded meanwhile, and the error is retried). The check in flight, if any,
        # is shared by every caller meanwhile, from whichever event loop or thread: the lock
        # is a thread's, and the future a concurrent one, as an asyncio lock or task belongs
        # to one loop.
        self._conditions_honoured = False
        self._conditions_lock = threading.Lock()
        self._conditions_check: Future[bool] | None = None

    @classmethod
    def from_url(cls, url: str, options: S3Options | None = None) -> S3Storage:
        """A storage for ``s3://bucket[/prefix]``.

        Raises:
            ConfigurationError: naming ``storage_url`` when the URL is not of that form.
        """
        parts = urlsplit(url)
        if (
            parts.scheme != "s3"
            or parts.query
            or parts.fragment
            or "@" in parts.netloc
            or ":" in parts.netloc
        ):
            raise _bad_url("expected s3://bucket[/prefix]")
        try:
            preset = (options or S3Options()).preset
            bucket = _check_bucket(parts.netloc, field="storage_url", preset=preset)
            prefix = _check_prefix(parts.path, field="storage_url")
        except ConfigurationError as exc:  # said of the setting, not of the part shown
            raise _bad_url(exc.errors[0]["message"]) from None
        return cls(bucket, prefix, options)

    def _make_client(self) -> Any:
        """The client of :attr:`options`.

        Raises:
            ConfigurationError: naming the region or the endpoint botocore refused: the
                setting (``s3_region``, ``s3_endpoint_url``) where it is set, else where
                botocore read it (``aws_region``, ``aws_endpoint_url``); or the rest of the
                AWS configuration botocore read (``aws_config``: a profile it cannot find, a
                mode it does not know); never the value, nor botocore's own error, which
                quotes the endpoint as given.
        """
        try:
            return make_client(self.options)
        except InvalidRegionError:
            if self.options.region:
                raise _refused_setting("s3_region", "not a region botocore accepts") from None
            raise _refused_by_botocore("aws_region", _BOTOCORE_REGION, "s3_region") from None
        except ValueError:  # "Invalid endpoint: <the URL, password included>"
            if self.options.endpoint_url:
                raise _refused_setting("s3_endpoint_url", "not a URL botocore accepts") from None
            raise _refused_by_botocore(
                "aws_endpoint_url", _BOTOCORE_ENDPOINT, "s3_endpoint_url"
            ) from None
        except BotoCoreError as exc:
            # The rest of what botocore reads for itself (AWS_PROFILE naming no profile, a
            # checksum, defaults or retry mode it does not know, a config file it cannot
            # parse): the settings' own values are checked before.
            why = f"the AWS configuration botocore read ({_BOTOCORE_CONFIG}) is not one it accepts"
            raise ConfigurationError(
                f"{why} ({type(exc).__name__}): correct it, or unset what names it",
                errors=[{"field": "aws_config", "message": f"{why} ({type(exc).__name__})"}],
            ) from None

    def __repr__(self) -> str:
        preset = self.options.preset
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}, preset={preset!r})"

    async def _store(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str]
    ) -> str:
        """One PutObject: S3 writes are atomic per object."""
        try:
            await self._call("PutObject", self._upload(key, data, content_type, metadata))
        except _Missing:
            raise self._no_bucket() from None
        return self.location(key)

    async def _store_new(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str]
    ) -> bool:
        """One conditional PUT (``If-None-Match: *``, or GCS's generation precondition, see
        :mod:`~imagegen.storage.presets`): the store decides atomically, and a 412 means an
        earlier writer won. The first one of a storage is preceded by the check that the store
        honours the precondition (:meth:`_check_conditional_writes`).
        """
        await self._check_conditional_writes()
        return await self._create(key, data, content_type, metadata)

    async def _create(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str]
    ) -> bool:
        """The conditional PUT of :meth:`_store_new`; True when it wrote, False on a 412."""
        upload = self._upload(key, data, content_type, metadata, IfNoneMatch="*")
        for attempt in range(_CONFLICT_RETRIES):
            try:
                await self._call("PutObject", upload, conditional=True)
                return True
            except _Missing:
                raise self._no_bucket() from None
            except _Exists:
                return False
            except _Conflict:
                await asyncio.sleep(0.05 * 2**attempt)
        raise DependencyUnavailable(
            f"S3 bucket {self.bucket!r}: concurrent writes of {key!r} kept conflicting",
            retry_after=1,
        )

    async def get(self, key: str) -> bytes:
        """Read the object at ``key``.

        Raises:
            NotFound: when there is no object at ``key``.
        """
        object_key = self._object_key(key)

        def read() -> bytes:
            response = self._client.get_object(Bucket=self.bucket, Key=object_key)
            # Read through the StreamingBody itself, not ``with`` it: its __enter__ gives the
            # raw urllib3 stream (botocore/response.py), whose reads skip botocore's checks:
            # a reset mid-body is no BotoCoreError (ResponseStreamingError), a body shorter
            # than its Content-Length is not refused (IncompleteReadError), and the response
            # checksum is not validated (StreamingChecksumBody.read, FlexibleChecksumError).
            body = response["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        try:
            return await self._call("GetObject", read)
        except _Missing:
            raise NotFound(f"no object at {key!r}") from None

    async def head(self, key: str) -> StoredObject | None:
        """The object at ``key`` without its body, or None when absent.

        S3 answers a HEAD on a missing bucket with a bare 404 too, so that also gives None;
        :meth:`check` and :meth:`put` tell the two apart.
        """
        object_key = self._object_key(key)
        try:
            response = await self._call(
                "HeadObject", lambda: self._client.head_object(Bucket=self.bucket, Key=object_key)
            )
        except _Missing:
            return None
        return StoredObject(
            key=key,
            location=self.location(key),
            size=int(response.get("ContentLength", 0)),
            content_type=str(response.get("ContentType") or _DEFAULT_CONTENT_TYPE),
            metadata=_user_metadata(response),
        )

    def location(self, key: str) -> str:
        """The ``s3://bucket/prefix/key`` URI of ``key``."""
        return f"s3://{self.bucket}/{self._object_key(key)}"

    async def check(self) -> None:
        """Raise DependencyUnavailable unless the bucket exists and the credentials may use it,
        ConfigurationError unless the store honours conditional writes
        (:meth:`_check_conditional_writes`, which costs one or two uploads, once).

        HeadBucket needs ``s3:ListBucket`` (docs.aws.amazon.com/AmazonS3/latest/API/
        API_HeadBucket.html), as imagegen does: it reads keys that may not exist yet, and S3
        answers a missing key 403, not 404, to credentials without it (API_GetObject.html). A
        HeadBucket 403 has no body to say whether the credentials or the permission were
        refused; a GET of a key that is never written does, and the error says which. Where
        that GET answers 404, the bucket is usable as imagegen uses it whatever HeadBucket
        said: credentials with object permissions only read missing keys as missing (GCS's
        HEAD of a bucket wants storage.buckets.get, which its object roles lack:
        cloud.google.com/storage/docs/access-control/iam-xml).
        """
        try:
            await self._call("HeadBucket", lambda: self._client.head_bucket(Bucket=self.bucket))
        except _Missing:
            raise self._no_bucket() from None
        except _Denied as denied:
            refusal = await self._refusal(denied)
            if refusal is not None:
                raise refusal from None
        except _Unreachable as exc:
            raise self._unanswered(exc) from None
        # What the first create would ask, asked here: `imagegen doctor` says it before a
        # generation does. Function start-up does not call check() on object storage.
        await self._check_conditional_writes()

    def _unanswered(self, exc: _Unreachable) -> DependencyUnavailable:
        """``exc``, naming the endpoint where the network failed it (who checks the settings
        reads which endpoint was asked, never its credentials): one that did not answer
        within the read timeout, or could not be connected to."""
        failure = exc.failure
        if not issubclass(failure, BotoConnectionError | HTTPClientError):
            return exc  # an endpoint botocore cannot use: said as any call says it
        where = redact_url(str(self._client.meta.endpoint_url))
        if issubclass(failure, ReadTimeoutError):
            said = f"does not answer within {self.options.read_timeout:g}s"
        else:  # refused, reset, a name that does not resolve, a connect timeout
            said = f"cannot be reached ({failure.__name__})"
        return DependencyUnavailable(
            f"S3 endpoint {where} {said}: bucket {self.bucket!r} was not checked",
            retry_after=exc.retry_after,
        )

    async def _check_conditional_writes(self) -> None:
        """Raise ConfigurationError unless the store refuses an upload over an existing object
        when the upload says so; asked once per storage, by one caller at a time.

        A store may take the precondition and ignore it: MinIO before RELEASE.2024-05-07T06-41-
        25Z (minio/minio#19682) compares ``*`` with the ETag and overwrites; GCS's XML API
        applies ``If-None-Match`` to reads only (cloud.google.com/storage/docs/request-
        preconditions), which is why the ``gcs`` preset sends ``x-goog-if-generation-match: 0``,
        and an endpoint the presets do not know as GCS's gets another preset. Every create would
        then say True to every writer: two images, two replies. Nothing in one answer tells, so
        the probe key is created with the precondition until a create is refused (412): once,
        where an earlier probe left it, else twice. A store that ignores the precondition never
        answers 412. The key stays: it is one small object, written once ever, and deleting it
        would need s3:DeleteObject, which imagegen's credentials need not have
        (docs/storage.md#permissions).

        Creates that come while the check is in flight (a burst of events at start-up) wait for
        it and share its outcome, failure included, rather than each writing the probe key:
        R2 and GCS take about one write a second of one key and answer more with 429
        (developers.cloudflare.com/r2/platform/limits, cloud.google.com/storage/quotas). Only
        success is remembered; the caller after a failure checks again. A check whose caller
        is cancelled is taken over by one of those waiting.

        Raises:
            ConfigurationError: naming ``s3_preset``, when both creates were answered as done,
                or a create was refused as asking what the store does not implement.
            DependencyUnavailable: the store could not be asked (as for any create).
        """
        while True:
            with self._conditions_lock:
                if self._conditions_honoured:
                    return
                shared = self._conditions_check
                if shared is None:
                    mine: Future[bool] = Future()
                    self._conditions_check = mine
            if shared is not None:
                # Shielded: a waiter cancelled (its request timed out) leaves the check alone.
                if await asyncio.shield(asyncio.wrap_future(shared)):
                    return
                continue  # its caller was cancelled before it could tell: check here
            try:
                await self._probe_conditional_writes()
            except Exception as exc:
                self._conditions_checked(honoured=False)
                mine.set_exception(exc)
                raise
            except BaseException:  # cancelled: one of those waiting checks instead
                self._conditions_checked(honoured=False)
                mine.set_result(False)
                raise
            self._conditions_checked(honoured=True)
            mine.set_result(True)
            return

    def _conditions_checked(self, *, honoured: bool) -> None:
        """End the check in flight, before its waiters hear of it: one that checks again
        starts a check of its own."""
        with self._conditions_lock:
            self._conditions_honoured = honoured
            self._conditions_check = None

    async def _probe_conditional_writes(self) -> None:
        """The check of :meth:`_check_conditional_writes`: the probe key created until refused."""
        for _ in range(2):
            created = await self._create(
                _CONDITIONS_PROBE_KEY, _CONDITIONS_PROBE_BODY, "text/plain", {}
            )
            if not created:
                return
        raise self._conditions_ignored()

    def _conditions_ignored(self) -> ConfigurationError:
        """The store took the precondition and wrote over the probe key all the same."""
        header = _PRECONDITION_HEADERS[self.options.create_if_absent]
        return ConfigurationError(
            f"S3 bucket {self.bucket!r}{self._at()} does not honour conditional writes: an"
            f" upload with {header} replaced an existing object, so two writers of a key would"
            f" both win. {self._preset_advice()} (docs/storage.md#first-writer-wins)",
            errors=[{"field": "s3_preset", "message": f"the store ignores {header} on uploads"}],
        )

    def _conditions_unsupported(self, code: str) -> ConfigurationError:
        """A conditional upload refused as asking what the store does not implement (501
        NotImplemented, "a header you provided implies functionality that is not implemented":
        docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html). AWS S3 answered so before
        August 2024, as some S3 gateways still do; asking again would never help."""
        header = _PRECONDITION_HEADERS[self.options.create_if_absent]
        return ConfigurationError(
            f"S3 bucket {self.bucket!r}{self._at()} does not support conditional writes: an"
            f" upload with {header} was refused ({code}), so the first writer of a key cannot"
            f" win. {self._preset_advice()} (docs/storage.md#first-writer-wins)",
            errors=[{"field": "s3_preset", "message": f"the store does not implement {header}"}],
        )

    def _preset_advice(self) -> str:
        """What to change when the store does not do what the preset's precondition asks."""
        from imagegen.settings import Settings

        variable = Settings.variable("s3_preset")
        if self.options.preset == "gcs":
            # Google Cloud Storage honours it (cloud.google.com/storage/docs/request-
            # preconditions): what answered is something else, under the wrong preset.
            return (
                f"{variable}=gcs is set, but the endpoint does not behave as Google Cloud"
                f" Storage: set {variable} to the preset of the store actually run (aws, r2 or"
                " minio; MinIO RELEASE.2024-05-07T06-41-25Z or later)"
            )
        return (
            "Run MinIO RELEASE.2024-05-07T06-41-25Z or later (or another store that supports"
            f" them: AWS S3, Cloudflare R2); for Google Cloud Storage, set {variable}=gcs"
        )

    def _at(self) -> str:
        """`` at <endpoint>``, its password hidden, where one is set; else nothing."""
        return f" at {redact_url(self.options.endpoint_url)}" if self.options.endpoint_url else ""

    async def _refusal(self, denied: _Denied) -> ImageGenError | None:
        """What a refused HeadBucket (``denied``) refused: the listing, the credentials, or
        nothing imagegen needs (None: a missing key reads as missing); or, where the GET says
        so, no refusal but settings to fix (a clock minutes off is a 403 as well).
        """
        probe = self._object_key(_PROBE_KEY)
        try:
            await self._call("GetObject", lambda: self._read_byte(probe))
        except _Missing:
            return None
        except _Denied as refused:
            if refused.s3_code == "AccessDenied":
                return DependencyUnavailable(
                    f"S3 bucket {self.bucket!r} may not be listed with these credentials"
                    " (AccessDenied): imagegen needs s3:ListBucket on it, besides s3:GetObject"
                    " and s3:PutObject on its keys (docs/storage.md#permissions)"
                )
            return DependencyUnavailable(
                f"S3 refused the credentials for bucket {self.bucket!r} ({refused.s3_code}):"
                " check IMAGEGEN_S3_ACCESS_KEY_ID and IMAGEGEN_S3_SECRET_ACCESS_KEY"
            )
        except ImageGenError as unusable:
            # The GET's answer has a body to say what HeadBucket's 403 could not: settings to
            # fix, a clock minutes off among them (RequestTimeTooSkewed, a 403 as well).
            cause = unusable.__cause__
            if isinstance(cause, ClientError) and _code_of(cause) in _MISCONFIGURED:
                return unusable
        except _Outcome:
            pass
        return denied

    def _read_byte(self, object_key: str) -> None:
        """GET the first byte of ``object_key`` (the probe of :meth:`check`)."""
        response = self._client.get_object(Bucket=self.bucket, Key=object_key, Range="bytes=0-0")
        response["Body"].close()

    def _upload(
        self,
        key: str,
        data: bytes,
        content_type: str,
        metadata: dict[str, str],
        **conditions: str,
    ) -> Callable[[], object]:
        """The PutObject call of ``data`` at ``key``, to run in a worker thread."""
        object_key = self._object_key(key)
        # Content-MD5 lets every provider check the body, GCS included, where the newer
        # x-amz-checksum-* headers are refused (see presets).
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()

        def call() -> object:
            return self._client.put_object(
                Bucket=self.bucket,
                Key=object_key,
                Body=data,
                ContentType=content_type,
                ContentMD5=md5,
                Metadata=metadata,
                **conditions,
            )

        return call

    def _object_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _call(self, operation: str, call: Callable[[], T], *, conditional: bool = False) -> T:
        """``call`` on one of S3 storage's threads, its failure translated (see the module).

        A ClientError stays the cause of what is raised (it quotes the store's answer, not the
        endpoint); botocore's other errors do not (:class:`_Unreachable`).
        """
        try:
            return await _threads().run(call)
        except PoolExhausted as exc:
            raise DependencyUnavailable(
                f"S3 {operation} on bucket {self.bucket!r} not started: {exc} (a store that does"
                " not answer)"
            ) from None
        except ClientError as exc:
            error = self._client_error(operation, exc, conditional=conditional)
            if isinstance(error, _Exists | _Conflict) and not conditional:
                # A 412 or a conditional write's 409 to a request that set no condition: the
                # store's own doing (a proxy, a lock in flight), the event is fine.
                code = "precondition failed" if isinstance(error, _Exists) else "conflict"
                error = DependencyUnavailable(
                    f"S3 {operation} on bucket {self.bucket!r} answered {code}", retry_after=1
                )
            raise error from exc
        except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError) as exc:
            raise DependencyUnavailable(
                f"no usable credentials for S3 bucket {self.bucket!r}: set"
                " IMAGEGEN_S3_ACCESS_KEY_ID and IMAGEGEN_S3_SECRET_ACCESS_KEY,"
                " or the standard AWS credentials"
            ) from exc
        except ParamValidationError as exc:
            message = f"S3 {operation} on bucket {self.bucket!r}: invalid parameters"
            raise InternalError(message) from exc
        except BotoCoreError as exc:
            # Connection refused or reset, DNS, connect/read timeouts: retried by botocore already.
            raise _Unreachable(
                f"S3 bucket {self.bucket!r} unreachable during {operation} ({type(exc).__name__})",
                failure=type(exc),
            ) from None

    def _client_error(
        self, operation: str, exc: ClientError, *, conditional: bool = False
    ) -> ImageGenError | _Outcome:
        """What ``exc`` means, to a request that set the upload precondition or not."""
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if code == "NoSuchBucket":
            return self._no_bucket()
        if code in _PRECONDITION_FAILED or status == 412:
            return _Exists()
        if code == "ConditionalRequestConflict":
            return _Conflict()
        if code in _MISSING or status == 404:
            return _Missing()
        # Before the 501 of a store without conditional writes and the 400 of a malformed
        # request, either of which the refusal of boto3's own checksum headers may look like.
        if self._adds_checksums_elsewhere() and _names_checksum_header(exc):
            return self._checksum_refused(operation, code or str(status))
        if conditional and _not_implemented(exc):
            return self._conditions_unsupported(code or str(status))
        # Said by the code before the status: S3 answers a clock minutes off and an archived
        # object 403 too (RequestTimeTooSkewed, InvalidObjectState), neither of which is a
        # refusal of the credentials.
        if code in _MISCONFIGURED:
            return self._misconfigured(operation, code)
        if 300 <= status < 400:
            return self._redirected(operation, status, exc)
        if code == "InvalidObjectState":
            return DependencyUnavailable(
                f"S3 {operation} on bucket {self.bucket!r} refused (InvalidObjectState): the"
                " object is archived (the GLACIER or DEEP_ARCHIVE storage class, or an archive"
                " tier of INTELLIGENT_TIERING); restore it, and keep imagegen's keys out of"
                " lifecycle rules that archive them (docs/storage.md#errors-the-store-answers)"
            )
        if code == "MissingContentLength" or status == 411:
            return self._length_required(operation, code or str(status))
        if code in _CHECKSUM_REFUSED and self._adds_checksums_elsewhere():
            return self._checksum_refused(operation, code)
        if code in _DENIED or status in _DENIED_STATUSES:
            check = "the credentials and the bucket's permissions"
            if operation in ("HeadObject", "GetObject") and code in ("403", "AccessDenied"):
                # API_GetObject.html: without s3:ListBucket, a key that does not exist is a 403.
                check += " (s3:ListBucket included: without it a missing key is a 403 too)"
            return _Denied(
                f"access to S3 bucket {self.bucket!r} denied ({code or status}) during {operation}:"
                f" check {check}",
                s3_code=code,
            )
        if code in _THROTTLING or status == 429:
            return DependencyUnavailable(
                f"S3 bucket {self.bucket!r} is throttling requests ({code or status})"
            )
        if status >= 500 or code in _TRANSIENT:
            return DependencyUnavailable(
                f"S3 bucket {self.bucket!r} unavailable during {operation} ({code or status})"
            )
        if operation in ("HeadObject", "HeadBucket") and code in ("", str(status)):
            # A HEAD's answer has no body, so no reason (botocore names the status as the
            # code): a 409 is an operation in flight on the key, a 400 most likely a region
            # the endpoint will not sign for (MinIO's and R2's AuthorizationHeaderMalformed,
            # which a HEAD cannot carry). Neither is the event's doing.
            return DependencyUnavailable(
                f"S3 {operation} on bucket {self.bucket!r} refused ({status}; a HEAD says no"
                " more): retry, and check the region, the endpoint and the clock"
                " (docs/storage.md)"
            )
        # What is left is a request S3 finds malformed (InvalidArgument, KeyTooLong,
        # MetadataTooLarge...): this code's fault, answered as a bug.
        return InternalError(f"S3 {operation} on bucket {self.bucket!r} failed ({code or status})")

    def _misconfigured(self, operation: str, code: str) -> ImageGenError:
        """An answer of :data:`_MISCONFIGURED`: the deployment's doing, not the event's,
        retryable once the settings are fixed."""
        if code == "InvalidBucketName":  # a store with rules beyond its preset's
            why = "the store refuses the bucket's name (InvalidBucketName)"
            return ConfigurationError(
                f"S3 {operation} on bucket {self.bucket!r} refused: {why}; fix storage_url",
                errors=[{"field": "storage_url", "message": why}],
            )
        return DependencyUnavailable(
            f"S3 {operation} on bucket {self.bucket!r} refused ({code}): check the region, the"
            " endpoint and the clock (docs/storage.md#errors-the-store-answers)"
        )

    def _redirected(self, operation: str, status: int, exc: ClientError) -> DependencyUnavailable:
        """A redirect with no S3 error code: a proxy in front of the store (an ingress sending
        ``http://`` on to ``https://``) or an endpoint that is not the store's. Not followed
        (see :mod:`imagegen.storage._s3_client`): a request is signed for its host, and the
        settings are to name the store's own address."""
        from imagegen.settings import Settings

        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        location = str(headers.get("location") or "")[:_LOCATION_SHOWN]
        to = f" to {redact_url(location)}" if location else ""
        endpoint = redact_url(str(self._client.meta.endpoint_url))
        return DependencyUnavailable(
            f"S3 {operation} on bucket {self.bucket!r}: the endpoint {endpoint} answered a"
            f" redirect ({status}){to}, which is not followed: set"
            f" {Settings.variable('s3_endpoint_url')} to the store's own address, and check the"
            " region (docs/storage.md#errors-the-store-answers)"
        )

    def _length_required(self, operation: str, code: str) -> ConfigurationError:
        """An upload refused for want of a ``Content-Length`` (411 MissingContentLength)."""
        from imagegen.settings import Settings

        variable = Settings.variable("s3_preset")
        if self.options.preset == "aws":
            # Over HTTPS its uploads are aws-chunked bodies without one (see presets), which
            # MinIO before RELEASE.2023-05-18T00-05-36Z refuses (minio/minio#16484).
            advice = (
                f"uploads under {variable}=aws may have none, which MinIO before"
                f" RELEASE.2023-05-18T00-05-36Z refuses: for MinIO, set {variable}=minio"
            )
        else:
            advice = (
                f"uploads under {variable}={self.options.preset} carry one, so something on the"
                f" way (a proxy) took it off: check the endpoint, and that {variable} is the"
                " preset of the store actually run"
            )
        return ConfigurationError(
            f"S3 {operation} on bucket {self.bucket!r}{self._at()} refused an upload without a"
            f" Content-Length ({code}): {advice} (docs/storage.md#errors-the-store-answers)",
            errors=[{"field": "s3_preset", "message": "the store wants a Content-Length"}],
        )

    def _adds_checksums_elsewhere(self) -> bool:
        """Whether uploads carry boto3's own checksums (botocore's default, kept where the
        settings leave ``checksums`` unset) to an endpoint that is not AWS's."""
        return self.options.checksums != "when_required" and not _on_aws(self.options.endpoint_url)

    def _checksum_refused(self, operation: str, code: str) -> ConfigurationError:
        """A request under the ``aws`` preset whose checksum, or checksum header, the store
        refused.

        boto3 (botocore 1.36 and later) adds a CRC32 checksum to every upload under its
        defaults, and asks for the checksum of every read (``x-amz-checksum-mode``), which
        stores other than AWS may not take: Scality answers ``BadDigest``
        (scality/cloudserver#5784), Hetzner and others ``XAmzContentSHA256Mismatch``
        (boto/boto3#4400, #4497), Backblaze B2 ``400 InvalidArgument`` "Unsupported header
        'x-amz-sdk-checksum-algorithm' received for this API call"
        (matrix-org/synapse-s3-storage-provider#128, vatesfr/xen-orchestra#8358), Cloudflare
        R2 in early 2025 ``501 NotImplemented`` "Header 'x-amz-checksum-crc32' with value …
        not implemented" (cloudflare/cloudflare-docs#19236, duolicious/duolicious#612). Each
        request meets it again: the preset is at fault, and the presets with checksums
        ``when_required`` send only the ``Content-MD5`` every store takes.
        """
        from imagegen.settings import Settings

        variable = Settings.variable("s3_preset")
        what = "the upload's checksum" if operation == "PutObject" else "a checksum header"
        return ConfigurationError(
            f"S3 {operation} on bucket {self.bucket!r}{self._at()} refused {what}"
            f" ({code}): a store other than AWS may refuse the CRC32 checksums boto3 adds under"
            f" {variable}=aws; for such a store set {variable}=minio, whose uploads carry only a"
            " Content-MD5 (docs/storage.md#errors-the-store-answers)",
            errors=[{"field": "s3_preset", "message": "the store refuses boto3's checksums"}],
        )

    def _no_bucket(self) -> DependencyUnavailable:
        where = f" at {redact_url(self.options.endpoint_url)}" if self.options.endpoint_url else ""
        return DependencyUnavailable(
            f"S3 bucket {self.bucket!r} does not exist{where}: create it or fix storage_url"
        )


# Transient answers under a 4xx status (AWS's "List of error codes",
# docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html): a conflicting operation in
# flight on the key (OperationAborted, 409, "try again"), a request the store timed out
# (RequestTimeout, 400); a body cut short or damaged on the way, checked against what this
# code sent (IncompleteBody, BadDigest, XAmzContentSHA256Mismatch, each 400; the last two,
# under the ``aws`` preset, more likely a store refusing boto3's own checksums:
# _CHECKSUM_REFUSED).
_TRANSIENT = frozenset(
    {
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "IncompleteBody",
        "BadDigest",
        "XAmzContentSHA256Mismatch",
    }
)
# Of a redirect's Location, at most this much is said: it is the answering server's to choose.
_LOCATION_SHOWN = 200
# A checksum the store found wrong. Under checksums ``when_required`` (every preset but
# ``aws``) only the Content-MD5 this code computes is sent: a body changed on the way,
# transient; so too from AWS itself. Under ``aws`` at another endpoint it is more likely
# boto3's own CRC32, which a store other than AWS refuses on every upload
# (S3Storage._checksum_refused).
_CHECKSUM_REFUSED = frozenset({"BadDigest", "XAmzContentSHA256Mismatch"})
# A region the endpoint will not sign for (MinIO, R2 and GCS answer it; botocore's region
# redirect is AWS's alone), a bucket elsewhere, a clock minutes off (ErrorResponses.html:
# RequestTimeTooSkewed, 403), a bucket name the store refuses (InvalidBucketName, 400):
# settings to fix. Told by the code before the status, whose 403 would say "credentials".
_MISCONFIGURED = frozenset(
    {
        "AuthorizationHeaderMalformed",
        "InvalidBucketName",
        "PermanentRedirect",
        "TemporaryRedirect",
        "IllegalLocationConstraintException",
        "RequestTimeTooSkewed",
    }
)


# boto3's flexible checksums as a store names them when it refuses one (Backblaze B2, R2 in
# early 2025; S3Storage._checksum_refused): its headers (x-amz-checksum-<algorithm>,
# x-amz-checksum-mode), and the aws-chunked upload with a trailer. Lower case.
_CHECKSUM_WORDS = (
    "x-amz-checksum",
    "x-amz-sdk-checksum-algorithm",
    "x-amz-trailer",
    "streaming-unsigned-payload-trailer",
)
# The statuses of such a refusal: a header refused (400), a request the store could not
# authenticate as sent (401: R2 has answered aws-chunked uploads so, amd/gaia#3029), a header
# not implemented (501).
_CHECKSUM_REFUSAL_STATUSES = frozenset({400, 401, 501})


class _Unreachable(DependencyUnavailable):
    """A call botocore failed with an error of its own (``failure``: connection refused or
    reset, a timeout, an endpoint it cannot use). That error is not chained: its message
    quotes the endpoint URL as configured, its password and query included."""

    def __init__(self, message: str, *, failure: type[BotoCoreError]) -> None:
        super().__init__(message)
        self.failure = failure


class _Denied(DependencyUnavailable):
    """A 403: ``s3_code`` says what was refused, where the answer has a body to say it."""

    def __init__(self, message: str, *, s3_code: str) -> None:
        super().__init__(message)
        self.s3_code = s3_code


class _Outcome(Exception):
    """An answer that each operation turns into its own result."""


class _Missing(_Outcome):
    """A 404 for an object."""


class _Exists(_Outcome):
    """A 412 on a conditional upload: the object is there already."""


class _Conflict(_Outcome):
    """A 409 on a conditional upload: another one of the key is in flight."""


def _code_of(exc: ClientError) -> str:
    """The S3 error code of ``exc``, else its HTTP status."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _not_implemented(exc: ClientError) -> bool:
    """Whether ``exc`` is S3's NotImplemented, or a bare 501 (a gateway's own answer)."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _code_of(exc) == "NotImplemented" or status == 501


def _names_checksum_header(exc: ClientError) -> bool:
    """Whether ``exc`` refuses a request for one of boto3's checksum headers, by name."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = str(exc.response.get("Error", {}).get("Message", "")).lower()
    return status in _CHECKSUM_REFUSAL_STATUSES and any(w in message for w in _CHECKSUM_WORDS)


_POOL = DaemonPool("imagegen-s3", max_threads=MAX_THREADS, queue_for=THREAD_WAIT)


def _threads() -> DaemonPool:
    """The threads S3 storage's blocking calls run on, :data:`MAX_THREADS` at most, calls past
    them waiting their turn (:data:`THREAD_WAIT`). Daemon threads (:mod:`imagegen._threads`):
    a call still waiting on a store holds up no exit."""
    return _POOL


def _user_metadata(response: dict[str, Any]) -> dict[str, str]:
    """The user metadata of a HEAD answer, ``x-amz-meta-*`` winning over ``x-goog-meta-*``."""
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    metadata: dict[str, str] = {}
    for header, value in headers.items():
        name = str(header).lower()
        if name.startswith(_GCS_META) and name != _GCS_META:
            metadata[name.removeprefix(_GCS_META)] = str(value)
    metadata.update({str(k).lower(): str(v) for k, v in response.get("Metadata", {}).items()})
    return metadata


def _check_prefix(prefix: str, *, field: str) -> str:
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    try:
        return validate_key(prefix)
    except InvalidRequest:
        raise ConfigurationError(
            f"invalid key prefix {prefix!r}",
            errors=[{"field": field, "message": "the prefix must be a safe relative path"}],
        ) from None


def _refused_setting(field: str, message: str) -> ConfigurationError:
    from imagegen.settings import Settings

    return ConfigurationError(
        f"invalid {Settings.variable(field)}: {message}",
        errors=[{"field": field, "message": message}],
    )


# Where botocore reads the region and the endpoint that imagegen's settings leave to it
# (botocore/configprovider.py: BOTOCORE_DEFAULT_SESSION_VARIABLES["region"] and
# EnvironmentProvider/EndpointConfigProvider's lookup order; the config file is AWS_CONFIG_FILE,
# else ~/.aws/config, its profile AWS_PROFILE's).
_BOTOCORE_REGION = "the region botocore read (AWS_DEFAULT_REGION or the AWS config file)"
_BOTOCORE_ENDPOINT = (
    "the endpoint botocore read (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, or the AWS config file)"
)
_BOTOCORE_CONFIG = "AWS_PROFILE, other AWS_* variables or the AWS config file"


def _refused_by_botocore(field: str, source: str, setting: str) -> ConfigurationError:
    """botocore refused a value it read itself, ``setting`` being unset: where it came from,
    and the setting that would take its place."""
    from imagegen.settings import Settings

    message = f"{source} is not one it accepts"
    return ConfigurationError(
        f"{message}: correct it, or set {Settings.variable(setting)}",
        errors=[{"field": field, "message": message}],
    )


def _bad_url(message: str) -> ConfigurationError:
    from imagegen.settings import Settings

    return ConfigurationError(
        f"invalid {Settings.variable('storage_url')}: {message}",
        errors=[{"field": "storage_url", "message": message}],
    )
