"""Private helpers for the in-process plugins only (vLLM, torch and Transformers)."""
