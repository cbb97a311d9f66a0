"""``sigil proxy``: an OpenAI-compatible metering proxy (issue 14).

Every model call that passes through it becomes events in a session's log,
and the session's token budget caps and finally refuses the calls. The CLI
(``sigil proxy``, ``sigil run``) wires a session to :class:`ProxyServer`.
"""

from sigil.proxy.metering import BudgetExhausted, Meter, PromptTooLarge
from sigil.proxy.server import ProxyConfig, ProxyServer

__all__ = ["BudgetExhausted", "Meter", "PromptTooLarge", "ProxyConfig", "ProxyServer"]
