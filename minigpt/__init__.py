"""MiniGPT: a from-scratch, educational GPT framework."""

__version__ = "0.1.0"
