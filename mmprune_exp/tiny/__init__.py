"""The embedded tiny Qwen2.5-VL-architecture model: tokenizer, config/processor builders and trainer.

The trained checkpoint lives in ``mmprune_exp/assets/qwen2_5_vl_tiny`` (``TINY_MODEL_DIR``) and loads with
``Qwen2_5_VLForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained`` like a real one.
"""

from pathlib import Path

TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "qwen2_5_vl_tiny"
