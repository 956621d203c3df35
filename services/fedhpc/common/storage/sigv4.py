"""AWS Signature V4 query presigning with extra signed headers.

minio's presigner signs only the Host header. To make the object store itself
verify an upload, a presigned PUT must also sign ``x-amz-checksum-sha256``:
the URL is then valid only for a body with exactly that sha256, which the
store checks before it stores anything (S3, MinIO and SeaweedFS do).
Algorithm: https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"


def _uri_encode(value: str, *, keep_slash: bool) -> str:
    return quote(value, safe="/~" if keep_slash else "~")


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def presign_url(
    *,
    method: str,
    host: str,
    secure: bool,
    bucket: str,
    key: str,
    region: str,
    access_key: str,
    secret_key: str,
    expires_seconds: int,
    signed_headers: Mapping[str, str],
    now: datetime | None = None,
) -> str:
    """A path-style presigned URL whose signature also covers signed_headers.

    ``host`` is "host" or "host:port" exactly as the client will send it. The
    client must send every header in signed_headers with the same value.
    """
    now = now or datetime.now(UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    scope = f"{day}/{region}/s3/aws4_request"
    headers = {"host": host, **{name.lower(): value.strip() for name, value in signed_headers.items()}}
    signed_names = ";".join(sorted(headers))
    query = {
        "X-Amz-Algorithm": ALGORITHM,
        "X-Amz-Credential": f"{access_key}/{scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires_seconds),
        "X-Amz-SignedHeaders": signed_names,
    }
    canonical_query = "&".join(
        f"{_uri_encode(k, keep_slash=False)}={_uri_encode(v, keep_slash=False)}"
        for k, v in sorted(query.items())
    )
    path = "/" + _uri_encode(bucket, keep_slash=False) + "/" + _uri_encode(key, keep_slash=True)
    canonical_headers = "".join(f"{name}:{headers[name]}\n" for name in sorted(headers))
    canonical_request = "\n".join(
        [method, path, canonical_query, canonical_headers, signed_names, "UNSIGNED-PAYLOAD"]
    )
    string_to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    signing_key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret_key}".encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(signing_key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    scheme = "https" if secure else "http"
    return f"{scheme}://{host}{path}?{canonical_query}&X-Amz-Signature={signature}"
