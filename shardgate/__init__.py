"""shardgate: a multi-process router for LLM inference fleets."""

__version__ = "0.1.0"
