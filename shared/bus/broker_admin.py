"""Applying the identities of ``shared.bus.identities`` to a running broker through its management API.

Plain HTTP(S) with ``urllib`` (no AMQP, no pika): ``PUT`` of each user, its
vhost permissions and its topic permissions on the exchange ``preimg``. Every
call is idempotent, so ``preimg broker setup`` can run on every deploy; a
password changed in the environment is set anew (that is how one rotates it).
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from shared.bus.identities import IDENTITIES
from shared.bus.topology import EXCHANGE


class BrokerAdminError(RuntimeError):
    """The management API refused or could not be reached; the message says which call and why."""


class ManagementApi:
    def __init__(self, url: str, ca_file: str | None = None, timeout_s: float = 15.0):
        """``url``: ``http(s)://user:password@host:15672`` of a user tagged administrator."""
        parts = urllib.parse.urlsplit(url)
        if not parts.username:
            raise BrokerAdminError("the management URL must carry the operator's user and password")
        self._base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{parts.path.rstrip('/')}"
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        self._auth = "Basic " + base64.b64encode(token.encode()).decode()
        self._context = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None
        self._timeout = timeout_s

    def call(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            self._base + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": self._auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=self._context) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise BrokerAdminError(f"{method} {path}: HTTP {e.code} {e.read()[:300].decode(errors='replace')}") from e
        except (urllib.error.URLError, OSError) as e:
            raise BrokerAdminError(f"cannot reach the management API at {self._base}: {e}") from e
        return json.loads(raw) if raw else None


def apply_identities(api: ManagementApi, passwords: Mapping[str, str], vhost: str = "/") -> list[str]:
    """Create or update every identity, its permissions and topic permissions; return what was done."""
    v = urllib.parse.quote(vhost, safe="")
    api.call("PUT", f"/api/vhosts/{v}", {})
    done = []
    for ident in IDENTITIES:
        user = urllib.parse.quote(ident.user, safe="")
        api.call("PUT", f"/api/users/{user}", {"password": passwords[ident.user], "tags": ",".join(ident.tags)})
        api.call("PUT", f"/api/permissions/{v}/{user}",
                 {"configure": ident.configure, "write": ident.write, "read": ident.read})
        api.call("PUT", f"/api/topic-permissions/{v}/{user}",
                 {"exchange": EXCHANGE, "write": ident.topic_write, "read": ident.topic_read})
        done.append(ident.user)
    return done
