"""The per-matrix sparsity heatmap written beside sparsity.json."""

from __future__ import annotations

from PIL import Image

from mmprune_exp.pruners.report import SparsityReport, sparsity_heatmap


def test_heatmap_is_a_png_of_layers_by_matrices(tmp_path):
    prefix = "model.language_model.layers"
    per_matrix = {f"{prefix}.{i}.self_attn.{m}": 0.1 * i for i in range(3) for m in ("q_proj", "k_proj")}
    per_matrix |= {f"{prefix}.{i}.mlp.down_proj": 0.5 for i in range(3)}
    path = sparsity_heatmap(SparsityReport(per_matrix=per_matrix, overall=0.3), tmp_path / "s.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > img.height  # 3 matrix kinds across, 3 layers down


def test_no_decoder_matrices_no_heatmap(tmp_path):
    report = SparsityReport(per_matrix={"lm_head": 0.5}, overall=0.5)
    assert sparsity_heatmap(report, tmp_path / "s.png") is None and not (tmp_path / "s.png").exists()
