"""Clients for kvserve (and any OpenAI-compatible server)."""
