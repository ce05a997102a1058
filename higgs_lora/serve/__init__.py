"""Serving: the REST + WebSocket app over the inference core, and the queue that batches its requests."""
