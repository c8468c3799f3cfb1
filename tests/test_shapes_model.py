"""Fast CPU checks of the procedural shapes data, the shipped demo DiT and its classifier.

models/shapes-dit is produced by examples/train_small_dit.py (see its README.md).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from shapes_classifier import frechet_distance, load_classifier
from shapes_data import CLASS_NAMES, NUM_CLASSES, caption_to_label, generate_shapes, make_generator
from shapes_pipeline import ShapesPipeline, load_shapes_pipeline

MODEL_DIR = os.path.join(ROOT, "models", "shapes-dit")
# Measured on 10,000 fresh images at training time: 0.99+ (see models/shapes-dit/README.md).
CLASSIFIER_MIN_ACCURACY = 0.95


# ------------------------------------------------------------------------------------- data


def test_data_deterministic_and_well_formed():
    a = generate_shapes(16, generator=make_generator(123))
    b = generate_shapes(16, generator=make_generator(123))
    c = generate_shapes(16, generator=make_generator(124))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)

    assert a.images.shape == (16, 3, 64, 64) and a.images.dtype == torch.float32
    assert a.images.min() >= -1.0 and a.images.max() <= 1.0
    assert torch.isfinite(a.images).all()
    assert a.labels.shape == (16,) and a.labels.dtype == torch.int64
    assert 0 <= int(a.labels.min()) and int(a.labels.max()) < NUM_CLASSES
    assert len(a.captions) == 16
    for label, caption in zip(a.labels.tolist(), a.captions):
        assert CLASS_NAMES[label] in caption
        assert caption_to_label(caption) == label
    # Every image has a foreground object that differs from its background.
    assert (a.images.std(dim=(1, 2, 3)) > 0.05).all()


def test_data_requested_labels():
    labels = torch.arange(NUM_CLASSES)
    batch = generate_shapes(NUM_CLASSES, generator=make_generator(0), labels=labels, with_captions=False)
    assert torch.equal(batch.labels, labels) and batch.captions is None
    with pytest.raises(ValueError):
        generate_shapes(1, generator=make_generator(0), labels=[NUM_CLASSES])
    assert NUM_CLASSES >= 8


# ------------------------------------------------------------------------------------- model


def test_model_folder_loads_in_float32():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(MODEL_DIR, torch_dtype=torch.float32)
    assert model.dtype == torch.float32
    cfg = model.config
    assert (cfg.in_channels, cfg.out_channels, cfg.patch_size, cfg.sample_size) == (3, 3, 2, 64)
    weights = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(MODEL_DIR)
        for f in files
        if f.endswith(".safetensors")
    )
    assert weights <= 25 * 1024 * 1024


def test_pipeline_two_steps_batched_cfg():
    pipe = load_shapes_pipeline(MODEL_DIR, device="cpu", dtype=torch.float32)
    assert isinstance(pipe, ShapesPipeline)
    pipe.set_progress_bar_config(disable=True)
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        out = pipe(
            ["a red striped star", 0],
            num_inference_steps=2,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        hook.remove()
    images = out.images
    assert images.shape == (2, 3, 64, 64)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert batches == [4, 4]  # one transformer call per step, [uncond, cond] batched (2B)


def test_classifier_accuracy_on_fresh_data():
    clf = load_classifier(os.path.join(MODEL_DIR, "classifier.safetensors"))
    batch = generate_shapes(200, generator=make_generator(2024), with_captions=False)
    pred, feats = clf.predict(batch.images)
    accuracy = (pred == batch.labels).float().mean().item()
    assert accuracy > CLASSIFIER_MIN_ACCURACY, accuracy
    assert feats.shape == (200, clf.feature_dim)
    # Frechet distance: ~0 for identical sets, positive for different ones.
    assert frechet_distance(feats, feats) < 1e-6
    assert frechet_distance(feats[:100], feats[100:]) >= 0
