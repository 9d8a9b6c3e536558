"""Local stand-ins for the cloud: Realtime server, simulated upstream, embedded Postgres.

Never imported by `worker/`: the worker talks to these over the network exactly as
it would to Supabase and to Groq / OpenAI.
"""
