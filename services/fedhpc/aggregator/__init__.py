"""The aggregator service: streams client updates and applies the server-side FL algorithms."""
