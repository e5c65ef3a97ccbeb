"""The AUTOMATIC1111 adapter: the only package that imports ``modules.*``.

``adapter`` holds the host and the registration callbacks ``scripts/shinkansen.py`` hands to the WebUI;
``model`` wraps the loaded checkpoint's tensors in our modules; ``state`` snapshots and restores what a
job touches. This ``__init__`` imports none of them, so ``model``/``state`` load without the WebUI.
"""
