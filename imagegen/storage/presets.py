"""Named settings for S3-compatible stores: ``aws``, ``gcs``, ``r2`` and ``minio``.

A preset fills in what a provider needs; any ``s3_*`` setting given explicitly wins over it.
Precedence, highest first: ``s3_endpoint_url`` / ``s3_region`` / ``s3_addressing_style``, the
preset named by ``s3_preset``, then botocore's own defaults (and the ``AWS_*`` variables).

Why the checksum settings: botocore 1.36 and later add CRC32 checksums to uploads by default
(``x-amz-sdk-checksum-algorithm``, ``x-amz-checksum-crc32`` or an ``aws-chunked`` trailer).
Google Cloud Storage's XML API rejects those headers, so ``gcs`` computes checksums only where
an operation requires one (``when_required``); R2 and MinIO are given the same to be safe. Over
HTTPS the default is an ``aws-chunked`` body with no ``Content-Length``, which MinIO releases
before RELEASE.2023-05-18T00-05-36Z answer 411 MissingContentLength (minio/minio#16484 taught
``PutObjectHandler`` that upload). Every upload still carries ``Content-MD5``.

Why ``create_if_absent``: a first-writer-wins upload is ``If-None-Match: *`` on AWS S3, R2 and
MinIO, but GCS's XML API applies ``If-None-Match`` to reads only; its upload precondition is
``x-goog-if-generation-match: 0`` ("no live object"), answered 412 like S3's. See
https://cloud.google.com/storage/docs/request-preconditions. So an endpoint on a Google APIs
host (any ``*.googleapis.com``: ``storage.googleapis.com``, a regional
``storage.<region>.rep.googleapis.com``, a Private Service Connect endpoint
``storage-<endpoint>.p.googleapis.com``) is refused under another preset, whose precondition GCS
would ignore (two writers of a key would both win), and one on R2's under any preset but ``r2``,
``gcs``'s precondition included. A host these rules do not know (a proxy, a private DNS name)
is caught by the storage itself, which checks that the store refuses a second conditional
upload before its first create (:meth:`imagegen.storage.s3.S3Storage.check`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import SecretStr

from imagegen.errors import ConfigurationError

if TYPE_CHECKING:
    from imagegen.settings import Settings

__all__ = [
    "PRESETS",
    "AddressingStyle",
    "ChecksumMode",
    "S3Options",
    "s3_options",
    "s3_options_from_settings",
]

AddressingStyle = Literal["auto", "virtual", "path"]
ChecksumMode = Literal["when_supported", "when_required"]
CreateIfAbsent = Literal["if-none-match", "gcs-generation-match"]
PresetName = Literal["aws", "gcs", "r2", "minio"]


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible store.

    Attributes:
        preset: The preset these options came from (for messages).
        endpoint_url: None: AWS, chosen by botocore from the region.
        region: None: botocore's choice (``AWS_DEFAULT_REGION``, not ``AWS_REGION``, which
            botocore does not read for it; then the config file's ``region``; else us-east-1).
        addressing_style: ``path`` (``host/bucket/key``) or ``virtual`` (``bucket.host/key``).
        checksums: Request and response checksum policy; None: botocore's default.
        access_key_id: With ``secret_access_key``; None: the standard AWS credential chain.
        secret_access_key: The HMAC secret; never logged, never in ``repr``.
        connect_timeout: Seconds to open a connection.
        read_timeout: Seconds to wait for a response (or the next bytes of one).
        max_attempts: Tries per call, the first included (botocore's standard retry mode),
            while the client's retry quota lasts: botocore gives each client 500, takes 14 for
            each retry of a timeout, a connection error or a 5xx (5 for throttling), and gives
            one back for each 2xx answered at the first try (a retry's cost for one answered
            after it). Once spent (about 17 calls that fail every try), a failing call is tried
            once, so an outage is not met with three times its requests
            (botocore/retries/standard.py, ``RetryQuotaChecker``; quota.py).
        create_if_absent: The upload precondition that makes the first writer of a key win.
    """

    preset: PresetName = "aws"
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: AddressingStyle = "auto"
    checksums: ChecksumMode | None = None
    access_key_id: SecretStr | None = field(default=None, repr=False)
    secret_access_key: SecretStr | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 3
    create_if_absent: CreateIfAbsent = "if-none-match"


PRESETS: dict[str, S3Options] = {
    "aws": S3Options(preset="aws"),
    # XML API interoperability: SigV4 with HMAC keys, region "auto". Path style works for every
    # bucket name, dotted ones included, under the one certificate of storage.googleapis.com.
    "gcs": S3Options(
        preset="gcs",
        endpoint_url="https://storage.googleapis.com",
        region="auto",
        addressing_style="path",
        checksums="when_required",
        create_if_absent="gcs-generation-match",
    ),
    "r2": S3Options(preset="r2", region="auto", addressing_style="path", checksums="when_required"),
    "minio": S3Options(
        preset="minio", region="us-east-1", addressing_style="path", checksums="when_required"
    ),
}
"""The named presets; :func:`s3_options` applies explicit settings over them."""

# The endpoint of these is specific to an account or a deployment: the user must name it.
_ENDPOINT_EXAMPLES = {
    "r2": "https://<account-id>.r2.cloudflarestorage.com",
    "minio": "http://minio.<namespace>.svc:9000",
}
# Hosts that are one provider's, a subdomain included (bucket.storage.googleapis.com,
# <account-id>.eu.r2.cloudflarestorage.com), with the preset each needs. Every googleapis.com
# host is Google's, and of its APIs only Cloud Storage's XML API speaks S3: Private Service
# Connect endpoints are named storage-<endpoint>.p.googleapis.com
# (https://cloud.google.com/vpc/docs/about-accessing-google-apis-endpoints), regional ones
# storage.<region>.rep.googleapis.com (https://cloud.google.com/storage/docs/regional-endpoints).
_PROVIDER_HOSTS = {
    "googleapis.com": ("gcs", "Google Cloud Storage"),
    "r2.cloudflarestorage.com": ("r2", "Cloudflare R2"),
}
# AWS's own endpoints (regional, FIPS, dual-stack, VPC interface endpoints, China's regions,
# the European Sovereign Cloud, the ISO partitions): the DNS suffixes of every partition
# botocore knows, its dual-stack ones too (botocore/data/partitions.json, "dnsSuffix" and
# "dualStackDnsSuffix").
_AWS_HOSTS = (
    *(".amazonaws.com", ".amazonaws.com.cn", ".amazonaws.eu"),
    *(".c2s.ic.gov", ".sc2s.sgov.gov", ".cloud.adc-e.uk", ".csp.hci.ic.gov"),
    *(".api.aws", ".api.amazonwebservices.com.cn", ".api.amazonwebservices.eu"),
    *(".api.aws.ic.gov", ".api.aws.scloud", ".api.cloud-aws.adc-e.uk", ".api.aws.hci.ic.gov"),
)
# What each upload precondition is on the wire. GCS applies If-None-Match to reads only
# (request-preconditions, above); GCS's header is none of those R2 lists as implemented
# (https://developers.cloudflare.com/r2/api/s3/api/).
_PRECONDITION_HEADERS: dict[CreateIfAbsent, str] = {
    "if-none-match": "If-None-Match: *",
    "gcs-generation-match": "x-goog-if-generation-match: 0",
}


def s3_options(
    preset: str | None = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    addressing_style: AddressingStyle | None = None,
    access_key_id: SecretStr | None = None,
    secret_access_key: SecretStr | None = None,
) -> S3Options:
    """The options of ``preset`` (default ``aws``) with every explicit argument applied over it.

    Raises:
        ConfigurationError: for an unknown preset (field ``s3_preset``), a preset that needs an
            endpoint and got none (``s3_endpoint_url``), an endpoint of GCS or R2 under
            another provider's preset (``s3_preset``), or half a key pair.
    """
    from imagegen.settings import Settings

    name, variable = preset or "aws", Settings.variable
    if name not in PRESETS:
        raise ConfigurationError(
            f"unknown S3 preset {name!r} in {variable('s3_preset')}",
            errors=[{"field": "s3_preset", "message": f"one of {', '.join(PRESETS)}"}],
        )
    if name in _ENDPOINT_EXAMPLES and not endpoint_url:
        raise ConfigurationError(
            f"the {name} preset needs {variable('s3_endpoint_url')},"
            f" e.g. {_ENDPOINT_EXAMPLES[name]}",
            errors=[{"field": "s3_endpoint_url", "message": f"required by the {name} preset"}],
        )
    _check_provider(name, endpoint_url)
    if (access_key_id is None) != (secret_access_key is None):
        missing = "s3_secret_access_key" if secret_access_key is None else "s3_access_key_id"
        raise ConfigurationError(
            f"{variable('s3_access_key_id')} and {variable('s3_secret_access_key')} are set"
            " together or not at all",
            errors=[{"field": missing, "message": "missing while its pair is set"}],
        )
    base = PRESETS[name]
    return replace(
        base,
        endpoint_url=endpoint_url or base.endpoint_url,
        region=region or base.region,
        addressing_style=addressing_style or base.addressing_style,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
    )


def _on_aws(endpoint_url: str | None) -> bool:
    """Whether ``endpoint_url`` is AWS's own: none (botocore's choice from the region), or one
    on an AWS host, however spelt (``https://S3.eu-west-1.AmazonAWS.com.:443``)."""
    if not endpoint_url:
        return True
    try:
        host = (urlsplit(endpoint_url).hostname or "").lower().rstrip(".")
    except ValueError:
        return False  # botocore says what is wrong with it
    return host.endswith(_AWS_HOSTS)


def _check_provider(preset: str, endpoint_url: str | None) -> None:
    """Refuse an endpoint on GCS's or R2's host under a preset that is not its provider's."""
    try:
        host = (urlsplit(endpoint_url or "").hostname or "").rstrip(".")
    except ValueError:
        return  # botocore says what is wrong with it
    for domain, (wanted, provider) in _PROVIDER_HOSTS.items():
        if preset == wanted or not (host == domain or host.endswith(f".{domain}")):
            continue
        from imagegen.settings import Settings

        endpoint, chosen = Settings.variable("s3_endpoint_url"), Settings.variable("s3_preset")
        message = f"{endpoint} {host} is {provider}: set {chosen}={wanted}"
        condition = PRESETS[preset].create_if_absent
        if condition != PRESETS[wanted].create_if_absent:
            message += (
                f" ({provider} ignores the {preset} preset's {_PRECONDITION_HEADERS[condition]}"
                " on uploads: two writers of a key would both win)"
            )
        raise ConfigurationError(
            message,
            errors=[{"field": "s3_preset", "message": f"{wanted} for an endpoint on {domain}"}],
        )


def s3_options_from_settings(settings: Settings) -> S3Options:
    """:func:`s3_options` from the ``s3_*`` settings."""
    return s3_options(
        settings.s3_preset,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        addressing_style=settings.s3_addressing_style,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
    )
