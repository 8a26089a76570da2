"""configs/extractor/<OML zoo key>.yaml: one per key of OML's registry, exactly what scripts/make_zoo_configs.py
writes, every one composes and builds (random init, parameters on the meta device) with the embedding size it
states; one config per family runs a real forward pass (random init: no download here)."""
from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from metriclab.core.checkpoint import checked_architecture
from metriclab.core.paths import CONFIGS_DIR, REPO_ROOT
from metriclab.models.extractors import build_extractor
from metriclab.models.freezing import resolve_submodule_names

FOLDER = CONFIGS_DIR / "extractor"
#: keys the issue names (OML 4.0's zoo): a registry that loses one of these is not the zoo this repo was built on
NAMED = {"resnet50_imagenet1k_v1", "resnet50_moco_v2", "vits16_dino", "vitb8_dino", "vits14_dinov2",
         "vits14_reg_dinov2", "vitl14_reg_dinov2", "openai_vitb16_224", "sber_vitl14_224", "vitb32_unicom",
         "vitl14_336px_unicom", "vits16_sop", "vits16_inshop", "vits16_cars", "vits16_cub",
         "vits16_224_mlp_384_inshop"}
#: one key per family (and per ViT kind) for a real forward pass: (key, input side; None = the stated size)
REPRESENTATIVES = [("resnet50_moco_v2", 64), ("vits16_sop", 64), ("vits14_reg_dinov2", 56),
                   ("sber_vitb32_224", None), ("vitb32_unicom", None), ("vits16_224_mlp_384_inshop", 64)]
STATED = re.compile(r"^# embedding size: (\d+) \| input size: (\d+)x(\d+) ", re.MULTILINE)


def _load_script():
    spec = importlib.util.spec_from_file_location("make_zoo_configs", REPO_ROOT / "scripts" / "make_zoo_configs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def zoo():
    script = _load_script()
    return script, script.zoo_entries()


def stated(key: str):
    """(embedding size, (H, W)) the config file states."""
    match = STATED.search((FOLDER / f"{key}.yaml").read_text(encoding="utf-8"))
    assert match, f"configs/extractor/{key}.yaml states no sizes"
    return int(match[1]), (int(match[2]), int(match[3]))


def test_files_are_exactly_what_the_script_writes_from_the_registry(zoo, monkeypatch):
    script, entries = zoo
    keys = [key for _, _, key, _ in script.registry()]
    assert [e.key for e in entries] == keys and len(keys) == len(set(keys)) == 31  # OML 4.0.0: 31 zoo keys
    assert NAMED <= set(keys)
    generated = {p.name for p in script.generated_files(FOLDER)}
    assert generated == {f"{k}.yaml" for k in keys}, "OML's registry gained or lost a key: run the script"
    for name, text in script.expected_files(entries).items():
        assert (FOLDER / name).read_text(encoding="utf-8") == text, f"{name} differs: run the script"
    monkeypatch.setattr(script, "zoo_entries", lambda: entries)  # computed once for the module
    assert script.main(["--check"]) == 0


def test_stated_sizes_and_values(zoo):
    _, entries = zoo
    by_key = {e.key: e for e in entries}
    # by hand, from the models' papers: the families' embedding widths and OML's input sizes
    assert [by_key[k].embedding_size for k in ("resnet18_imagenet1k_v1", "resnet50_moco_v2", "vits16_dino",
                                               "vitb14_reg_dinov2", "vitl14_dinov2", "openai_vitb32_224",
                                               "sber_vitl14_224", "vitl14_336px_unicom",
                                               "vits16_224_mlp_384_inshop")] == [512, 2048, 384, 768, 1024, 512,
                                                                                 768, 768, 384]
    assert by_key["vitl14_336px_unicom"].input_hw == (336, 336) and by_key["vits16_dino"].input_hw == (224, 224)
    assert not by_key["openai_vitb16_224"].other_size_runs and by_key["vits16_dino"].other_size_runs
    for e in entries:
        assert stated(e.key) == (e.embedding_size, e.input_hw)
        values = yaml.safe_load((FOLDER / f"{e.key}.yaml").read_text(encoding="utf-8"))
        assert values == {**e.args, "freeze_bn": False, "trainable": None}
        assert values["weights"] == e.key
        # what a checkpoint stores of it is on the allow-list, unchanged
        assert checked_architecture(e.args, "test") == e.args


def test_old_vits16_dino_config_kept_its_values():
    values = yaml.safe_load((FOLDER / "vits16_dino.yaml").read_text(encoding="utf-8"))
    assert values == {"_target_": "oml.models.ViTExtractor", "weights": "vits16_dino", "arch": "vits16",
                      "normalise_features": False, "use_multi_scale": False, "freeze_bn": False, "trainable": None}


def test_every_zoo_config_composes_and_builds_with_its_stated_size(zoo):
    script, entries = zoo
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        for e in entries:
            cfg = compose(config_name="train", overrides=[f"extractor={e.key}", "extractor.weights=null"])
            with script.params_on_meta():
                model = build_extractor(cfg.extractor)
            assert type(model).__module__ + "." + type(model).__name__ in (e.args["_target_"], _defined(e))
            assert model.feat_dim == stated(e.key)[0], e.key
            example = e.trainable_example.strip("[]").split(", ")
            assert len(resolve_submodule_names(model, example)) == len(example), e.key


def _defined(e) -> str:
    """Where `oml.models.X` is defined (the config names the short path)."""
    from hydra.utils import get_class

    cls = get_class(e.args["_target_"])
    return f"{cls.__module__}.{cls.__name__}"


@pytest.mark.parametrize("key, side", REPRESENTATIVES)
def test_one_config_per_family_runs_a_forward_pass(key, side):
    embedding_size, (h, w) = stated(key)
    node = OmegaConf.load(FOLDER / f"{key}.yaml")
    node.weights = None
    torch.manual_seed(0)
    model = build_extractor(node).eval()
    assert model.feat_dim == embedding_size
    x = torch.rand(2, 3, side or h, side or w)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, embedding_size) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # the two images differ, so do their embeddings
    if node.get("normalise_features"):
        assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_script_reports_drift(zoo, monkeypatch, capsys):
    script, entries = zoo
    monkeypatch.setattr(script, "zoo_entries", lambda: entries[:-1] + [replace(entries[0], key="resnet_new_key")])
    assert script.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "differs or missing: configs/extractor/resnet_new_key.yaml" in out
    assert f"not a zoo key any more: configs/extractor/{entries[-1].key}.yaml" in out
    assert not (FOLDER / "resnet_new_key.yaml").exists()  # --check writes nothing


def test_script_stops_on_a_class_it_does_not_know(zoo, monkeypatch):
    script, _ = zoo

    class NewExtractor(torch.nn.Module):
        pretrained_models = {"new_key": {"init_args": {"arch": "x"}}}

    monkeypatch.setattr(script, "registry", lambda: [("new", NewExtractor, "new_key",
                                                      NewExtractor.pretrained_models["new_key"])])
    with pytest.raises(SystemExit, match="does not know: .*NewExtractor"):
        script.zoo_entries()


def test_generated_files_are_found_by_their_mark(zoo, tmp_path: Path):
    script, _ = zoo
    (tmp_path / "mine.yaml").write_text("_target_: x\n")
    (tmp_path / "gen.yaml").write_text(f"# {script.MARK} from OML\n_target_: x\n")
    assert [p.name for p in script.generated_files(tmp_path)] == ["gen.yaml"]
