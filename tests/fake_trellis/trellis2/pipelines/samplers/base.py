class Sampler:
    """Base class of the samplers (as in the real package)."""
