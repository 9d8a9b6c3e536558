"""llm-token-relay: stream LLM tokens to browsers through Supabase Realtime."""

__version__ = "0.1.0"
