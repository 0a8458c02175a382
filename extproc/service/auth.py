"""Who may read the registry: a bearer token, required once a listener leaves loopback.

The ext_proc stream and the health service stay open (Envoy and probes call
them); the read APIs -- gRPC `WorkloadRegistry` and HTTP `/v1/...` -- show every
tenant's traffic, so off loopback they need `Authorization: Bearer <token>`.
Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac


class BearerToken:
    def __init__(self, token: str | None) -> None:
        self._expected = f"Bearer {token}".encode() if token else None

    @property
    def required(self) -> bool:
        return self._expected is not None

    def allows(self, authorization: str | None) -> bool:
        if self._expected is None:
            return True
        return hmac.compare_digest((authorization or "").encode(), self._expected)
