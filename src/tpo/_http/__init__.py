"""Private HTTP helpers for the served plugins only: the retry policy, per-event-loop clients, loopback checks."""
