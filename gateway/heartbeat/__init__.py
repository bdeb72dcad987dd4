"""Everything about `POST /v1/environments/{env}/work/{work}/heartbeat`, in the order a beat meets it.

- `query`: the beat's query string, validated, and the configured TTL applied;
- `wire`: the answer's format both ways, and the names of lease states,
  outcomes, lost reasons and lease events;
- `core`: the sans-IO coalescing state machine (time in, actions out);
- `retry`: when a beat that surely never landed may be sent again;
- `driver`: the async edge that carries out the core's actions
  (`CoalescingHeartbeats`), or forwards one for one (`DirectHeartbeats`).

The proxy (`gateway.edge.proxy`) only parses the query and hands a
`driver.HeartbeatCall` to a `driver.HeartbeatService`.
"""
