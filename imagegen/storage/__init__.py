"""Where images and their records are stored: a local directory or an S3-compatible bucket.

``storage_url`` picks the backend: a path or ``file://`` URL for :class:`LocalStorage`,
``s3://bucket[/prefix]`` for :class:`S3Storage`, configured by ``s3_preset`` and the other
``s3_*`` settings (see :mod:`imagegen.storage.presets`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from imagegen.errors import ConfigurationError
from imagegen.storage.base import (
    GenerationKeys,
    Storage,
    StoredObject,
    validate_key,
    validate_metadata,
)
from imagegen.storage.local import LocalStorage
from imagegen.storage.presets import PRESETS, S3Options, s3_options, s3_options_from_settings

if TYPE_CHECKING:
    from imagegen.settings import Settings
    from imagegen.storage.s3 import S3Storage

__all__ = [
    "PRESETS",
    "GenerationKeys",
    "LocalStorage",
    "S3Options",
    "S3Storage",
    "Storage",
    "StoredObject",
    "open_storage",
    "s3_options",
    "s3_options_from_settings",
    "validate_key",
    "validate_metadata",
]


def open_storage(settings: Settings) -> Storage:
    """The storage ``settings.storage_url`` names.

    Raises:
        ConfigurationError: naming ``storage_url`` (or the ``s3_*`` field at fault) when the
            configuration cannot work; a URL that names no storage is said by its variable
            (``IMAGEGEN_STORAGE_URL``), never shown.
    """
    url = settings.storage_url.strip()
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme == "":
        if not url:
            raise _invalid("empty")
        if re.match(r"(?i)(s3|gs|file|https?):", url):  # "s3:bucket": a URL short of its //
            raise _invalid("a URL needs its // (s3://bucket/prefix, file:///path)")
        return LocalStorage(Path(url))
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise _invalid("expected file:///absolute/path")
        return LocalStorage(Path(unquote(parts.path)))
    if scheme == "s3":
        from imagegen.storage.s3 import S3Storage

        return S3Storage.from_url(url, s3_options_from_settings(settings))
    gcs = f" (Google Cloud Storage: s3://bucket with {_variable('s3_preset')}=gcs)"
    hint = gcs if scheme == "gs" else ""
    raise _invalid(f"unsupported scheme {scheme!r}; use a path, file:// or s3://{hint}")


def __getattr__(name: str) -> object:
    # boto3 takes a while to import; processes on local storage never need it.
    if name == "S3Storage":
        from imagegen.storage.s3 import S3Storage

        return S3Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _variable(field: str) -> str:
    from imagegen.settings import Settings

    return Settings.variable(field)


def _invalid(message: str) -> ConfigurationError:
    # Named by its variable, never shown: a URL may carry a key (redacted or not, its
    # remainder can still be a bucket or a path nobody meant to publish in a log).
    return ConfigurationError(
        f"invalid {_variable('storage_url')}: {message}",
        errors=[{"field": "storage_url", "message": message}],
    )
