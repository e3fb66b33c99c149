"""CAG: Hierarchical Concept-to-Appearance Guidance for multi-subject image generation."""

__version__ = "0.1.0"
