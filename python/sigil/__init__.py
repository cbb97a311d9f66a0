"""sigil: local-first monitoring and token accounting for LLM agent pipelines.

The package root imports nothing heavy so that ``sigil --help`` stays fast; the
public names live in their modules (``sigil.telemetry.execution_logger``, ...).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
