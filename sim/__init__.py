"""SIM: Spatial Intent Models on a frozen decoder-only LLM."""

__version__ = "0.1.0"
