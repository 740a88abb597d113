"""The model under evaluation, as runners and judges see it: one interface (``base.Backend``),
implemented by the in-process engine (``engine``) and by any OpenAI-compatible endpoint."""
