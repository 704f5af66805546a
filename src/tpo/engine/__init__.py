"""The method: TPO, revision and best-of-N as one engine over many prompts, with its candidate store and prompts.

``algorithm`` is the paper's loop, ``store`` the scored answers with their lineage, ``prompts`` the
templates as data; ``_dispatch``, ``_budget`` and ``_scheduler`` are its private machinery. The
public names are re-exported by ``tpo`` itself.
"""
