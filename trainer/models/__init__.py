"""SD1 / SD2 / SDXL model stack: ldm-named modules, loaders, tokenizer, schedule, samplers.

Nothing here knows about training; the engine receives a :class:`ModelBundle`.
"""
