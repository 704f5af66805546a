"""Reward models: an LLM judge, sequence-classification models, served models, verifiers, functions.

Each lives in its own module and imports its heavy library only when used; they are found
through the ``tpo.rewards`` entry-point group (see ``tpo.registry``).
"""
