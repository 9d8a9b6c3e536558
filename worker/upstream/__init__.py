"""The provider side: SSE decoding, chunk extraction, streaming client, retries."""
