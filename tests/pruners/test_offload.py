"""model.offload=disk: layers streamed from the shards give the same pruned weights as the in-memory model."""

from __future__ import annotations

import ctypes

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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _mmapped_chunks(libc) -> int:
    """glibc's count of live allocations served by their own mmap (``hblks``): exact, unlike the RSS."""
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblks)


def test_heap_helpers_return_freed_memory_to_the_os():
    """The streamer fixes glibc's mmap threshold so freed activations leave the resident set at once.

    Checked through glibc's own bookkeeping: with the threshold fixed, each large block is its own mmap
    (unmapped, so returned to the OS, on free). The resident-set sizes this implies are measured by
    ``bench/heap_release.py``; they depend on the machine and on whatever else the process holds."""
    import ctypes.util
    import platform

    from mmprune_exp.utils import bound_heap, release_freed_memory

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c")
    assert bound_heap() == bool(glibc)
    release_freed_memory()  # a no-op off glibc; must not fail
    if not glibc:
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):  # glibc < 2.33
        pytest.skip("glibc without mallinfo2")
    before = _mmapped_chunks(libc)
    blocks = [torch.ones(1 << 19) for _ in range(64)]  # 64 x 2 MB, above the fixed 1 MB threshold
    during = _mmapped_chunks(libc)
    assert during - before >= 64  # every block has its own mapping ...
    del blocks
    release_freed_memory()
    assert during - _mmapped_chunks(libc) >= 64  # ... and freeing it unmapped it
