"""Captioning: write ``NAME.txt`` beside each image before training (SPEC §16).

``run`` walks a folder and writes captions; ``wd14`` (ONNX taggers through onnxruntime) and ``hf``
(BLIP and Florence-2 through transformers) are the models; ``tags`` holds the caption text rules
every model shares; ``weights`` finds the model files; ``cli`` is ``python -m trainer caption``. The
WebUI's own interrogators (CLIP, DeepBooru) live in ``trainer/webui/interrogate.py``, the only place
that may import ``modules.*``, and reach the run through the host.
"""
