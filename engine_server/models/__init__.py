"""Models that ship with the engine (importing this package does not import torch)."""
