"""Prepare for real: image folders in every awkward format, masks at latent resolution,
and the per-concept cache (a hit runs neither the VAE nor the UNet; any change misses)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fmn.data.prepare import load_image_folder, load_images, prepare_concept
from tests.tiny import build_tiny_pipeline

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _halves(w: int, h: int, first=RED, second=BLUE) -> Image.Image:
    """Left half `first`, right half `second`."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2 :] = first, second
    return Image.fromarray(a)


# ---------------------------------------------------------------------------------------
# Image folders


def test_exif_orientation_is_honoured(tmp_path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees clockwise
    _halves(40, 20).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = load_image_folder(tmp_path, 8)
    assert out.shape == (1, 8, 8, 3) and out.dtype == np.uint8
    # after the rotation the red half is on top
    assert out[0, 1, 4, 0] > 200 and out[0, 1, 4, 2] < 60
    assert out[0, 6, 4, 2] > 200 and out[0, 6, 4, 0] < 60


def test_every_mode_becomes_rgb(tmp_path) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:, :8, 3] = 200, 255  # right half transparent
    Image.fromarray(rgba).save(tmp_path / "a_rgba.png")
    Image.fromarray(np.full((16, 16), 60, np.uint8)).save(tmp_path / "b_grey.png")
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "c_16bit.png")
    _halves(16, 16).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "d_palette.png")
    _halves(16, 16).save(tmp_path / "e.webp", lossless=True)
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = load_images(tmp_path, 16)
    assert [f.name for f in loaded.files] == [
        "a_rgba.png",
        "b_grey.png",
        "c_16bit.png",
        "d_palette.png",
        "e.webp",
    ]
    a, b, c, d, e = loaded.pixels.astype(int)
    assert tuple(a[0, 0]) == (200, 0, 0) and tuple(a[0, 15]) == (255, 255, 255), "on white"
    assert tuple(b[0, 0]) == (60, 60, 60)
    assert abs(c[0, 0, 0] - 128) <= 1, "16-bit scaled to 8 bits, not clipped to white"
    assert tuple(d[0, 0]) == RED and tuple(d[0, 15]) == BLUE
    assert tuple(e[0, 0]) == RED and tuple(e[0, 15]) == BLUE


def test_centre_and_random_crops(tmp_path) -> None:
    a = np.zeros((10, 40, 3), np.uint8)
    a[:, :, 0] = np.arange(40)[None] * 6  # red ramp left to right
    Image.fromarray(a).save(tmp_path / "wide.png")
    centre = load_images(tmp_path, 10)
    assert centre.boxes == [(15.0, 0.0, 25.0, 10.0)]
    boxes = {load_images(tmp_path, 10, crop="random", seed=s).boxes[0] for s in range(6)}
    assert len(boxes) > 1, "random crops move with the seed"
    again = load_images(tmp_path, 10, crop="random", seed=3).pixels
    assert np.array_equal(again, load_images(tmp_path, 10, crop="random", seed=3).pixels)
    with pytest.raises(ValueError, match="crop must be one of"):
        load_images(tmp_path, 10, crop="middle")


def test_unreadable_file_is_named(tmp_path) -> None:
    _halves(8, 8).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: not a readable image"):
        load_image_folder(tmp_path, 8)


def test_empty_or_missing_folder_fails_before_any_work(tmp_path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"has no \.jpg/\.jpeg/\.png/\.webp images"):
        load_image_folder(tmp_path, 8)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_image_folder(tmp_path / "nope", 8)
    # prepare fails on the folder before it hashes or runs the model (pipe is never touched)
    with pytest.raises(FileNotFoundError, match="has no"):
        prepare_concept(_NoModel(), "x", "object", "x", images=tmp_path)


class _NoModel:
    """Any attribute access fails: proves prepare did no model work before the error."""

    @property
    def unet(self):
        raise AssertionError("the model was touched")

    vae = text_encoder = unet


# ---------------------------------------------------------------------------------------
# Prepare and its cache


@pytest.fixture(scope="module")
def pipe(tiny):
    return tiny  # the shared per-family tiny pipeline (tests/conftest.py)


class _Counter:
    """Counts the calls of a model method while still calling it."""

    def __init__(self, obj, name: str) -> None:
        self.calls, self.obj, self.name = 0, obj, name
        self.original = getattr(obj, name)

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        setattr(self.obj, self.name, counted)
        return self

    def __exit__(self, *exc) -> None:
        delattr(self.obj, self.name)  # back to the class's method


def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)


def test_second_prepare_is_a_cache_hit_without_vae_or_unet(pipe, tmp_path) -> None:
    kw = {"images": _images(), "mask": "attention", "cache_dir": tmp_path}
    first = prepare_concept(pipe, "star", "object", "star", **kw)
    assert first.record["cache"] == "miss"
    assert first.masks.shape == (3, *first.latents.shape[-2:])
    entry = next((tmp_path / "star").iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["masks", "prep.json", "prep.safetensors"]
    assert len(list((entry / "masks").glob("*.png"))) == 3, "masks a person can look at"
    record = json.loads((entry / "prep.json").read_text())
    assert record["masks"]["mode"] == "attention" and record["model"]["fingerprint"]

    with _Counter(pipe.vae, "encode") as vae, _Counter(pipe.unet, "forward") as unet:
        second = prepare_concept(pipe, "star", "object", "star", **kw)
    assert vae.calls == 0 and unet.calls == 0
    assert second.record["cache"] == "hit"
    assert torch.equal(second.latents, first.latents)
    assert torch.equal(second.masks, first.masks)
    assert np.array_equal(second.images, first.images)
    for name in ("input_ids", "embeds", "pooled", "time_ids"):
        a, b = getattr(first.cond, name), getattr(second.cond, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert second.cond.prompts == first.cond.prompts and second.cond.eos_id == first.cond.eos_id


@pytest.mark.parametrize(
    "change",
    [
        {"text": "circle"},
        {"concept_type": "style"},
        {"mask": "none"},
        {"images": _images(seed=1)},
    ],
)
def test_any_change_of_inputs_misses(pipe, tmp_path, change) -> None:
    base = {"concept_type": "object", "text": "star", "images": _images(), "mask": "attention"}
    prepare_concept(pipe, "star", cache_dir=tmp_path, **base)
    with _Counter(pipe.vae, "encode") as vae:
        again = prepare_concept(pipe, "star", cache_dir=tmp_path, **{**base, **change})
    assert again.record["cache"] == "miss" and vae.calls == 1


def test_a_changed_base_model_misses(clip_tokenizer_dir, tmp_path) -> None:
    torch.set_num_threads(1)
    a = build_tiny_pipeline("sd1", clip_tokenizer_dir, seed=0)
    prepare_concept(a, "star", "object", "star", images=_images(), cache_dir=tmp_path)
    with torch.no_grad():
        a.vae.encoder.conv_in.weight.mul_(1.01)  # the fingerprint ignores the VAE; the cache not
    again = prepare_concept(a, "star", "object", "star", images=_images(), cache_dir=tmp_path)
    assert again.record["cache"] == "miss"


def test_generated_images_are_cached_too(clip_tokenizer_dir, tmp_path) -> None:
    torch.set_num_threads(1)
    p = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    p.set_progress_bar_config(disable=True)
    first = prepare_concept(p, "star", "object", "star", generate=2, cache_dir=tmp_path)
    assert first.record["source"] == {"generate": 2, "seed": 0}
    with _Counter(p.unet, "forward") as unet, _Counter(p.vae, "encode") as vae:
        second = prepare_concept(p, "star", "object", "star", generate=2, cache_dir=tmp_path)
    assert unet.calls == 0 and vae.calls == 0, "no generation, no encoding"
    assert np.array_equal(second.images, first.images)
    third = prepare_concept(p, "star", "object", "star", generate=2, seed=1, cache_dir=tmp_path)
    assert third.record["cache"] == "miss", "another seed draws other images"


def test_a_crashed_write_is_a_miss_and_leaves_no_temp(clip_tokenizer_dir, tmp_path) -> None:
    torch.set_num_threads(1)
    p = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    prepare_concept(p, "star", "object", "star", images=_images(), cache_dir=tmp_path)
    entry = next((tmp_path / "star").iterdir())
    (entry / "prep.json").unlink()  # as if the run died before the record was written
    again = prepare_concept(p, "star", "object", "star", images=_images(), cache_dir=tmp_path)
    assert again.record["cache"] == "miss" and (entry / "prep.json").is_file()
    (entry / "prep.safetensors").write_bytes(b"garbage")  # a damaged entry: recomputed
    again = prepare_concept(p, "star", "object", "star", images=_images(), cache_dir=tmp_path)
    assert again.record["cache"] == "miss"
    assert not [f for f in entry.rglob("*") if f.name.endswith(".tmp")]


def test_folder_and_user_masks_cropped_alike(clip_tokenizer_dir, tmp_path) -> None:
    torch.set_num_threads(1)
    p = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    # a wide image: red on the left third; its mask is white exactly there
    a = np.zeros((16, 48, 3), np.uint8)
    a[:, :16] = RED
    Image.fromarray(a).save(images / "wide.png")
    Image.fromarray((a[..., 0] > 0).astype(np.uint8) * 255).save(masks / "wide.jpg")
    for seed in range(3):
        data = prepare_concept(
            p, "star", "object", "star", images=images, mask=masks, crop="random", seed=seed
        )
        red = data.images[0, ..., 0].astype(np.float32) / 255
        lat = torch.nn.functional.interpolate(
            torch.from_numpy(red)[None, None], size=data.masks.shape[-2:], mode="area"
        )[0, 0]
        assert torch.allclose(data.masks[0], lat, atol=0.1), "the mask follows its image's crop"
    assert data.record["masks"]["mode"] == "user"
    assert data.record["names"] == ["wide.png"]
    with pytest.raises(ValueError, match="either ready-made masks or a mask mode"):
        prepare_concept(
            p, "s", "object", "s", images=_images(), masks=np.ones((3, 16, 16)), mask="auto"
        )


def test_prepare_without_masks_keeps_the_old_behaviour(clip_tokenizer_dir) -> None:
    torch.set_num_threads(1)
    p = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    data = prepare_concept(p, "star", "object", "star", images=_images())
    assert data.masks is None and data.record["cache"] == "off"
    assert data.latents.shape == (3, 4, 8, 8)
    given = np.zeros((3, 16, 16), np.float32)
    given[:, :8] = 1
    data = prepare_concept(p, "star", "object", "star", images=_images(), masks=given)
    assert torch.allclose(data.masks[:, :4], torch.ones(3, 4, 8))
    assert torch.allclose(data.masks[:, 4:], torch.zeros(3, 4, 8))
