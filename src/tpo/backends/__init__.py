"""Policy backends: llama.cpp in-process, OpenAI-compatible servers, vLLM in-process, Transformers.

Each lives in its own module and imports its heavy library only when used; they are found
through the ``tpo.backends`` entry-point group (see ``tpo.registry``).
"""
