"""The Tether relay service: REST + WebSocket API, durable store, in-process fan-out."""
