"""The standalone stack (torch 2.13, transformers 5.x, gradio 3.41.2 + fastapi 0.94.0, lycoris-lora 4.1.3)
installs and imports together in one interpreter."""
import subprocess
import sys
from importlib import metadata


def test_pinned_versions_installed():
    assert metadata.version("torch").startswith("2.13.0")
    assert int(metadata.version("transformers").split(".")[0]) >= 5
    assert metadata.version("gradio") == "3.41.2"
    assert metadata.version("fastapi") == "0.94.0"
    assert metadata.version("lycoris-lora") == "4.1.3"


def test_everything_imports_in_one_process():
    code = ("import torch, transformers, gradio, fastapi, lycoris, safetensors, matplotlib, PIL, yaml, ftfy\n"
            "from transformers import CLIPTextModel, CLIPTextModelWithProjection\n"
            "import trainer.models.loader, trainer.generate\n"
            "print('ok', torch.__version__, transformers.__version__, gradio.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok 2.13.0")
