"""The native HTTP transport of ``sigil proxy`` (rust/proxy.rs): hyper on a
tokio runtime of its own thread serves the OpenAI API and forwards to the
upstream; the proxy's policy (sigil.proxy.server) is called back with the GIL
held where a call is admitted, recorded or relayed. Only the telemetry layer
imports the native module (ARCHITECTURE.md, Layers); the proxy service reaches
it through here.
"""

from __future__ import annotations

from sigil import _native

__all__ = ["ENDPOINT_PATHS", "ProxyTransport"]

#: Serves ``host:port`` and forwards to the upstream, deciding each call through a policy.
ProxyTransport = _native.ProxyTransport
#: The metered endpoints below ``/v1``, in the order of the index the policy's
#: ``admit`` is given.
ENDPOINT_PATHS = ("/chat/completions", "/completions", "/responses", "/embeddings")
