"""Collectives and process groups: communicators (shared memory, gloo, NCCL) behind one
base class and a factory, the TP/PP/EP parallel state, and the expert-parallel DP group.
The lowest layer of the engine stack: it imports nothing from engine, executor or models."""
