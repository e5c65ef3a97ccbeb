"""``python -m trainer bench``: LoRA training speed and memory as users get them, side by side with kohya.

Modules: ``case`` (a case and our settings for it), ``fixtures`` (random checkpoint, tokenizer,
images), ``instrument`` (the step-end hook both tools are timed by), ``peak`` (matmul peak on
the training device in its dtype), ``ours`` / ``kohya`` (each tool's child process),
``report`` (table and ratios), ``cli`` (arguments and the interleaved runs).
"""


def main(argv=None) -> int:
    from .cli import main as run
    return run(argv)
