"""Policy backends: llama.cpp, vLLM and Transformers in-process, OpenAI-compatible servers, Ray replicas (``ray:``).

Each lives in its own module and imports its heavy library only when used; they are found
through the ``tpo.backends`` entry-point group (see ``tpo.registry``).
"""
