"""Private HTTP helpers for the served plugins only: retries, per-event-loop clients, loopback checks, replica pools."""
