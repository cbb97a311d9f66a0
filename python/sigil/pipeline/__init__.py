"""The pipeline's components: the step protocol, the built-in offline steps, providers.

* :mod:`sigil.pipeline.base` -- the :class:`~sigil.pipeline.base.Step` protocol,
  :class:`~sigil.pipeline.base.StepContext`, :class:`~sigil.pipeline.base.StepOutput`
  and :func:`~sigil.pipeline.base.load_step` (steps by import path from config);
* :mod:`sigil.pipeline.offline` -- the default pipeline: deterministic, no network;
* :mod:`sigil.pipeline.memory_store` -- its SQLite full-text memory;
* :mod:`sigil.pipeline.contracts` -- JSON contracts for the analysis and their checker;
* :mod:`sigil.pipeline.tokenizer` -- offline ``cl100k_base`` token counting;
* :mod:`sigil.pipeline.providers` -- the OpenAI-compatible chat-completions provider.

Nothing is imported here, so that importing one module does not load the others.
"""
