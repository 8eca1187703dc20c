"""Performance-critical ops, each behind one interface with run-time backends.

Importing this package never fails on a machine without CUDA, Triton or
tinycudann: each kernel records which backends it can use and why not.
"""
from __future__ import annotations
