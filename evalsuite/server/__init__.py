"""``evalsuite serve``: the engine behind an OpenAI-compatible HTTP API (app.py), with one
scheduler thread that owns the model and batches requests in flight (scheduler.py)."""
