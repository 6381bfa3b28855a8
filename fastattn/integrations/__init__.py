"""Integrations with other libraries. Each is imported on demand, e.g.
``import fastattn.integrations.transformers as fa_hf`` (needs transformers)."""
