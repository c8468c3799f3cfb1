"""A small CNN classifier for the procedural shapes data (``shapes_data.py``).

It is trained alongside the demo DiT (``train_small_dit.py``) and shipped as
``models/shapes-dit/classifier.safetensors``. Uses:

* class accuracy of generated samples: does the DiT draw the class it was asked for?
* a FID-like score: the Frechet distance between Gaussians fitted to the classifier's penultimate
  features (``ShapesClassifier.features``, 192-d) of generated and of real images
  (``frechet_distance``). Lower is better; compare numbers only for the same classifier weights.

Input images are (B, 3, 64, 64) in [-1, 1], like the data and the DiT's outputs.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ShapesClassifier", "classifier_loss", "frechet_distance", "load_classifier", "save_classifier"]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(8, cout),
        nn.GELU(),
    )


class ShapesClassifier(nn.Module):
    """Conv net: 64x64 -> 32 -> 16 -> 8, global average pool -> ``feature_dim`` features -> logits."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128, 192)):
        super().__init__()
        self.num_classes = int(num_classes)
        self.widths = tuple(int(w) for w in widths)
        layers = [_conv(3, self.widths[0])]  # (B, w0, 64, 64)
        for cin, cout in zip(self.widths[:-1], self.widths[1:]):
            layers += [_conv(cin, cout, stride=2), _conv(cout, cout)]  # halves H, W
        self.body = nn.Sequential(*layers)  # (B, w_last, 8, 8)
        self.head = nn.Linear(self.widths[-1], self.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, feature_dim) penultimate features (for Frechet distances)."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, num_classes) logits."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) -> (predicted labels (N,), features (N, feature_dim)), in float32, batched."""
        p = next(self.parameters())
        preds, feats = [], []
        for chunk in images.split(batch_size):
            f = self.features(chunk.to(device=p.device, dtype=p.dtype))
            preds.append(self.head(f).argmax(-1))
            feats.append(f.float())
        return torch.cat(preds), torch.cat(feats)


def save_classifier(model: ShapesClassifier, path: str, dtype: torch.dtype = torch.float16, **extra) -> None:
    """Write the weights (``dtype``) and the constructor arguments (safetensors metadata) to ``path``."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"num_classes": str(model.num_classes), "widths": json.dumps(list(model.widths))}
    meta.update({k: str(v) for k, v in extra.items()})
    save_file(state, path, metadata=meta)


def load_classifier(path: str, device: str | torch.device = "cpu") -> ShapesClassifier:
    """Load ``classifier.safetensors`` as a float32 ``ShapesClassifier`` in eval mode on ``device``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    model = ShapesClassifier(int(meta.get("num_classes", 10)), tuple(json.loads(meta.get("widths", "[32,64,128,192]"))))
    state = {k: v.float() for k, v in load_file(path).items()}
    model.load_state_dict(state)
    return model.to(device).eval()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to (N, D) and (M, D) features (the FID formula).

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), computed in float64 with
    symmetric eigendecompositions (no scipy needed).
    """
    a, b = feats_a.double().cpu(), feats_b.double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D)
    ev, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = (vecs * ev.clamp(min=0).sqrt()) @ vecs.T  # S_a^1/2
    mid = sqrt_a @ cov_b @ sqrt_a
    tr_covmean = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return float(fd)


def classifier_loss(model: ShapesClassifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with label smoothing (used by the trainer)."""
    return F.cross_entropy(model(images), labels, label_smoothing=0.05)
