"""Masks for real: MTCNN on a photo that scikit-image ships, attention masks from the
embedded world's model and the tiny pipelines of every family, user mask folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fmn.data import masks as M
from fmn.model.load import embedded_path, load_pipeline
from fmn.world.render import render_object
from tests.tiny import FAMILIES, build_tiny_pipeline

skimage_data = pytest.importorskip("skimage.data")
needs_world = pytest.mark.skipif(
    not (embedded_path() / "model_index.json").is_file(), reason="embedded world not built yet"
)
ASTRONAUT_FACE = (181, 62, 268, 172)  # x1, y1, x2, y2, by eye


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / (a | b).sum())


def _box(hw: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros(hw, np.float32)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 1
    return m


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return load_pipeline("embedded:tiny-world")


def _stars(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [render_object("star", "flat", "red", 32, rng) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# ---------------------------------------------------------------------------------------
# Faces


def test_face_mask_covers_the_astronauts_face() -> None:
    image = Image.fromarray(skimage_data.astronaut())
    truth = _box((512, 512), ASTRONAUT_FACE)
    ellipse = M.face_mask(image)
    assert ellipse.shape == (512, 512) and ellipse.dtype == np.float32
    assert set(np.unique(ellipse)) == {0.0, 1.0}
    assert _iou(ellipse, truth) > 0.7
    ys, xs = np.nonzero(ellipse)
    x1, y1, x2, y2 = ASTRONAUT_FACE
    assert x1 < xs.mean() < x2 and y1 < ys.mean() < y2, "centred on the face"
    assert _iou(M.face_mask(image, shape="box", dilate=0.0), truth) > 0.9
    bigger = M.face_mask(image, dilate=0.5)
    assert bigger.sum() > ellipse.sum() and (bigger >= ellipse).all(), "dilate grows it"
    assert np.array_equal(M.face_mask(image, policy="all"), ellipse), "one face: same mask"


def test_two_faces_largest_or_all() -> None:
    face = skimage_data.astronaut()[40:200, 160:290]  # the face and a margin
    canvas = np.full((300, 500, 3), 255, np.uint8)
    canvas[20:180, 20:150] = face
    small = np.asarray(Image.fromarray(face).resize((98, 120)))
    canvas[150:270, 350:448] = small
    image = Image.fromarray(canvas)
    assert len(M.detect_faces(image)) == 2
    largest, both = M.face_mask(image), M.face_mask(image, policy="all")
    assert largest[:, :200].sum() > 0 and largest[:, 300:].sum() == 0, "the larger face only"
    assert both[:, 300:].sum() > 0 and (both >= largest).all()


def test_small_images_are_upscaled_for_the_detector() -> None:
    image = Image.fromarray(skimage_data.astronaut()).resize((96, 96))
    m = M.face_mask(image, shape="box", dilate=0.0)
    truth = _box((96, 96), tuple(round(v * 96 / 512) for v in ASTRONAUT_FACE))
    assert m.shape == (96, 96) and _iou(m, truth) > 0.7


@pytest.mark.parametrize("image", ["coffee", "flat"])
def test_no_face_raises_a_clear_error(image: str) -> None:
    pixels = skimage_data.coffee() if image == "coffee" else np.full((64, 64, 3), 128, np.uint8)
    with pytest.raises(M.NoFaceError, match=r"no face found.*'attention' or 'none'"):
        M.face_mask(Image.fromarray(pixels))


@needs_world
def test_identity_without_a_face_falls_back_and_says_so(world) -> None:
    coffee = np.asarray(Image.fromarray(skimage_data.coffee()).resize((32, 32)))
    face = np.asarray(Image.fromarray(skimage_data.astronaut()[40:200, 150:310]).resize((32, 32)))
    images = np.stack([face, coffee])
    masks, record = M.concept_masks(
        world, images, "alice", "id", "auto", image_names=["face.png", "coffee.jpg"]
    )
    assert masks.shape == (2, 32, 32)
    assert record["mode"] == "face"
    assert record["per_image"][0] == {"name": "face.png", "method": "face"}
    assert record["per_image"][1] == {
        "name": "coffee.jpg",
        "method": "attention",
        "reason": "no face found",
    }
    assert record["counts"] == {"attention": 1, "face": 1}
    masks, record = M.concept_masks(world, images, "alice", "id", "face", no_face="none")
    assert record["per_image"][1]["method"] == "none" and masks[1].min() == 1.0


# ---------------------------------------------------------------------------------------
# Attention


@needs_world
def test_attention_mask_on_world_images(world) -> None:
    images, truth = _stars(8)
    m = M.attention_mask(world, Image.fromarray(images[0]), "star")
    assert m.shape == (32, 32) and m.dtype == np.float32
    assert m.min() == 0.0 and m.max() == 1.0, "a binary mask with something on and off"
    batch = M.attention_masks(world, images, "star", "object")
    assert np.array_equal(batch[0], m), "a mask does not depend on its batch"
    ious = [_iou(b, t) for b, t in zip(batch, truth, strict=True)]
    chance = np.mean([_iou(np.ones_like(t), t) for t in truth])
    assert np.mean(ious) > max(0.4, 2 * chance), "it finds the star, not everything"
    big = M.attention_mask(world, Image.fromarray(images[0]).resize((80, 80)), "star")
    assert big.shape == (80, 80), "any image size; the mask comes back at that size"


@needs_world
def test_concept_masks_modes(world) -> None:
    images, _ = _stars(2)
    masks, record = M.concept_masks(world, images, "star", "object", "auto")
    assert masks.shape == (2, 32, 32) and record["mode"] == "attention"
    assert [p["method"] for p in record["per_image"]] == ["attention", "attention"]
    none, record = M.concept_masks(world, images, "star", "object", "none")
    assert none is None and record["mode"] == "none"
    with pytest.raises(ValueError, match="mask must be one of"):
        M.concept_masks(world, images, "star", "object", "faces")


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_masks_on_every_family(family: str, clip_tokenizer_dir) -> None:
    torch.set_num_threads(1)
    pipe = build_tiny_pipeline(family, clip_tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    # after a generation the scheduler holds a few inference timesteps only
    pipe("a photo of a star", num_inference_steps=2, output_type="np")
    images = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    masks = M.attention_masks(pipe, images, "star", "object")
    assert masks.shape == (2, 16, 16) and masks.min() >= 0 and masks.max() <= 1


def test_otsu_splits_two_groups() -> None:
    values = np.r_[np.full(90, 0.1), np.full(10, 0.9)]
    assert 0.1 < M.otsu_threshold(values) <= 0.9


# ---------------------------------------------------------------------------------------
# User masks and PNGs


def test_user_masks_are_matched_by_stem(tmp_path) -> None:
    folder = tmp_path / "masks"
    folder.mkdir()
    left = np.zeros((20, 20), np.uint8)
    left[:, :10] = 255
    Image.fromarray(left).save(folder / "cat.png")
    alpha = np.zeros((20, 20, 4), np.uint8)
    alpha[10:, :, 3] = 255  # a cut-out: the alpha channel is the mask
    Image.fromarray(alpha).save(folder / "dog.png")
    deep = (np.full((20, 20), 65535) * (np.arange(20) >= 10)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "owl.png")  # 16-bit: scaled, not clipped
    masks = M.load_user_masks(folder, ["cat.jpg", "dog.webp", "owl.png"], (10, 10))
    assert masks.shape == (3, 10, 10)
    assert masks[0][:, :5].min() == 1 and masks[0][:, 5:].max() == 0
    assert masks[1][5:].min() == 1 and masks[1][:5].max() == 0
    assert masks[2][:, 5:].min() == 1 and masks[2][:, :5].max() == 0
    with pytest.raises(FileNotFoundError, match=r"no mask for image bird\.jpg in .*masks"):
        M.load_user_masks(folder, ["cat.jpg", "bird.jpg"], (10, 10))
    Image.fromarray(left).save(folder / "cat.webp")
    with pytest.raises(ValueError, match="several masks"):
        M.match_user_masks(folder, ["cat.jpg"])


def test_concept_masks_with_a_user_folder(tmp_path) -> None:
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "a.png")
    images = np.zeros((1, 8, 8, 3), np.uint8)
    masks, record = M.concept_masks(None, images, "x", "object", tmp_path, image_names=["a.jpg"])
    assert masks.shape == (1, 8, 8) and masks.min() == 1
    assert record["mode"] == "user" and record["per_image"] == [{"name": "a.jpg", "method": "user"}]


def test_save_mask_pngs(tmp_path) -> None:
    masks = np.zeros((2, 8, 8), np.float32)
    masks[1, :4] = 1
    paths = M.save_mask_pngs(masks, tmp_path / "m", ["a.jpg", "b.png"])
    assert [p.name for p in paths] == ["a.png", "b.png"]
    back = np.asarray(Image.open(paths[1]))
    assert back.dtype == np.uint8 and back[:4].min() == 255 and back[4:].max() == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["a.png", "b.png"], "no temps"


def test_masked_loss_keeps_the_unmasked_scale() -> None:
    """The masked loss is the RMS attention over the mask's pixels: a mask of ones, or of
    any constant, gives exactly the unmasked loss, and where attention is spread evenly a
    partial mask does too; so `mask:` changes which pixels count, not how hard the
    attention term pulls against the preservation term (docs/masks.md)."""
    from fmn.model.attention import AttentionStore, attention_loss

    store = AttentionStore()
    store.latent_hw = (8, 8)
    g = torch.Generator().manual_seed(0)
    store.maps = [torch.rand(2, 3, 64, generator=g), torch.rand(2, 3, 16, generator=g)]
    plain = attention_loss(store)
    for value in (1.0, 0.5, 0.1):
        assert attention_loss(store, torch.full((2, 8, 8), value)) == pytest.approx(plain.item())
    half = torch.zeros(2, 8, 8)
    half[:, :4] = 1
    store.maps = [torch.full((2, 3, 64), 0.3), torch.full((2, 3, 16), 0.3)]
    assert attention_loss(store, half).item() == pytest.approx(attention_loss(store).item())
    assert attention_loss(store, half).item() == pytest.approx(0.3)
