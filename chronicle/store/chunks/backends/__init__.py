"""Chunk backends: where pack bytes live (a local directory today).

Threads: a backend may be called from any thread.
"""
