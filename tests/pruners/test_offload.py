"""model.offload=disk: layers streamed from the shards give the same pruned weights as the in-memory model."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from mmprune_exp.calibration import CalibrationData, shapes_calibration
from mmprune_exp.config.schema import CalibrationConfig, ModelConfig, PrunerConfig, SparsityConfig
from mmprune_exp.models import load_adapter
from mmprune_exp.pruners import build_pruner
from mmprune_exp.pruners.owl import OWLConfig


@pytest.mark.parametrize("cfg", [PrunerConfig(name="wanda"), OWLConfig(name="owl")], ids=["wanda", "owl"])
def test_streamed_pruning_equals_in_memory_pruning(random_tiny_dir, tmp_path, cfg):
    calib = CalibrationData("shapes", shapes_calibration(CalibrationConfig(nsamples=4)), 512)
    sparsity = SparsityConfig(name="s50", value=0.5)

    memory = load_adapter(ModelConfig(path=str(random_tiny_dir), device="cpu"))
    build_pruner(cfg, sparsity).prune(memory, calib)

    streamed = load_adapter(ModelConfig(path=str(random_tiny_dir), device="cpu", offload="disk"))
    assert all(p.is_meta for p in streamed.decoder_layers().parameters())  # nothing of the layers in memory
    streamed.layer_streamer.begin_output(tmp_path / "pruned")
    build_pruner(cfg, sparsity).prune(streamed, calib)
    assert all(p.is_meta for p in streamed.decoder_layers().parameters())
    streamed.layer_streamer.finalize()

    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "pruned")
    expected = memory.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    assert (tmp_path / "pruned" / "chat_template.jinja").exists()  # processor files travel along


# Run in a fresh interpreter: glibc's counters are process-wide, and in the test process other objects
# (earlier tests' tensors, garbage collection) free mapped blocks while the 64 blocks are allocated.
_HEAP_PROBE = """
import ctypes, ctypes.util, json, platform
import torch
from mmprune_exp.utils import bound_heap, release_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and bool(ctypes.util.find_library("c"))
out = {"glibc": glibc, "bound": bound_heap()}
warm = torch.ones(1 << 21)  # 8 MB
release_freed_memory()  # a no-op off glibc; must not fail
libc = ctypes.CDLL(ctypes.util.find_library("c")) if glibc else None
if libc is not None and hasattr(libc, "mallinfo2"):
    libc.mallinfo2.restype = MallInfo2
    # Freeing a mapped block raises glibc's own (dynamic) threshold to its size: without bound_heap, the
    # 2 MB blocks below would then come from the heap and stay resident after they are freed.
    del warm
    before = libc.mallinfo2().hblks
    blocks = [torch.ones(1 << 19) for _ in range(64)]  # 64 x 2 MB, above the fixed 1 MB threshold
    during = libc.mallinfo2().hblks
    del blocks
    release_freed_memory()
    out |= {"mapped": during - before, "unmapped": during - libc.mallinfo2().hblks}
print(json.dumps(out))
"""


def test_heap_helpers_return_freed_memory_to_the_os():
    """The streamer fixes glibc's mmap threshold so freed activations leave the resident set at once.

    Checked through glibc's own count of mapped blocks (``mallinfo2().hblks``): with the threshold fixed,
    each large block is its own mmap, unmapped (returned to the OS) when freed. The resident-set sizes this
    implies are measured by ``bench/heap_release.py``; they depend on the machine."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", _HEAP_PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["bound"] == probe["glibc"]
    if "mapped" not in probe:
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    assert probe["mapped"] >= 64  # every block has its own mapping ...
    assert probe["unmapped"] >= 64  # ... and freeing it unmapped it
