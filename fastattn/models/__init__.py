"""Reference models on fastattn's kernels (backend="fastattn") or plain torch (backend="torch")."""
from .llama import KVCache, Llama, LlamaConfig, PagedKVCache, rope_tables, sample_next_token

__all__ = ["Llama", "LlamaConfig", "KVCache", "PagedKVCache", "rope_tables", "sample_next_token"]
