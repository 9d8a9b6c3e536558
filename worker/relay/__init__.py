"""The Realtime side: batching, wire payloads, acked publishing, one stream's relay."""
