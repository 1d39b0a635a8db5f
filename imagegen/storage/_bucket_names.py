"""Which bucket names each S3-compatible store takes, checked when a storage is opened.

A name the store would refuse (``InvalidBucketName`` on every request) is refused before anything
is written, in one line naming the setting, never showing the name.
"""

from __future__ import annotations

import re

from imagegen.errors import ConfigurationError

# S3 allows 3-63 characters; GCS allows underscores and up to 222 with dots. Accept the union
# under every preset, then each store's own rules: GCS's under gcs (_gcs_bucket_problem), S3's
# under every other preset (_s3_bucket_problem).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
# AWS S3 User Guide, "Bucket naming rules" (general purpose buckets): names reserved for
# access points, Object Lambda, Multi-Region Access Points, directory and table buckets, and
# IDNA. S3 answers a request on such a bucket InvalidBucketName.
_S3_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_S3_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_IP_ADDRESS_FORM = re.compile(r"\d+\.\d+\.\d+\.\d+")


def _check_bucket(bucket: str, *, field: str, preset: str) -> str:
    """``bucket`` when the store of ``preset`` takes it as a name.

    Raises:
        ConfigurationError: naming ``field``; the name itself only in the summary.
    """
    problem = None
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        problem = "not a valid bucket name"
    elif preset == "aws" and "_" in bucket:
        # A legacy name: buckets made in us-east-1 before March 2018 could hold underscores
        # (and be longer than 63 characters), and S3 still serves them, path-style (botocore's
        # "auto" addressing takes that for a name that is not a DNS name). No other rule
        # applies to them, and no bucket of another store has one.
        pass
    elif preset == "gcs":
        why = _gcs_bucket_problem(bucket)
        problem = f"not a valid Google Cloud Storage bucket name ({why})" if why else None
    else:
        why = _s3_bucket_problem(bucket)
        problem = f"not a valid S3 bucket name ({why})" if why else None
    if problem:
        raise ConfigurationError(
            f"invalid bucket name {bucket!r}", errors=[{"field": field, "message": problem}]
        )
    return bucket


def _s3_bucket_problem(bucket: str) -> str | None:
    """Which of S3's bucket naming rules ``bucket`` breaks, said without the name; None for
    none. It already has the shape of :data:`_BUCKET`, with no two dots in a row.

    AWS S3 User Guide, "Bucket naming rules", general purpose buckets: 3 to 63 characters;
    lowercase letters, digits, dots and hyphens; a letter or digit first and last; no two
    adjacent dots; not formatted as an IP address; none of the reserved prefixes and suffixes.
    A hyphen next to a dot is refused too: each part between dots is a DNS label, which
    begins and ends with a letter or digit (RFC 1123), as virtual-hosted-style addressing
    needs; S3 and MinIO answer InvalidBucketName.
    """
    if len(bucket) > 63:
        return "more than 63 characters"
    if "_" in bucket:
        return "an underscore"
    if ".-" in bucket or "-." in bucket:
        return "a hyphen next to a dot"
    if _IP_ADDRESS_FORM.fullmatch(bucket):
        return "formatted as an IP address"
    prefix = next((p for p in _S3_RESERVED_PREFIXES if bucket.startswith(p)), None)
    if prefix:
        return f"the prefix {prefix} is reserved"
    suffix = next((s for s in _S3_RESERVED_SUFFIXES if bucket.endswith(s)), None)
    if suffix:
        return f"the suffix {suffix} is reserved"
    return None


def _gcs_bucket_problem(bucket: str) -> str | None:
    """Which of Google Cloud Storage's bucket naming rules ``bucket`` breaks, said without the
    name; None for none. It already has the shape of :data:`_BUCKET`, with no two dots in a
    row (222 characters at most).

    https://cloud.google.com/storage/docs/buckets#naming ("Bucket names"): lowercase letters,
    digits, dashes, underscores and dots, a letter or digit first and last; 3 to 63
    characters, up to 222 where the name has dots, each dot-separated component 63 at most;
    not an IP address in dotted-decimal notation; not beginning with "goog"; not containing
    "google" or close misspellings, "such as g00gle" (the page's one example: read here as
    zeros for o's, as a name Google's own rules might take is not refused on a guess).
    """
    if "." not in bucket and len(bucket) > 63:
        return "more than 63 characters without a dot"
    if any(len(component) > 63 for component in bucket.split(".")):
        return "a dot-separated component of more than 63 characters"
    if _IP_ADDRESS_FORM.fullmatch(bucket):
        return "formatted as an IP address"
    if bucket.startswith("goog"):
        return "the prefix goog is reserved"
    if "google" in bucket.replace("0", "o"):
        return "it contains google or a close misspelling of it"
    return None
