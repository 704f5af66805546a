"""The batch layer: datasets in, durable results out, resumable after any interruption."""
