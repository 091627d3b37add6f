"""Config and CLI: strict params (errors name the key), -S overrides, help texts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from synthmri.cli import STAGES, main
from synthmri.config import ConfigError, Params, load_params


def test_repository_params_and_profiles_are_valid():
    for path in [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))]:
        assert isinstance(load_params(path), Params), path


def test_params_yaml_spells_out_every_default_with_the_code_default():
    """params.yaml is the user's map of every knob: each section key of the model appears in it, with the
    value the code would use without it (one default, written out), so neither can drift from the other."""
    tree = yaml.safe_load((REPO / "params.yaml").read_text())

    def keys(model, prefix=""):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if hasattr(value, "model_fields"):
                yield from keys(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    def lookup(tree, dotted):
        for part in dotted.split("."):
            tree = tree[part]
        return tree

    for key in keys(Params()):
        lookup(tree, key)  # KeyError names the missing key
    defaults, written = Params().model_dump(mode="json"), load_params(REPO / "params.yaml").model_dump(mode="json")
    for key in keys(Params()):
        assert lookup(written, key) == lookup(defaults, key), f"{key}: params.yaml and synthmri/config.py disagree"


# What the 2-hour profile may change: how many minutes each stage gets (and how often it checkpoints,
# validates and draws), the U-Net size those minutes buy and the guidance scale that U-Net needs (a better-trained
# model needs less: RESULTS.md, 21st session), never the recipe, the data or the gate, which params.yaml owns.
QUALITY_2H_BUDGET_KEYS = {
    "diffusion.unet.channels",
    "diffusion.unet.attention",
    "diffusion.unet.patch_size",
    "vqgan.train.steps",
    "vqgan.train.checkpoint_every",
    "vqgan.train.val_every",
    "diffusion.train.steps",
    "diffusion.train.checkpoint_every",
    "diffusion.train.val_every",
    "diffusion.train.sample_every",
    "diffusion.sampler.guidance_scale",
    "diffusion.sampler.rest_guidance_scale",
    "utility.repeats",
    "utility.pretrain.steps",
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_2h_profile_is_the_demo_recipe_with_more_minutes():
    """A profile that copies the recipe goes stale when the recipe changes (the 2-hour profile once kept v
    prediction and no acquisition covariates for five sessions): only budget keys may differ from params.yaml."""
    demo = _flat(load_params(REPO / "params.yaml").model_dump(mode="json"))
    longer = _flat(load_params(REPO / "profiles" / "quality-2h.yaml").model_dump(mode="json"))
    differing = {key for key in demo.keys() | longer.keys() if demo.get(key) != longer.get(key)}
    assert differing <= QUALITY_2H_BUDGET_KEYS, sorted(differing - QUALITY_2H_BUDGET_KEYS)
    assert longer["vqgan.train.steps"] > demo["vqgan.train.steps"]
    assert longer["diffusion.train.steps"] > demo["diffusion.train.steps"]


def test_a_stage_without_params_yaml_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no params.yaml in .*pass --params"):
        load_params()


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("normalize.sapcing=[1,1,1]", "unknown key 'normalize.sapcing'"),
        ("ingest.min_subjects=many", "'ingest.min_subjects'"),
        ("normalize.split.train=0.9", "'normalize.split'"),
        ("ingest.source=dicom", "'ingest.source'"),
        ("covariates.7.name=x", "'covariates.7'"),
        ("novalue", "must look like section.key=value"),
        ("sample.micro_batch=3", "shard_size .4. must be a multiple of micro_batch .3."),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_params(REPO / "params.yaml", [override])


def test_unknown_key_in_file_is_named(tmp_path: Path):
    text = (REPO / "params.yaml").read_text().replace("ingest:\n", "ingest:\n  fancy_option: 3\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match="unknown key 'ingest.fancy_option'"):
        load_params(tmp_path / "params.yaml")


def test_overrides_apply_like_dvc_exp_run():
    params = load_params(
        REPO / "params.yaml",
        [
            "ingest.source=bids",
            "ingest.root=/data/bids",
            "normalize.spacing=[1.5,1.5,1.5]",
            "covariates.0.range=[30,80]",
        ],
    )
    assert params.ingest.source == "bids" and params.ingest.root == "/data/bids"
    assert params.normalize.spacing == (1.5, 1.5, 1.5)
    assert params.covariate("age").range == (30.0, 80.0)


def test_cli_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "synthmri.cli", "--help"], capture_output=True, text=True, check=True)
    for stage in STAGES:
        assert stage.name in out.stdout
        sub = subprocess.run(
            [sys.executable, "-m", "synthmri.cli", stage.name, "--help"], capture_output=True, text=True, check=True
        )
        assert "-S KEY=VALUE" in sub.stdout and "--params" in sub.stdout


def test_cli_config_error_is_one_clear_message(capsys):
    assert main(["ingest", "--params", str(REPO / "params.yaml"), "-S", "ingest.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'ingest.bogus'" in err and "Traceback" not in err


def test_cli_stage_error_is_one_clear_message(tmp_path, capsys):
    code = main(
        [
            "ingest",
            "--params",
            str(REPO / "params.yaml"),
            "-S",
            "ingest.source=bids",
            "-S",
            f"ingest.root={tmp_path / 'nowhere'}",
        ]
    )
    assert code == 1
    assert "is not a folder" in capsys.readouterr().err
