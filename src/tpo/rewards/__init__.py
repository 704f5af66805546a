"""Reward models: an LLM judge, Transformers and vLLM reward models, served ones, verifiers, functions, Ray replicas.

Each lives in its own module and imports its heavy library only when used; they are found
through the ``tpo.rewards`` entry-point group (see ``tpo.registry``). ``combine`` adds a
weighted sum of rewards and a cache.
"""
