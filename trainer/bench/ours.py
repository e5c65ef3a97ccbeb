"""Our side of a bench case, in its own process: the instrument installed, then ``run_job``
(what ``python -m trainer train`` runs), so the timed path is the one users get.

usage (by the bench only): ``python -m trainer.bench.ours SPEC.json``
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path


def main(spec_path: str) -> int:
    from . import instrument
    inst = instrument.from_env().install()
    spec = json.loads(Path(spec_path).read_text())

    import torch
    from ..engine import resolve_precision
    from ..events import EventBus, RunEvent, StepEvent
    from ..runner import run_job
    from ..settings import Settings
    from .case import Case, our_settings

    case = Case.from_dict(spec["case"])
    if spec.get("tokenizer"):       # random weights carry no tokenizer: the bench's one, for both tools
        import trainer.models.loader as loader
        real = loader.load_tokenizer
        loader.load_tokenizer = lambda config, override=None: real(config, spec["tokenizer"])
    work = Path(spec["work"])
    settings = Settings.from_dict(our_settings(case, spec["data"], spec.get("checkpoint"), "ours-bench"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inst.info["dtype"] = str(resolve_precision(case.precision, device)).replace("torch.", "")

    def sink(e):
        if isinstance(e, StepEvent) and (e.step == 1 or e.step == e.total):
            print(f"  ours step {e.step}/{e.total} loss {e.loss:.4f}", flush=True)
        elif isinstance(e, RunEvent) and e.kind == "failed":
            print(f"  ours failed: {e.message}", flush=True)

    run_job(settings, lora_dir=work / "out", events=EventBus([sink]), log_dir=work / "logs",
            json_dir=work / "json")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))    # a timeout still writes the result
    sys.exit(main(sys.argv[1]))
