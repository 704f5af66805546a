"""Private: Ray actors that each hold an in-process backend or reward model, for the ``ray:`` plugins."""
