"""The error types users see. Each message names the file, sample or key that was wrong."""


class SimError(Exception):
    """Base class of every error SIM raises on purpose."""


class ConfigError(SimError, ValueError):
    """A configuration that cannot work (named key, what was expected)."""


class DataError(SimError, ValueError):
    """A split or sample that is malformed (named file or sample, key, what was expected)."""


class LLMLoadError(SimError, RuntimeError):
    """The LLM (or vision encoder) could not be built or loaded."""


class CheckpointError(SimError, RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, foreign or of another architecture."""


class SweepFailed(SimError, RuntimeError):
    """A sweep stopped: its trials failed (too many of them, or all)."""
