"""Servers the tests start on loopback: a scriptable fake OpenAI server and llama-cpp-python's own server."""
