"""Shinkansen: LoRA / iLECO / Difference / ADDifT training for Stable Diffusion.

This package imports and runs without the WebUI; ``trainer.webui`` is the only package
that touches ``modules.*``.
"""
__version__ = "0.1.0"
