"""benchmarks/quality.py's arm bookkeeping: sample and score rebuild each arm from the overrides it
was trained with (recorded in its ARM.pt), not from whatever the later command happens to say."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402  (benchmarks/ is not a package)
import quality_score  # noqa: E402


def save_arm(out: Path, arm: str, overrides: list[str]) -> None:
    # what train_dgan saves, less the weights, which these checks never load
    torch.save({"ema": {}, "overrides": overrides, "kimg": 1.0}, out / f"{arm}.pt")


def test_an_arm_left_undefined_is_sampled_as_it_was_trained(tmp_path):
    save_arm(tmp_path, "e2", ["gan.self_fake_every=2", "diffusion.prediction=eps"])
    for phase in ("sample", "score"):
        args = quality.parse_args(["--phase", phase, "--out", str(tmp_path), "--arms", "diffusion,e2"])
    cfg = quality.run_config(args, quality.trained_overrides(args, tmp_path, "e2"))
    # pneumonia32.yaml says v-prediction and one D step in 4: both come from the record instead
    assert cfg.gan.self_fake_every == 2 and cfg.diffusion.prediction == "eps"


def test_training_still_needs_the_arm_defined(tmp_path, capsys):
    save_arm(tmp_path, "e2", ["gan.self_fake_every=2"])
    for phase in ("train", "all"):
        with pytest.raises(SystemExit) as e:
            quality.parse_args(["--phase", phase, "--out", str(tmp_path), "--arms", "e2"])
        assert e.value.code == 2 and "unknown arm(s) ['e2']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # not trained under --out: nothing to read
        quality.parse_args(["--phase", "sample", "--out", str(tmp_path), "--arms", "e3"])
    assert e.value.code == 2


def test_a_command_that_contradicts_the_training_is_refused(tmp_path):
    save_arm(tmp_path, "hybrid", ["model.decoder_channels=[64,32,16,16]"])  # trained under a --set
    args = quality.parse_args(["--phase", "sample", "--out", str(tmp_path), "--arms", "hybrid"])
    with pytest.raises(SystemExit, match=r"arm hybrid was trained with \['model.decoder_channels"):
        quality.trained_overrides(args, tmp_path, "hybrid")
    same = quality.parse_args(["--phase", "sample", "--out", str(tmp_path), "--arms", "hybrid",
                               "--set", "model.decoder_channels=[64,32,16,16]"])
    assert quality.trained_overrides(same, tmp_path, "hybrid") == ["model.decoder_channels=[64,32,16,16]"]


def scored(arms: dict[str, float], reference_images: int = 1000) -> dict:
    return {"reference_images": reference_images, "floors": {},
            "arms": {a: {"kimg": 28.0} for a in arms},
            "runs": {a: {"ddim50": {"fid": fid, "kid": 0.01}} for a, fid in arms.items()}}


def test_scoring_some_arms_keeps_the_others_scores(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(scored({"hybrid": 1.9, "diffusion": 1.8, "e2": 1.7})))
    now = quality_score.keep_earlier_arms(scored({"e2": 1.6, "e2s8": 1.5}), path)
    # e2 is the new score; hybrid and diffusion come back from the earlier file, e2s8 is new
    assert {a: r["ddim50"]["fid"] for a, r in now["runs"].items()} == {
        "hybrid": 1.9, "diffusion": 1.8, "e2": 1.6, "e2s8": 1.5}
    assert set(now["arms"]) == set(now["runs"])
    # an arm without a column in the table reads '-', not a KeyError
    now["runs"]["e2s8"]["ddim10"] = {"fid": 2.0, "kid": 0.02}
    table = quality_score.markdown_table(now, (("ddim10", ""), ("ddim50", "")))
    assert "| hybrid | 28.0 | - | 1.90 | - | 0.0100 |" in table


def test_an_earlier_score_on_another_reference_is_set_aside(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(scored({"hybrid": 1.9}, reference_images=500)))
    now = quality_score.keep_earlier_arms(scored({"e2": 1.6}), path)
    assert set(now["runs"]) == {"e2"}
    assert json.loads((tmp_path / "results-earlier.json").read_text())["runs"]["hybrid"]["ddim50"]["fid"] == 1.9
