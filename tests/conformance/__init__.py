"""Conformance suite of the local Realtime server: one file per item of the §9 checklist
of shared/reference/supabase-realtime-protocol.md.

- Routes (both paths), CORS, no Origin check, tenant from Host:
  test_routes.py, test_gateway_mount.py
- Upgrade auth (statuses, bodies, 2 s delay), vsn negotiation: test_upgrade_auth.py
- V1 / V2 serializers, kind 3 in, kind 4 out, V1 binary skips:
  test_serializers.py, test_v2_like_realtime_js.py
- Per-socket ordering; a join blocks the socket (5 s delay): test_ordering.py
- Heartbeat echo, idle close 1000, 1009 over 5,000,000 bytes:
  test_heartbeat_idle_frame_size.py
- Join semantics and reasons, duplicate join, leave, unmatched topic, stale join_ref:
  test_join_semantics.py
- Broadcast rules (verbatim, self, ack, payload size, namespaces): test_broadcast_rules.py
- Private channels authorized by RLS in a real Postgres: test_private_channels.py
- Tokens (access_token, expiry timer): test_tokens.py
- Tenant rate counters and their reactions: test_rate_counters.py
- REST broadcast API: test_rest.py
- realtime.send stand-in and replay: test_realtime_send.py;
  "Server requested disconnect" + 1012: test_hooks.py
- Test hooks (time scale, forced closes, stalls, ack faults): test_hooks.py

The official realtime-py client is exercised in test_realtime_py.py, test_rest.py
(http_send), test_hooks.py (reconnect, give-up) and test_private_channels.py.
"""
