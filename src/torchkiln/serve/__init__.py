"""Serving: the dynamic batcher, the model adapter, the FastAPI app and the load tester."""
