"""Detectors behind one interface, run for real: MTCNN + a face-embedding net (randomly
initialised: these tests check the plumbing, not the accuracy), a tiny random CLIP, the
real NudeNet model, and the factory that picks them from a manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from fmn.eval.mscore.detectors import DetectorError, WorldDetector, make_detectors
from fmn.manifest import ManifestError, parse_manifest
from fmn.world import EMBEDDED_DIR

EMPTY = np.zeros((0, 8, 8, 3), np.uint8)


def _manifest(tmp: Path, **evaluate):
    concepts = [{"id": "astronaut", "type": "id", "images": "faces"}]
    preserve = [{"id": "umbrella", "type": "object"}, {"id": "monet", "type": "style"}]
    m = {"name": "t", "concepts": concepts, "preserve": preserve, "evaluate": evaluate}
    return parse_manifest(m, base_dir=tmp)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """A folder with one real face photo (astronaut), a folder with none (coffee), and a
    randomly initialised InceptionResnetV1 state dict as .safetensors and .pt."""
    from facenet_pytorch import InceptionResnetV1

    root = tmp_path_factory.mktemp("faces")
    for name, image in (("faces", data.astronaut()), ("no-face", data.coffee())):
        (root / name).mkdir()
        Image.fromarray(image).save(root / name / f"{name}.png")
    torch.manual_seed(0)
    state = InceptionResnetV1(pretrained=None).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, root / "facenet.safetensors")
    torch.save(state, root / "facenet.pt")
    return root


def test_face_detector_matches_reference_faces(faces: Path) -> None:
    m = _manifest(faces, detectors={"id": "face"}, face_weights="facenet.safetensors")
    det = make_detectors(m, ["id"])["id"]
    assert det.name == "face"
    coffee = np.asarray(Image.fromarray(data.coffee()).resize((512, 512)))
    images = np.stack([data.astronaut(), coffee])
    prob, rec = det.score(images, "astronaut", "id")
    # the reference photo itself: same crop, same embedding (cos 1); coffee has no face
    assert prob[0] > 0.99 and rec[0]
    assert prob[1] == 0 and not rec[1]
    assert det.score(EMPTY, "astronaut", "id")[0].shape == (0,)
    with pytest.raises(DetectorError, match="no reference images of 'nobody'"):
        det.score(EMPTY, "nobody", "id")
    det.references["coffee"] = faces / "no-face"
    with pytest.raises(DetectorError, match="found no face in the 1 reference images"):
        det.score(EMPTY, "coffee", "id")


def test_face_weights_from_pt_file_and_bad_paths(faces: Path) -> None:
    from fmn.eval.mscore.face import load_face_net

    a, b = load_face_net(faces / "facenet.pt"), load_face_net(faces / "facenet.safetensors")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(DetectorError, match="face weights not found"):
        load_face_net(faces / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, faces / "other.safetensors")
    with pytest.raises(DetectorError, match="is not an InceptionResnetV1 state dict"):
        load_face_net(faces / "other.safetensors")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, clip_tokenizer_dir: Path) -> Path:
    """A tiny randomly initialised CLIP saved as a local folder with the real tokenizer."""
    import shutil

    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={**small, "num_attention_heads": 4, "vocab_size": 49408},
        vision_config={**small, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    for f in clip_tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def test_clip_detector_zero_shot_over_the_manifest_texts(tmp_path: Path, clip_dir: Path) -> None:
    (tmp_path / "faces").mkdir()
    Image.fromarray(data.astronaut()).save(tmp_path / "faces" / "a.png")
    m = _manifest(tmp_path, clip_model=str(clip_dir), detectors={"object": "clip", "style": "clip"})
    dets = make_detectors(m, ["object", "style", "id"])
    assert dets["object"] is dets["style"] and dets["id"].name == "world"
    clip = dets["style"]
    images = np.random.default_rng(0).integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    p_obj, rec_obj = clip.score(images, "umbrella", "object")
    p_sty, rec_sty = clip.score(images, "monet", "style")
    # one concept per type here: umbrella vs 'none', monet vs 'none'
    assert p_obj.shape == (5,) and ((p_obj > 0) & (p_obj < 1)).all()
    assert (rec_obj == (p_obj > 0.5)).all() and (rec_sty == (p_sty > 0.5)).all()
    again, _ = clip.score(images, "umbrella", "object")
    np.testing.assert_array_equal(p_obj, again)
    with pytest.raises(DetectorError, match="not 'van-gogh'"):
        clip.score(EMPTY, "van-gogh", "style")


def test_clip_folder_must_be_a_whole_model(tmp_path: Path, clip_dir: Path) -> None:
    from fmn.eval.mscore.clip import ClipDetector

    with pytest.raises(DetectorError, match="not a CLIP model folder"):
        ClipDetector(tmp_path, [])
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(DetectorError, match="could not load the CLIP model"):
        ClipDetector(tmp_path, [])


def test_nudenet_scores_exposed_parts_only() -> None:
    from fmn.eval.mscore.nudenet import (
        NudeNetDetector,
        counted_parts,
        nsfw_probability,
        part_counts,
    )

    found = [
        {"class": "FACE_FEMALE", "score": 0.9},
        {"class": "FEMALE_BREAST_COVERED", "score": 0.8},
        {"class": "BUTTOCKS_EXPOSED", "score": 0.6},
    ]
    assert nsfw_probability(found) == 0.6
    assert nsfw_probability(found[:2]) == 0.0
    # the published tables count exposed parts from 0.6, each detection once, in their order
    found += [
        {"class": "FEET_EXPOSED", "score": 0.7},
        {"class": "BELLY_EXPOSED", "score": 0.59},
        {"class": "FEET_EXPOSED", "score": 0.61},
        {"class": "ARMPITS_EXPOSED", "score": 0.9},
    ]
    assert counted_parts(found) == "ARMPITS_EXPOSED,BUTTOCKS_EXPOSED,FEET_EXPOSED,FEET_EXPOSED"
    counts = part_counts([counted_parts(found), "FEET_EXPOSED", ""])
    assert counts["feet"] == 3 and counts["belly"] == 0 and len(counts) == 8
    det = NudeNetDetector()
    images = np.stack([data.astronaut(), np.zeros((512, 512, 3), np.uint8)])
    prob, rec = det.score(images, "nudity", "nsfw")  # the real 320n model
    assert prob.shape == (2,) and (prob < 0.5).all() and not rec.any()
    # it finds the astronaut's face (FACE_FEMALE), which no table counts
    assert det.score_parts(images, "nudity", "nsfw")[2] == ["", ""]
    with pytest.raises(DetectorError, match="nudenet measures nudity"):
        det.score(EMPTY, "carol", "id")


def test_detectors_are_checked_when_the_manifest_loads(tmp_path: Path) -> None:
    (tmp_path / "faces").mkdir()
    Image.fromarray(data.astronaut()).save(tmp_path / "faces" / "a.png")
    with pytest.raises(ManifestError, match=r"face detector is chosen but evaluate\.face_weights"):
        _manifest(tmp_path, detectors={"id": "face"})
    m = _manifest(tmp_path, detectors={"id": "face"}, face_weights="missing.safetensors")
    with pytest.raises(DetectorError, match="face weights not found"):
        make_detectors(m, ["id"])


def test_world_detector_knows_only_world_concepts() -> None:
    det = WorldDetector(EMBEDDED_DIR / "classifier")
    assert det.score(EMPTY, "carol", "id")[0].shape == (0,)
    with pytest.raises(DetectorError, match="knows no id concept 'elon-musk'"):
        det.score(EMPTY, "elon-musk", "id")


def test_world_detector_is_refused_on_a_model_that_is_not_an_embedded_world(
    tmp_path: Path,
) -> None:
    """A real checkpoint's manifest naming "star" would otherwise be scored, silently, by
    the world's 32 px cartoon classifier."""
    from fmn.eval.mscore.detectors import world_classifier_for

    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    m = {"name": "t", "base_model": "sd", "concepts": [{"id": "star", "type": "object"}]}
    with pytest.raises(ManifestError, match=r"evaluate\.detectors\.object.*world detector"):
        parse_manifest(m, base_dir=tmp_path)
    ok = parse_manifest(m | {"evaluate": {"detectors": {"object": "nudenet"}}}, base_dir=tmp_path)
    assert ok.evaluate.detectors.object == "nudenet"
    with pytest.raises(DetectorError, match=r"set evaluate\.detectors to clip, face or nudenet"):
        world_classifier_for(str(tmp_path / "sd"))
    assert world_classifier_for("embedded:crowd-world").parent.name == "crowd-world"
