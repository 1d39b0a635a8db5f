"""A Kubernetes API server's OIDC discovery on loopback, and tokens signed by its keys.

Shaped like the API server's answers (``/.well-known/openid-configuration`` naming a
``jwks_uri`` at ``/openid/v1/jwks``, keys with a ``kid``) and like the tokens Knative Eventing
requests for a subscriber (``knative/eventing`` ``pkg/auth/token_provider.go``: a
service-account TokenRequest whose only audience is the subscriber's).
"""

from __future__ import annotations

import json
import ssl
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.loopback import LoopbackServer
from tests.fakes.tls import self_signed

__all__ = ["AUDIENCE", "SUBJECT", "Issuer"]

AUDIENCE = "imagegen-render"
SUBJECT = "system:serviceaccount:imagegen:oidc-broker-ingress"


class Issuer(LoopbackServer):
    """The discovery document and the JWKS over real HTTP, once started; ``sign`` makes tokens."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.up = True
        # Documents served in place of the real ones ("discovery", "jwks"): any JSON at all.
        self.documents: dict[str, Any] = {}
        self.issuer = "https://kubernetes.default.svc.cluster.local"
        super().__init__(self._handler(), name="oidc-issuer")

    def serve_tls(self, directory: Path) -> Path:
        """Answers over HTTPS from now on (call before ``start``), as the API server does; the
        certificate returned is the CA to trust, as the pod's service-account ``ca.crt``. Issuers
        serving from one directory share its certificate, as one cluster's API servers do."""
        cert_path, key_path = directory / "ca.crt", directory / "tls.key"
        if not cert_path.exists():
            self_signed(cert_path, key_path)
        served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        served.load_cert_chain(cert_path, key_path)
        self.server.socket = served.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.port}"
        return cert_path

    def add_key(self, kid: str, key: Any | None = None) -> Any:
        key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.keys[kid] = key
        return key

    def sign(
        self,
        claims: dict[str, Any],
        *,
        kid: str = "k1",
        algorithm: str = "RS256",
        audience: str = AUDIENCE,
    ) -> str:
        now = int(time.time())
        body = {
            "iss": self.issuer,
            "aud": [audience],
            "sub": SUBJECT,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.keys[kid], algorithm=algorithm, headers={"kid": kid})

    def _jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self.keys.items():
            algorithm = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
            jwk = json.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": algorithm})
        return {"keys": keys}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.requests.append((self.path, self.headers.get("Authorization")))
                if not issuer.up:
                    self.send_error(503)
                    return
                if self.path == "/.well-known/openid-configuration":
                    body: Any = {
                        "issuer": issuer.issuer,
                        "jwks_uri": issuer.url + "/openid/v1/jwks",
                        "response_types_supported": ["id_token"],
                        "subject_types_supported": ["public"],
                        "id_token_signing_alg_values_supported": ["RS256"],
                    }
                elif self.path == "/openid/v1/jwks":
                    body = issuer._jwks()
                else:
                    self.send_error(404)
                    return
                document = "discovery" if self.path.startswith("/.well-known") else "jwks"
                if issuer.documents.get(document) is not None:
                    body = issuer.documents[document]
                payload = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
