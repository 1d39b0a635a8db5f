"""Ledger and S3 settings that were taken and failed later: refused as the settings are read,
naming the variable, never echoing the value; each rule held to the library's own."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from imagegen.settings import _LIBPQ_KEYWORDS, Settings
from tests.conftest import RunCli


def _refusal(**given: str) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(**given)
    [error] = caught.value.errors()
    assert error["loc"] == tuple(given)
    return str(error["msg"]).removeprefix("Value error, ")


# -- a libpq key=value string as the ledger URL --------------------------------------------------


@pytest.mark.parametrize(
    ("url", "keyword"),
    [
        ("host=127.0.0.1 port=5432 password=TopSecretPW1", "host"),
        ("dbname = imagegen user=app password=TopSecretPW1", "dbname"),  # libpq allows spaces
        ("password=TopSecretPW1 host=db", "password"),
        ("service=imagegen-ledger", "service"),
        ("sslmode=require host=db", "sslmode"),
        ("HOST=db password=TopSecretPW1", "host"),
    ],
)
def test_a_libpq_key_value_string_is_refused_without_its_value(url: str, keyword: str) -> None:
    """It was taken for a SQLite file's name: the command line read an empty history from it,
    and the ledger function would have recorded into a file in its working directory."""
    said = _refusal(ledger_url=url)
    assert said == (
        f"a libpq key=value connection string, beginning {keyword}=, which the ledger does not"
        " read: give a postgresql://user:password@host:port/dbname URL, or"
        f" ./{keyword}=… for a SQLite file so named"
    )
    assert "TopSecretPW1" not in said


@pytest.mark.parametrize(
    "path",
    ["./a=b.db", "a=b.db", "./host=x.db", "sqlite:///host=x.db", "data/host=x.db", "hostx=1.db"],
)
def test_a_sqlite_path_with_an_equals_sign_is_still_a_path(path: str) -> None:
    """Only a libpq key word and ``=`` at the start reads as a connection string."""
    settings = Settings(ledger_url=path)
    assert settings.ledger_url is not None and settings.ledger_url.get_secret_value() == path


def test_every_key_word_of_the_installed_libpq_is_known() -> None:
    """The list is libpq's (PQconninfoOptions): asked of the libpq psycopg loads."""
    pq = pytest.importorskip("psycopg").pq
    installed = {option.keyword.decode() for option in pq.Conninfo.get_defaults()}
    assert installed <= _LIBPQ_KEYWORDS, installed - _LIBPQ_KEYWORDS


# -- the S3 region and endpoint ------------------------------------------------------------------

# botocore's rule, validate_region_name (botocore/utils.py), is asked of each of these.
REGIONS = [
    "us-east-1",
    "eu-west-1",
    "auto",
    "US-EAST-1",
    "a" * 63,
    "r2",
    "",
    "eu west 1",
    "eu_west_1",
    "-eu",
    "eu-",
    "123",
    "a" * 64,
    "eu.west",
    "région",
    "us-east-1/../x",
]


@pytest.mark.parametrize("region", REGIONS, ids=repr)
def test_a_region_is_taken_exactly_where_botocore_takes_it(region: str) -> None:
    """It was taken, and every S3 call failed as botocore made its client: an internal error,
    exit 1 from ``imagegen doctor``."""
    from botocore.exceptions import InvalidRegionError
    from botocore.utils import validate_region_name

    try:
        validate_region_name(region)
        botocore_takes = True
    except InvalidRegionError:
        botocore_takes = False
    if botocore_takes:
        assert Settings(s3_region=region).s3_region == region
    else:
        said = _refusal(s3_region=region)
        assert said.startswith("not a region name botocore takes: up to 63 letters")


def test_a_region_with_whitespace_around_it_is_refused() -> None:
    """The ``$`` of botocore's pattern lets a newline after a name through (a value read from a
    file): it would be in every request's signature."""
    said = _refusal(s3_region="eu-west-1\n")
    assert said == "begins or ends with whitespace (a newline from a file, a stray space)"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/?x=1",
        "http://127.0.0.1:9000?x=1",
        "http://127.0.0.1:9000/?",  # an empty query: the URL is not the one given
        "https://s3.example.com/#part",
        "https://s3.example.com#",
        "https://s3.example.com/bucket-prefix?X-Amz-Token=s3cr3t",
    ],
)
def test_an_s3_endpoint_with_a_query_or_fragment_is_refused(url: str) -> None:
    """botocore's endpoint rules refuse an endpoint with a query (``parse_url``, "URLs with
    queries are not supported"): every S3 call was a retryable 503 for good."""
    said = _refusal(s3_endpoint_url=url)
    assert said == (
        "has a ? or #: botocore refuses an endpoint's query and drops its fragment; give"
        " scheme://host[:port][/path]"
    )
    assert "s3cr3t" not in said


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000", "https://s3.example.com/", "https://gw.example.com/s3"]
)
def test_an_s3_endpoint_botocore_resolves_is_taken(url: str) -> None:
    import boto3

    assert Settings(s3_endpoint_url=url).s3_endpoint_url == url
    client = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    signed = client.generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})
    assert signed.startswith(url.rstrip("/"))


def test_the_query_rule_is_the_s3_endpoints_alone() -> None:
    """A broker's ingress may have a query; only botocore refuses one."""
    url = "http://broker-ingress.knative-eventing.svc/imagegen/default?x=1"
    assert Settings(sink_url=url).sink_url == url


# -- what the command line says ------------------------------------------------------------------

S3 = {
    "IMAGEGEN_STORAGE_URL": "s3://bkt",
    "IMAGEGEN_S3_PRESET": "minio",
    "IMAGEGEN_S3_ENDPOINT_URL": "http://127.0.0.1:48100",
}


@pytest.mark.parametrize(
    ("env", "variable", "hidden"),
    [
        ({**S3, "IMAGEGEN_S3_REGION": "eu west 1"}, "IMAGEGEN_S3_REGION", "eu west 1"),
        (
            {**S3, "IMAGEGEN_S3_ENDPOINT_URL": "http://127.0.0.1:48100/?x=1"},
            "IMAGEGEN_S3_ENDPOINT_URL",
            "x=1",
        ),
    ],
    ids=["region", "endpoint"],
)
def test_doctor_names_an_s3_setting_botocore_refuses(
    cli: RunCli, env: dict[str, str], variable: str, hidden: str
) -> None:
    """``doctor`` printed ``internal error (InvalidRegionError: …)`` and exited 1, or an
    unreachable bucket for an endpoint no request could be sent to."""
    result = cli("doctor", env=env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"imagegen: error: invalid settings: {variable} ("), lines[0]
    assert hidden not in result.stderr + result.stdout
