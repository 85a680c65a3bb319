"""The image part of ``mmm demo``: a tiny MAE on the embedded shapes, probed and visualised.

Steps: build the embedded image set (procedurally rendered shapes, built locally) → pretrain
``configs/image_mae_tiny.yaml`` on CPU → held-out reconstruction loss of the trained model and of
the same network at its initialisation (identical masks) → linear probe for the shape class on
frozen mean-pooled features, trained vs. random init → a reconstruction figure (original /
masked input / MAE reconstruction) and the loss curve.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from mmm.config import PretrainConfig
from mmm.modalities.image.transforms import denormalize
from mmm.data.stream import SampleErrorHandler, make_pipeline
from mmm.demo.common import bold_better, demo_part, plot_losses, report_end, table_row, train_part
from mmm.model import MaskedModel
from mmm.objectives.mim import patchify, unpatchify

logger = logging.getLogger("mmm.demo")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "image_mae_tiny.yaml"


@torch.no_grad()
def reconstruction_figure(model: MaskedModel, modality, masker, urls, out: Path, n: int = 8, seed: int = 4321) -> None:
    """PNG grid of ``n`` held-out images: original, masked input, MAE reconstruction (visible patches pasted back).

    With ``norm_pix_loss`` the decoder predicts per-patch normalised pixels; they are mapped back
    with each true patch's mean and std, as the MAE paper's figures do.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    stages = modality.stages(masker, batch_size=n, seed=seed, handler=SampleErrorHandler(), fixed_masking=True,
                             epochs=None, train=False)
    batch = next(iter(make_pipeline(urls, stages=stages, shuffle_shards=False, shuffle_buffer=0)))
    head = model.objectives["mae"]
    pred, mask = head.decode(model.encode(batch), batch)  # (B, P, p*p*C), (B, P)
    pixels = batch.inputs[head.modality].pixels
    true = patchify(pixels, head.patch)
    if head.norm_pix_loss:
        mean, var = true.mean(-1, keepdim=True), true.var(-1, keepdim=True, unbiased=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    recon = torch.where(mask[..., None], pred, true)
    masked = torch.where(mask[..., None], torch.full_like(true, float("nan")), true)
    rows = [pixels, unpatchify(masked, head.patch, head.channels, head.grid),
            unpatchify(recon, head.patch, head.channels, head.grid)]
    names = ["original", f"input ({int(mask[0].sum())}/{mask.shape[1]} hidden)", "reconstruction"]
    b = pixels.shape[0]
    fig, axes = plt.subplots(3, b, figsize=(1.3 * b, 4.2))
    for r, (row, name) in enumerate(zip(rows, names)):
        hidden = torch.isnan(row)
        img = denormalize(torch.nan_to_num(row, 0.0)).clamp(0, 1)
        img = torch.where(hidden, torch.full_like(img, 0.5), img)  # hidden patches shown grey
        for c in range(b):
            ax = axes[r, c]
            ax.imshow(img[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle("mmm demo: tiny MAE on held-out shapes (75% of patches hidden)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _train_and_evaluate(cfg: PretrainConfig, out_dir: Path, quick: bool) -> Dict[str, object]:
    part = train_part(cfg)
    scores = part.losses_and_probes(cfg.data.batch_size, quick, max_train=300 if quick else 2000,
                                    max_test=200 if quick else 1000)
    reconstruction_figure(part.models["trained"], part.run.modality, part.run.masker, part.val_urls,
                          out_dir / "reconstruction.png")
    plot_losses(part.series, out_dir / "loss_curve.png", "mmm demo: tiny MAE on embedded shapes",
                "MSE on normalised hidden patches",
                [(scores["held_out_loss"]["untrained"]["mae"], "untrained model, held-out", "--")])
    images_per_sec = [v for _, v in part.series.get("train/samples_per_sec", [])]
    return {
        **part.summary(cfg),
        **scores,
        "median_images_per_sec": float(np.median(images_per_sec)) if images_per_sec else None,
    }


def _report(m: Dict, cfg: PretrainConfig, folder: str) -> str:
    e, i = cfg.model.encoder, cfg.model.image
    lt, lu = m["held_out_loss"]["trained"]["mae"], m["held_out_loss"]["untrained"]["mae"]
    pt, pu = m["linear_probe"]["trained"], m["linear_probe"]["untrained"]
    rows = bold_better({"untrained (same init)": [lu, pu["accuracy"]], "trained": [lt, pt["accuracy"]]},
                       higher_is_better=[False, True])
    lines = [
        "## Image: masked autoencoder (MAE)",
        "",
        f"Tiny ViT ({e.depth} blocks, width {e.dim}, {i.image_size}x{i.image_size} images, {i.patch_size}px patches) "
        f"pretrained as an MAE for {m['steps']} steps ({m['train_seconds']} s) on the embedded shapes, "
        f"`{cfg.masking.name}` {cfg.masking.args}; the encoder sees only the visible patches.",
        "",
        "| model | held-out MAE loss | linear-probe accuracy (shape class) |",
        "|---|---|---|",
        table_row(rows["untrained (same init)"]),
        table_row(rows["trained"]),
        "",
        f"Probe: logistic regression on frozen mean-pooled features of {pt['train_samples']} training images, "
        f"scored on {pt['test_samples']} held-out images ({pt['classes']} classes, majority-class chance "
        f"{pt['chance']:.3f}).",
        *report_end(folder, [("reconstructions", "reconstruction.png"), ("loss curve", "loss_curve.png")],
                    m["checkpoint"], "`mmm.load_encoder(path, modality=\"image\")`; exportable to timm"),
    ]
    return "\n".join(lines)


run_image_demo = demo_part("image", DEFAULT_CONFIG, _train_and_evaluate, _report)
