"""The native HTTP transport of ``sigil proxy`` (rust/proxy.rs): hyper on a
tokio runtime of its own thread serves the OpenAI API and forwards to the
upstream; the proxy's policy (sigil.proxy.server) is called back with the GIL
held where a call is admitted, recorded or relayed. Only the telemetry layer
imports the native module (ARCHITECTURE.md, Layers); the proxy service reaches
it through here.
"""

from __future__ import annotations

from sigil import _native

__all__ = ["ENDPOINT_PATHS", "KEY_HEADERS", "ProxyTransport"]

#: Serves ``host:port`` and forwards to the upstream, deciding each call through a policy.
ProxyTransport = _native.ProxyTransport
#: The metered endpoints below ``/v1``, in the order of the index the policy's
#: ``admit`` is given: the transport's own table (rust/proxy.rs ``ENDPOINTS``).
ENDPOINT_PATHS: tuple[str, ...] = _native.PROXY_ENDPOINT_PATHS
#: The request headers that carry a key, lower case: the transport hands their
#: values to the policy's ``admit`` (rust/proxy.rs ``KEY_HEADERS``).
KEY_HEADERS: tuple[str, ...] = _native.PROXY_KEY_HEADERS
