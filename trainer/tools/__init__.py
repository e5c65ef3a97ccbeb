"""LoRA file tools: read, inspect and (as they land) resize, merge and extract LoRA files."""
