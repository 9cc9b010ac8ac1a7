"""mmprune-exp: Hydra-configured experiments for pruning multimodal LLMs."""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
