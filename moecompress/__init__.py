"""moecompress: compress Mixture-of-Experts language models and measure what was lost."""

__version__ = "0.1.0"
