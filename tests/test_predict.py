"""predict(cfg) on a tiny trained model: JSON schema and values, skipping, errors, the gallery cache, the CLI."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import metriclab.inference.gallery as gallery_module
from metriclab.core.checkpoint import CheckpointMeta
from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.core.paths import REPO_ROOT
from metriclab.inference.gallery import collect_images
from metriclab.inference.predictions import majority_vote
from metriclab.jobs.predict import predict
from metriclab.models.extractors import build_extractor, load_checkpoint, load_extractor_weights
from tests.helpers import compose_cfg, train_tiny, write_tiny_dataset

K = 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny model for the module: 4 train digits, 3 validation digits (every validation image is a gallery row)."""
    return train_tiny(tmp_path_factory.mktemp("predict"), "logger=tensorboard")


def predict_cfg(trained, tmp_path, *extra):
    return compose_cfg("predict", [
        f"paths.outputs_dir={tmp_path}/outputs", f"paths.run_dir={tmp_path}/run", f"dataset.root={trained['root']}",
        f"ckpt={trained['ckpt']}", "transforms=digits", "num_threads=1", f"k={K}", f"cache_dir={tmp_path}/cache",
        *extra])


def reference_embeddings(ckpt: Path, paths, flip: bool = False) -> np.ndarray:
    """Embeddings computed the plain way: the checkpoint's architecture, its weights, the digits transform; `flip`:
    the mean with the left-right mirrored batch's (the digits extractor does not normalise)."""
    from omegaconf import OmegaConf
    from oml.utils.images.images import imread_cv2

    stored = CheckpointMeta.from_checkpoint(load_checkpoint(ckpt)).extractor_cfg
    extractor = build_extractor(OmegaConf.create({**stored, "weights": None}))
    load_extractor_weights(extractor, ckpt)
    extractor.eval()
    transform = build(compose_cfg("predict", ["transforms=digits"]).transforms.val, "transforms.val")
    batch = torch.stack([transform(image=imread_cv2(Path(p).read_bytes()))["image"] for p in paths])
    with torch.no_grad():
        if flip:
            return ((extractor(batch) + extractor(torch.flip(batch, dims=[-1]))) / 2).numpy()
        return extractor(batch).numpy()


def test_majority_vote_hand_computed():
    assert majority_vote([3, 1, 1], [0.1, 0.2, 0.3]) == (1, 2)
    assert majority_vote([3, 1, 1, 3], [0.1, 0.2, 0.3, 0.4]) == (3, 2)  # 2-2 tie: 3 has the nearest neighbour
    assert majority_vote([1, 3, 3, 1], [0.5, 0.2, 0.3, 0.1]) == (1, 2)  # unsorted input: nearest = 0.1 (label 1)
    assert majority_vote(["a", "b", "c"], [0.3, 0.3, 0.3]) == ("a", 1)  # equal distances: the earlier one
    with pytest.raises(ValueError):
        majority_vote([], [])


def test_collect_images_file_folder_glob_list(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for name in ("a/x.png", "a/sub/y.JPG", "a/notes.txt", "b.png"):
        (tmp_path / name).write_bytes(b"")
    assert collect_images(str(tmp_path / "b.png")) == [tmp_path / "b.png"]
    assert collect_images(str(tmp_path / "a")) == [tmp_path / "a/sub/y.JPG", tmp_path / "a/x.png"]
    assert collect_images(f"{tmp_path}/**/*.png") == [tmp_path / "a/x.png", tmp_path / "b.png"]
    assert collect_images([str(tmp_path / "b.png"), str(tmp_path / "b.png"), str(tmp_path / "a/x.png")]) == [
        tmp_path / "b.png", tmp_path / "a/x.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"images={tmp_path / 'empty'}: the folder holds no image files"):
        collect_images(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="the pattern matches no file"):
        collect_images(f"{tmp_path}/*.gif")
    with pytest.raises(ConfigError, match=f"images={tmp_path / 'nope.png'} does not exist"):
        collect_images(str(tmp_path / "nope.png"))


def test_predictions_json_values_pictures_and_skipped(trained, tmp_path, caplog):
    root = trained["root"]
    val = pd.read_csv(root / "dataset.csv").query("split == 'validation'")
    queries = tmp_path / "queries"
    queries.mkdir()
    for p in val["path"].iloc[::3]:  # 6 of the 18 validation images, copied out of the dataset
        shutil.copy(root / p, queries / f"{Path(p).parent.name}_{Path(p).name}")
    (queries / "broken.png").write_bytes(b"this is not a png")
    with caplog.at_level(logging.WARNING):
        out = predict(predict_cfg(trained, tmp_path, f"images={queries}"))

    broken = str((queries / "broken.png").resolve())
    assert out["skipped"] and [s["image"] for s in out["skipped"]] == [broken]
    assert broken in caplog.text and "not a decodable image" in caplog.text
    files = sorted(tmp_path.joinpath("run").glob("predictions_*.json"))
    assert len(files) == 1 and files[0] == out["predictions_json"]
    assert len(files[0].stem) == len("predictions_20250101-120000")
    records = json.loads(files[0].read_text())
    assert records == out["records"] and len(records) == 6

    gallery_paths = [str(root / p) for p in val["path"]]  # every validation row is a gallery row here
    labels_of = dict(zip(gallery_paths, val["label"]))
    ref_gallery = reference_embeddings(trained["ckpt"], gallery_paths)
    for rec in records:
        assert set(rec) == {"image", "neighbours", "predicted_class", "predicted_label", "votes", "postprocess",
                            "flip_tta", "threshold"}  # closed set: no "unknown" key
        assert (rec["postprocess"], rec["flip_tta"], rec["threshold"]) == ("none", False, None)
        nbs = rec["neighbours"]
        assert len(nbs) == K
        assert all(set(n) == {"path", "label", "class_name", "distance"} for n in nbs)
        dists = [n["distance"] for n in nbs]
        assert dists == sorted(dists)
        assert all(labels_of[n["path"]] == n["label"] and n["class_name"] == str(n["label"]) for n in nbs)
        # the copied image is also in the gallery: it is its own nearest neighbour
        assert Path(nbs[0]["path"]).name == Path(rec["image"]).name.split("_", 1)[1] and dists[0] < 1e-3
        # neighbours and distances = brute force over the reference embeddings
        q = reference_embeddings(trained["ckpt"], [rec["image"]])[0]
        ref = np.sqrt(((ref_gallery - q) ** 2).sum(1))
        order = np.argsort(ref, kind="stable")[:K]
        np.testing.assert_allclose(dists, ref[order], atol=1e-3)
        assert {n["path"] for n in nbs} == {gallery_paths[i] for i in order}
        # predicted class = majority of the k labels, a tie going to the label seen first (nearest)
        counts = Counter(n["label"] for n in nbs)
        top = max(counts.values())
        expected = next(n["label"] for n in nbs if counts[n["label"]] == top)
        assert rec["predicted_label"] == expected and rec["votes"] == top
        assert rec["predicted_class"] == str(expected)

    pictures = sorted((tmp_path / "run" / files[0].stem).glob("*.png"))
    assert pictures == sorted(out["pictures"]) and len(pictures) == 6
    with Image.open(pictures[0]) as im:
        assert im.size[0] > im.size[1] > 100  # one row: query + K neighbours


def test_cache_hits_and_invalidation_count_gallery_embeddings(trained, tmp_path, monkeypatch):
    calls = []
    real = gallery_module.embed_all

    def counting(model, dataset, *args, **kwargs):
        calls.append(len(dataset))
        return real(model, dataset, *args, **kwargs)

    monkeypatch.setattr(gallery_module, "embed_all", counting)
    query = str(trained["root"] / "validation/4")
    n_gallery = 18

    def run(*extra):
        calls.clear()
        out = predict(predict_cfg(trained, tmp_path, f"images={query}", "max_pictures=0", *extra))
        return out, [n for n in calls if n == n_gallery]

    first, embedded = run()
    assert embedded == [n_gallery] and not first["gallery"].embeddings_from_cache
    again, embedded = run()
    assert embedded == [] and again["gallery"].embeddings_from_cache and again["gallery"].index_from_cache
    assert again["records"] == first["records"]
    _, embedded = run("index=hnsw")  # only the index changed: embeddings reused, index built
    assert embedded == []
    hnsw_again, embedded = run("index=hnsw")
    assert embedded == [] and hnsw_again["gallery"].index_from_cache
    _, embedded = run("transforms.val.im_size=40")  # another transform: new embeddings
    assert embedded == [n_gallery]
    _, embedded = run("use_cache=false")
    assert embedded == [n_gallery]

    # the same weights under another name hit; changed weights miss
    copy = tmp_path / "copy.ckpt"
    shutil.copy(trained["ckpt"], copy)
    _, embedded = run(f"ckpt={copy}")
    assert embedded == []
    ckpt = torch.load(copy, map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("extractor.") and k.endswith("conv1.weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] * 1.01
    torch.save(ckpt, copy)
    _, embedded = run(f"ckpt={copy}")
    assert embedded == [n_gallery]

    # a changed CSV (same rows, different content) and a replaced gallery image both miss
    data = tmp_path / "data_copy"
    shutil.copytree(trained["root"], data)
    _, embedded = run(f"dataset.root={data}")
    assert embedded == [n_gallery]
    _, embedded = run(f"dataset.root={data}")
    assert embedded == []
    df = pd.read_csv(data / "dataset.csv")
    df["note"] = "x"
    df.to_csv(data / "dataset.csv", index=False)
    _, embedded = run(f"dataset.root={data}")
    assert embedded == [n_gallery]
    first_val = data / df.query("split == 'validation'")["path"].iloc[0]
    os.utime(first_val, ns=(first_val.stat().st_atime_ns, first_val.stat().st_mtime_ns + 10**9))
    _, embedded = run(f"dataset.root={data}")
    assert embedded == [n_gallery]

    # no checkpoint, a local extractor weights file: the same file hits, the file overwritten in place misses
    from omegaconf import OmegaConf

    stored = CheckpointMeta.from_checkpoint(load_checkpoint(trained["ckpt"])).extractor_cfg
    extractor = build_extractor(OmegaConf.create({**stored, "weights": None}))
    weights = tmp_path / "extractor.pth"
    torch.save(extractor.state_dict(), weights)

    def run_on_weights_file():
        calls.clear()
        cfg = predict_cfg(trained, tmp_path, f"images={query}", "max_pictures=0", "ckpt=null")
        cfg.extractor = OmegaConf.create({**stored, "weights": str(weights)})
        predict(cfg)
        return [n for n in calls if n == n_gallery]

    assert run_on_weights_file() == [n_gallery]
    assert run_on_weights_file() == []
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in extractor.state_dict().items()}, weights)
    assert run_on_weights_file() == [n_gallery]


def test_hnsw_and_flat_agree_on_a_small_gallery(trained, tmp_path):
    query = str(trained["root"] / "validation/5")
    flat = predict(predict_cfg(trained, tmp_path, f"images={query}", "max_pictures=0"))
    hnsw = predict(predict_cfg(trained, tmp_path, f"images={query}", "max_pictures=0", "index=hnsw"))
    for a, b in zip(flat["records"], hnsw["records"]):
        assert [n["path"] for n in a["neighbours"]] == [n["path"] for n in b["neighbours"]]
        assert a["predicted_label"] == b["predicted_label"]


def test_post_processing_and_flip_tta_follow_the_reference(trained, tmp_path):
    """postprocess=k_reciprocal: the neighbours and distances are the re-ranked ones of the dense reference over the
    query and gallery embeddings; flip TTA: both sides are the mean over the mirror images."""
    from tests.rerank_reference import rerank_dense_reference

    query = trained["root"] / "validation/5"
    out = predict(predict_cfg(trained, tmp_path, f"images={query}", "max_pictures=0", "postprocess=k_reciprocal",
                              "postprocess.k_reciprocal.k1=6", "postprocess.k_reciprocal.k2=3"))
    gallery = out["gallery"]
    q_paths = [r["image"] for r in out["records"]]
    q_emb = reference_embeddings(trained["ckpt"], q_paths)
    final = rerank_dense_reference(q_emb, gallery.embeddings, k1=6, k2=3, lambda_value=0.3, v_dtype=np.float64)
    for row, record in enumerate(out["records"]):
        assert record["postprocess"] == "k_reciprocal(k1=6, k2=3, lambda_value=0.3)" and record["flip_tta"] is False
        order = np.argsort(final[row], kind="stable")[:K]
        assert [n["path"] for n in record["neighbours"]] == gallery.table["path"].iloc[order].tolist()
        np.testing.assert_allclose([n["distance"] for n in record["neighbours"]], final[row, order], atol=1e-5)
    flipped = predict(predict_cfg(trained, tmp_path, f"images={query}", "max_pictures=0", "evaluation.flip_tta=true",
                                  f"cache_dir={tmp_path}/cache_flip"))
    paths = gallery.table["path"].tolist()
    np.testing.assert_allclose(flipped["gallery"].embeddings, reference_embeddings(trained["ckpt"], paths, flip=True),
                               atol=1e-4)
    assert not np.allclose(flipped["gallery"].embeddings, reference_embeddings(trained["ckpt"], paths), atol=1e-2)
    assert flipped["records"][0]["flip_tta"] is True


def test_gallery_folder_and_train_rows(trained, tmp_path):
    root = trained["root"]
    gallery = tmp_path / "reference"
    for digit, name in ((4, "four"), (5, "five"), (6, "six")):
        shutil.copytree(root / "validation" / str(digit), gallery / name)
    out = predict(predict_cfg(trained, tmp_path, f"images={root}/validation/6/*.png", f"gallery={gallery}",
                              "max_pictures=0", "dataset.root=???"))
    table = out["gallery"].table
    assert len(table) == 18 and dict(zip(table["class_name"], table["label"])) == {"five": 0, "four": 1, "six": 2}
    for rec in out["records"]:
        assert all(n["path"].startswith(str(gallery)) for n in rec["neighbours"])
        assert rec["neighbours"][0]["class_name"] == "six"  # itself
        assert rec["predicted_class"] in {"five", "four", "six"}
        assert {(n["label"], n["class_name"]) for n in rec["neighbours"]} <= {(0, "five"), (1, "four"), (2, "six")}

    (gallery / "loose.png").write_bytes((gallery / "six" / os.listdir(gallery / "six")[0]).read_bytes())
    with pytest.raises(ConfigError, match="loose.png.*lie directly in the folder"):
        predict(predict_cfg(trained, tmp_path, f"images={root}/validation/6", f"gallery={gallery}"))

    train_rows = predict(predict_cfg(trained, tmp_path, f"images={root}/validation/6", "gallery_rows=train",
                                     "max_pictures=0"))
    assert len(train_rows["gallery"].table) == 24
    assert all("/train/" in n["path"] for r in train_rows["records"] for n in r["neighbours"])
    assert all(r["predicted_label"] in {0, 1, 2, 3} for r in train_rows["records"])


def test_bad_inputs_name_the_problem(trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"images={empty}: the folder holds no image files"):
        predict(predict_cfg(trained, tmp_path, f"images={empty}"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"junk")
    (junk / "b.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"none of the 2 image\(s\).*a.png \(.*\);.*b.jpg"):
        predict(predict_cfg(trained, tmp_path, f"images={junk}"))
    image = trained["root"] / "validation/4"
    with pytest.raises(ConfigError, match="k=19 but the gallery has only 18"):
        predict(predict_cfg(trained, tmp_path, f"images={image}", "k=19"))
    with pytest.raises(ConfigError, match="gallery_rows=test"):
        predict(predict_cfg(trained, tmp_path, f"images={image}", "gallery_rows=test"))
    with pytest.raises(ConfigError, match="dataset.root` is not set"):
        predict(predict_cfg(trained, tmp_path, f"images={image}", "dataset.root=???"))
    with pytest.raises(ConfigError, match="does not exist"):
        predict(predict_cfg(trained, tmp_path, f"images={image}", f"ckpt={tmp_path}/missing.ckpt"))
    with pytest.raises(ConfigError, match="device=gpu0` is not a torch device"):
        predict(predict_cfg(trained, tmp_path, f"images={image}", "device=gpu0"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda` but torch sees no GPU"):
            predict(predict_cfg(trained, tmp_path, f"images={image}", "device=cuda"))

    data = tmp_path / "data"
    write_tiny_dataset(data)
    bad = data / pd.read_csv(data / "dataset.csv").query("split == 'validation'")["path"].iloc[-1]
    bad.write_bytes(b"broken")
    with pytest.raises(ConfigError, match=f"1 gallery image\\(s\\) cannot be read: {bad}"):
        predict(predict_cfg(trained, tmp_path, f"images={image}", f"dataset.root={data}"))


def test_cli_writes_predictions_in_a_hydra_run_dir(trained, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    base = [sys.executable, "scripts/predict.py", f"paths.outputs_dir={tmp_path}/outputs",
            f"dataset.root={trained['root']}", f"ckpt={trained['ckpt']}", "transforms=digits", "num_threads=1", "k=3"]
    proc = subprocess.run(base + [f"images={trained['root']}/validation/5/*.png"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = list((tmp_path / "outputs" / "predict").glob("*/predictions_*.json"))
    assert len(outputs) == 1
    records = json.loads(outputs[0].read_text())
    assert len(records) == 6 and all(len(r["neighbours"]) == 3 for r in records)
    assert "6 image(s) predicted, 0 skipped" in proc.stdout and str(outputs[0]) in proc.stdout

    proc = subprocess.run(base + [f"images={tmp_path}/nothing_here"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and f"images={tmp_path}/nothing_here does not exist" in proc.stderr


def test_transform_mismatch_warns_and_ckpt_null_uses_the_extractor_config(trained, tmp_path, caplog):
    query = str(trained["root"] / "validation/4")
    with caplog.at_level(logging.WARNING):
        predict(predict_cfg(trained, tmp_path, f"images={query}", "max_pictures=0"))
    assert "differs from the training run" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        predict(predict_cfg(trained, tmp_path, f"images={query}", "max_pictures=0", "transforms=retrieval",
                            "transforms.train.height=32", "transforms.train.width=32"))
    assert "transforms.val differs from the training run's" in caplog.text
    assert str(trained["ckpt"].parent.parent / "config.yaml") in caplog.text

    out = predict(predict_cfg(trained, tmp_path, f"images={query}", "max_pictures=0", "ckpt=null",
                              "extractor.weights=null"))  # random init: no checkpoint, no download
    assert len(out["records"]) == 6 and not out["gallery"].embeddings_from_cache
    assert "checkpoint_sha256" not in json.loads((out["gallery"].cache_dir / "meta.json").read_text())["parts"]
