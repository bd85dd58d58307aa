"""The built-in tiny safety checker (``builtin:tiny-safety-checker``).

diffusers' ``StableDiffusionSafetyChecker`` shrunk, its concept embeddings set to the
direction of one recognisable picture (``flag_pattern``) and its thresholds tuned at build
time between that picture and a set of ordinary images: ordinary images pass, a picture close
to the pattern is flagged. Tests control its verdict by sending that pattern as the input of
an image-to-image request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_IMAGE_SIDE = 32
CONCEPTS, SPECIAL_CONCEPTS = 17, 3


def flag_pattern(width: int, height: int):
    """The picture the tiny checker is built to flag: magenta and green quarters."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 0, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 2, 0, width, height // 2], fill=(0, 255, 0))
    draw.rectangle([0, height // 2, width // 2, height], fill=(0, 255, 0))
    return image


def ordinary_images(count: int, side: int = 64) -> list[Any]:
    """Seeded stand-ins for ordinary outputs: smooth colour fields, gradients, noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        kind = index % 3
        if kind == 0:  # a smooth random field, upscaled from a few pixels
            small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
        elif kind == 1:  # a two-colour gradient
            a, b = rng.integers(0, 256, size=(2, 3))
            ramp = np.linspace(0, 1, side)[None, :, None]
            image = Image.fromarray((a + (b - a) * ramp).repeat(side, 0).astype(np.uint8))
        else:  # noise around a colour
            base = rng.integers(0, 256, size=3)
            noise = rng.normal(0, 40, size=(side, side, 3))
            image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        images.append(image)
    return images


def pattern_variants(count: int, seed: int = 0) -> list[Any]:
    """The flag pattern as a generator would leave it: noise, blur, colour drift, sizes."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    variants = []
    for index in range(count):
        side = int(rng.choice([32, 48, 64, 96]))
        image = np.asarray(flag_pattern(side, side), dtype=np.float32)
        image = image * rng.uniform(0.6, 1.0) + rng.uniform(-40, 40, size=3) + rng.normal(0, 25, image.shape)
        picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        if index % 2:
            picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3)))
        variants.append(picture)
    return variants


def build(work: Path) -> None:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from builtin_models.parts import seeded

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": TINY_IMAGE_SIDE,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    seeded(0)
    model = StableDiffusionSafetyChecker(config)
    processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIDE}, crop_size={"height": TINY_IMAGE_SIDE, "width": TINY_IMAGE_SIDE}
    )

    def pixels(images: list[Any]) -> torch.Tensor:
        return processor(images=images, return_tensors="pt").pixel_values

    def embeds(pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = model.vision_model(pixel_values)[1]
        return torch.nn.functional.normalize(model.visual_projection(pooled), dim=-1)

    # A random vision tower does not tell the pattern from anything: train it briefly (a
    # fixed number of full-batch steps, deterministic) to put the pattern and its
    # variations (noise, blur, colour drift, as image-to-image leaves them) along one
    # concept direction and ordinary images away from it, as a real checker was trained.
    concept = torch.nn.functional.normalize(torch.randn(config.projection_dim), dim=0)
    positives, negatives = pattern_variants(32), ordinary_images(64)
    training = pixels(positives + negatives)
    labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    # One thread: a reduction split over more threads adds in another order, and 60 steps
    # of Adam turn that into other weights; the cache is built by whichever process (a
    # replica with one thread, the CLI, a test with two) needs it first.
    # The threshold below is measured on one thread too: it is saved in the weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(60):
            scores = embeds(training) @ concept
            loss = torch.nn.functional.binary_cross_entropy_with_logits(8 * (scores - 0.5), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            ordinary_scores = embeds(pixels(ordinary_images(60, side=48))) @ concept  # not trained on
            pattern_scores = embeds(pixels(pattern_variants(12, seed=1))) @ concept
    finally:
        torch.set_num_threads(threads)
    highest_ordinary, lowest_pattern = float(ordinary_scores.max()), float(pattern_scores.min())
    if lowest_pattern <= highest_ordinary:
        raise RuntimeError("tiny safety checker: the pattern does not stand apart from ordinary images")
    threshold = (highest_ordinary + lowest_pattern) / 2
    with torch.no_grad():
        model.concept_embeds.copy_(concept.expand(CONCEPTS, -1))
        model.concept_embeds_weights.fill_(threshold)
        # Special-care concepts lower every threshold a little when hit; a cosine never
        # exceeds 1, so at 2 they never are.
        model.special_care_embeds.copy_(concept.expand(SPECIAL_CONCEPTS, -1))
        model.special_care_embeds_weights.fill_(2.0)
    model.save_pretrained(work / "safety_checker", safe_serialization=True)
    processor.save_pretrained(work / "feature_extractor")
    # model_index.json marks a complete built-in folder (builtin_models).
    (work / "model_index.json").write_text('{"_class_name": "StableDiffusionSafetyChecker"}\n')
