"""benchmarks/quality.py's arm bookkeeping: sample rebuilds each arm from the overrides it was
trained with (recorded in its ARM.pt), not from whatever the later command happens to say, and a
score of some arms keeps the folder's other scores."""
import json
import sys
from pathlib import Path

import pytest
import torch

from dgan.trainer import build_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402  (benchmarks/ is not a package)
import quality_score  # noqa: E402
import low_t  # noqa: E402
import sample_eta  # noqa: E402
import sample_floor  # noqa: E402
import step_count  # noqa: E402

NARROW = ["model.decoder_channels=[16,8,8,8]", "diffusion.prediction=eps"]


def save_arm(out: Path, arm: str, overrides: list[str], weights: bool = False) -> None:
    """What train_dgan saves; with `weights`, a real G built from the overrides (untrained)."""
    ema = {}
    if weights:
        args = quality.parse_args(["--out", str(out), "--device", "cpu"])
        G, _ = build_models(quality.run_config(args, overrides), torch.device("cpu"))
        ema = G.state_dict()
    torch.save({"ema": ema, "overrides": overrides, "kimg": 1.0}, out / f"{arm}.pt")


def test_an_arm_left_undefined_is_sampled_as_it_was_trained(tmp_path):
    # pneumonia32.yaml's decoder is [128,64,32,32]: these weights load only into the recorded one
    save_arm(tmp_path, "narrow", NARROW, weights=True)
    args = quality.parse_args(["--phase", "sample", "--out", str(tmp_path), "--arms", "narrow", "--device", "cpu"])
    x = quality.sample_arm(args, tmp_path, "narrow", "ddim", 2, 3)
    assert x.shape == (3, 1, 32, 32) and torch.isfinite(x).all()
    record = torch.load(tmp_path / "narrow.pt", weights_only=True)
    cfg = quality.run_config(args, quality.trained_overrides(args, "narrow", record))
    assert cfg.diffusion.prediction == "eps"  # pneumonia32 says v: the record wins
    quality.parse_args(["--phase", "score", "--out", str(tmp_path), "--arms", "diffusion,narrow"])  # no error


def test_training_still_needs_the_arm_defined(tmp_path, capsys):
    save_arm(tmp_path, "e2", ["gan.self_fake_every=2"])
    for phase in ("train", "all"):
        with pytest.raises(SystemExit) as e:
            quality.parse_args(["--phase", phase, "--out", str(tmp_path), "--arms", "e2"])
        assert e.value.code == 2 and "unknown arm(s) ['e2']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # not trained under --out: nothing to read
        quality.parse_args(["--phase", "sample", "--out", str(tmp_path), "--arms", "e3"])
    assert e.value.code == 2


def test_what_the_command_says_must_match_the_record(tmp_path):
    record = {"overrides": ["model.decoder_channels=[64,32,16,16]"]}  # a built-in arm trained under --set
    cmd = ["--phase", "sample", "--out", str(tmp_path), "--arms", "hybrid"]
    # nothing said: the record, even where the built-in recipe has moved on since
    assert quality.trained_overrides(quality.parse_args(cmd), "hybrid", record) == record["overrides"]
    same = quality.parse_args([*cmd, "--set", "model.decoder_channels=[64,32,16,16]"])
    assert quality.trained_overrides(same, "hybrid", record) == record["overrides"]
    with pytest.raises(SystemExit, match=r"arm hybrid was trained with .*leave out --set and --arm hybrid"):
        quality.trained_overrides(quality.parse_args([*cmd, "--set", "train.lr_g=1e-4"]), "hybrid", record)
    other = quality.parse_args([*cmd, "--arm", "hybrid:gan.adv_weight=0.1"])
    with pytest.raises(SystemExit, match="arm hybrid was trained with"):
        quality.trained_overrides(other, "hybrid", record)
    # an arm the command does not define, trained under --set: restating that --set is no contradiction
    e2 = {"overrides": ["model.decoder_channels=[64,32,16,16]", "gan.self_fake_every=2"]}
    assert quality.trained_overrides(same, "e2", e2) == e2["overrides"]
    # an ARM.pt from before the overrides were recorded: the command's, as before
    assert quality.trained_overrides(other, "hybrid", {"ema": {}}) == ["gan.adv_weight=0.1"]


def scored(arms: dict[str, float], **how) -> dict:
    results = {"preset": "ablation", "seed": 1, "reference_images": 1000, "frd_samples": 0, "floors": {},
               "arms": {a: {"kimg": 28.0} for a in arms},
               "runs": {a: {"ddim50": {"fid": fid, "kid": 0.01}} for a, fid in arms.items()}}
    return {**results, **how}


def test_scoring_some_arms_keeps_the_others_scores(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(scored({"hybrid": 1.9, "diffusion": 1.8, "e2": 1.7})))
    now = quality_score.keep_earlier_arms(scored({"e2": 1.6, "e2s8": 1.5}), path)
    # e2 is the new score; hybrid and diffusion come back from the earlier file, e2s8 is new
    assert {a: r["ddim50"]["fid"] for a, r in now["runs"].items()} == {
        "hybrid": 1.9, "diffusion": 1.8, "e2": 1.6, "e2s8": 1.5}
    assert set(now["arms"]) == set(now["runs"])
    # a cell or a floor metric that one command did not score reads '-', not a KeyError
    now["runs"]["e2s8"]["ddim10"] = {"fid": 2.0, "kid": 0.02, "frd": 3.0}
    now["floors"]["train500"] = {"fid": 0.05, "kid": 0.001}
    table = quality_score.markdown_table(now, (("ddim", 10), ("ddim", 50)))
    assert "| hybrid | 28.0 | - | 1.90 | - | 0.0100 | - | - |" in table
    assert "| real train500 | | 0.0500 | 0.0500 | 0.0010 | 0.0010 | - | - |" in table


def test_an_earlier_score_made_otherwise_is_set_aside(tmp_path):
    path = tmp_path / "results.json"
    for n, how in enumerate(({"reference_images": 500}, {"frd_samples": 1000}), start=1):
        path.write_text(json.dumps(scored({"hybrid": 1.9}, **how)))
        now = quality_score.keep_earlier_arms(scored({"e2": 1.6}), path)
        assert set(now["runs"]) == {"e2"}
        kept = json.loads((tmp_path / f"results-earlier-{n}.json").read_text())  # the first never overwritten
        assert kept["runs"]["hybrid"]["ddim50"]["fid"] == 1.9 and all(kept[k] == v for k, v in how.items())


def test_more_samples_extend_the_earlier_ones_as_one_run_would(tmp_path, monkeypatch):
    # batches of 2 stand in for quality's 500, so that a run of 4 images has two batches
    monkeypatch.setattr(quality, "SAMPLE_BATCH", 2)
    drawn = []  # the `first` of every sample_arm call that draws more than the one-image check
    real_sample_arm = quality.sample_arm

    def spy(args, out, arm, sampler, steps, n, first=0, sampling=()):
        if n > 1:
            drawn.append(first)
        return real_sample_arm(args, out, arm, sampler, steps, n, first, sampling)

    monkeypatch.setattr(quality, "sample_arm", spy)
    save_arm(tmp_path, "narrow", NARROW, weights=True)
    cmd = ["--phase", "sample", "--out", str(tmp_path), "--arms", "narrow", "--device", "cpu"]
    path = tmp_path / "samples-narrow-ddim10.pt"
    quality.phase_sample(quality.parse_args([*cmd, "--samples", "2"]), tmp_path)
    first = torch.load(path, weights_only=True)
    drawn.clear()
    quality.phase_sample(quality.parse_args([*cmd, "--samples", "4"]), tmp_path)
    extended = torch.load(path, weights_only=True)
    assert drawn == [2, 2]  # ddim10 and ddim50: only images 2 and 3 drawn
    assert extended.shape == (4, 1, 32, 32) and torch.equal(extended[:2], first)
    path.unlink()
    drawn.clear()
    quality.phase_sample(quality.parse_args([*cmd, "--samples", "4"]), tmp_path)
    assert drawn == [0]  # ddim10 from scratch; ddim50 already holds 4, so nothing is drawn
    assert torch.equal(torch.load(path, weights_only=True), extended)  # what one run of 4 makes
    # a file another seed (or other weights) made is drawn again in full, not extended
    torch.save(255 - first, path)
    assert quality.samples_to_keep(quality.parse_args(cmd), tmp_path, "narrow", "ddim", 10, path, 4) is None
    # and a float16 file from before the uint8 format, and DDPM (fresh noise per step), never
    torch.save(first.float().div(127.5).sub(1).half(), path)
    assert quality.samples_to_keep(quality.parse_args(cmd), tmp_path, "narrow", "ddim", 10, path, 4) is None
    assert quality.samples_to_keep(quality.parse_args(cmd), tmp_path, "narrow", "ddpm", 10, path, 4) is None
    with pytest.raises(SystemExit):
        quality.parse_args([*cmd, "--samples", "0"])


def test_a_score_at_another_sample_count_is_set_aside(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(scored({"hybrid": 1.9})))  # no "samples": written before it was recorded
    now = quality_score.keep_earlier_arms(scored({"e2": 1.6}, samples=500), path, {"samples": 500})
    assert set(now["runs"]) == {"hybrid", "e2"}
    now = quality_score.keep_earlier_arms(scored({"e2": 1.6}, samples=1000), path, {"samples": 500})
    assert set(now["runs"]) == {"e2"} and (tmp_path / "results-earlier-1.json").is_file()


def folder_with_a_scored_arm(out: Path, monkeypatch, script) -> list:
    """A quality.py folder with one untrained narrow arm and 4 random reals; `script`'s score_set is
    replaced by one that keeps each scored set, in the list returned, and gives FID 2, 3, ... in turn."""
    save_arm(out, "narrow", NARROW, weights=True)
    torch.save({"ref_images": torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)}, out / "data.pt")
    scored = []

    def fake_score(real, fake, extractor, frd_samples):
        scored.append(fake)
        return {"fid": 1.0 + len(scored), "kid": 0.0}

    monkeypatch.setattr(script, "score_set", fake_score)
    return scored


def test_sample_floor_samples_the_same_noise_with_and_without_the_floor(tmp_path, monkeypatch, capsys):
    """benchmarks/sample_floor.py: each arm sampled twice from the same noise, down to t = 0 and with
    diffusion.sample_t_min; at DDIM 50 the grids differ below t = 9, at DDIM 10 they are the same grid."""
    scored = folder_with_a_scored_arm(tmp_path, monkeypatch, sample_floor)
    cmd = [str(tmp_path), "--seed", "0", "--arms", "narrow", "--samples", "2"]
    sample_floor.main(cmd)
    assert len(scored) == 2 and scored[0].dtype == torch.uint8 and scored[0].shape == (2, 1, 32, 32)
    assert not torch.equal(scored[0], scored[1])  # t_min 0 against 9 at DDIM 50
    assert "| narrow | 2.000 | 3.000 | 1.500 |" in capsys.readouterr().out
    # both cells are kept and reused, and a smaller --samples leaves the files whole
    first_two = list(scored)
    scored.clear()
    sample_floor.main([*cmd[:-1], "1"])
    assert [x.shape[0] for x in scored] == [1, 1]
    assert all(torch.equal(x, y[:1]) for x, y in zip(scored, first_two))
    for name in ("samples-narrow-ddim50-tmin0.pt", "samples-narrow-ddim50-tmin9.pt"):
        assert torch.load(tmp_path / name, weights_only=True).shape[0] == 2
    assert capsys.readouterr().err.count("0 drawn") == 2
    # t_min 0 is read from quality.py's own file, which is never written
    (tmp_path / "samples-narrow-ddim50-tmin0.pt").rename(tmp_path / "samples-narrow-ddim50.pt")
    scored.clear()
    sample_floor.main(cmd)
    assert torch.equal(scored[0], first_two[0]) and not (tmp_path / "samples-narrow-ddim50-tmin0.pt").exists()
    # a file this arm and seed would not draw is refused, not overwritten
    torch.save(255 - first_two[1], tmp_path / "samples-narrow-ddim50-tmin9.pt")
    with pytest.raises(SystemExit, match="was not drawn from narrow.pt with --seed 0"):
        sample_floor.main(cmd)
    assert torch.equal(torch.load(tmp_path / "samples-narrow-ddim50-tmin9.pt", weights_only=True), 255 - first_two[1])
    with pytest.raises(SystemExit, match="'peer' is the diffusers DDPM"):
        sample_floor.main([*cmd[:3], "--arms", "narrow,peer"])
    scored.clear()
    sample_floor.main([*cmd, "--steps", "10"])
    assert torch.equal(scored[0], scored[1])  # the 10-step grid already ends at t = 9


def test_step_count_scores_each_cell_and_summarises_the_folders(tmp_path, monkeypatch, capsys):
    """benchmarks/step_count.py: one cell per sampler, step count and floor from the same noise; edge
    energy against the reals; scores kept per folder and summarised over folders with wins."""
    scored = folder_with_a_scored_arm(tmp_path, monkeypatch, step_count)
    cmd = [str(tmp_path), "--seed", "0", "--arms", "narrow", "--samples", "2", "--cells", "ddim50,ddim50t9,dpmpp2m3"]
    step_count.main(cmd)
    assert len(scored) == 3 and all(x.shape == (2, 1, 32, 32) for x in scored)
    assert not torch.equal(scored[0], scored[1]) and not torch.equal(scored[0], scored[2])
    saved = json.loads((tmp_path / "step_count.json").read_text())
    assert list(saved["narrow"]) == ["ddim50", "ddim50t9", "dpmpp2m3"] and saved["seed"] == 0
    assert saved["narrow"]["ddim50t9"]["fid"] == 3.0 and saved["narrow"]["ddim50"]["edge"] > 0
    assert torch.equal(torch.load(tmp_path / "samples-narrow-ddim50-tmin9.pt", weights_only=True), scored[1])
    assert (tmp_path / "grid-narrow-ddim50t9.png").is_file()  # for grids.py's narrow@ddim50t9
    # quality.py's own file is read when it holds the cell, never written
    stock = scored[0].clone()
    stock[1] = 255 - stock[1]  # the probe compares image 0 only: image 1 shows which set was scored
    torch.save(stock, tmp_path / "samples-narrow-ddim50.pt")
    scored.clear()
    step_count.main([*cmd[:-1], "ddim50"])
    assert torch.equal(scored[0], stock)
    with pytest.raises(SystemExit, match="is not SAMPLERSTEPS"):
        step_count.main([*cmd[:-1], "ddpm3"])
    # a second folder, then the summary: the same arm twice, so no wins and no change
    other = tmp_path / "seed1"
    other.mkdir()
    (other / "step_count.json").write_text(json.dumps({"narrow": saved["narrow"], "twin": saved["narrow"], "seed": 1}))
    (tmp_path / "step_count.json").write_text(json.dumps({"narrow": saved["narrow"], "twin": saved["narrow"]}))
    capsys.readouterr()
    step_count.main(["summary", str(tmp_path), str(other), "--arms", "narrow,twin"])
    out = capsys.readouterr().out
    assert "| ddim50t9 | 3.000 / 3.000 | +0.0% | 0 of 2 |" in out


def test_sample_eta_compares_fresh_noise_with_quality_pys_own_samples(tmp_path, monkeypatch, capsys):
    """benchmarks/sample_eta.py: eta 0 is quality.py's own file, only read, when this arm and seed drew
    it; an eta > 0 cell starts from the same initial noise, differs from eta 0, and a rerun draws it
    again bit for bit."""
    scored = folder_with_a_scored_arm(tmp_path, monkeypatch, sample_eta)
    cmd = [str(tmp_path), "--seed", "0", "--arms", "narrow", "--samples", "2", "--steps", "10"]
    sample_eta.main(cmd)  # no quality.py file: eta 0 drawn here, from quality.py's noise
    args = quality.parse_args(["--out", str(tmp_path), "--device", "cpu"])
    stock = quality.to_uint8(quality.sample_arm(args, tmp_path, "narrow", "ddim", 10, 2))
    assert (scored[0].int() - stock.int()).abs().max() <= 2  # batch-size rounding only
    assert scored[1].shape == (2, 1, 32, 32) and not torch.equal(scored[0], scored[1])
    assert "| narrow | 2.000 | 3.000 | 0.0000 / 0.0000 |" in capsys.readouterr().out
    eta1 = scored[1]
    marked = stock.clone()
    marked[1] = 255 - marked[1]  # the probe compares image 0 only: image 1 shows which set was scored
    torch.save(marked, tmp_path / "samples-narrow-ddim10.pt")
    scored.clear()
    sample_eta.main(cmd)
    assert torch.equal(scored[0], marked) and torch.equal(scored[1], eta1)
    assert torch.equal(torch.load(tmp_path / "samples-narrow-ddim10.pt", weights_only=True), marked)
    # a file these weights and this seed do not draw is not scored (nor touched): eta 0 is drawn again
    torch.save(255 - stock, tmp_path / "samples-narrow-ddim10.pt")
    scored.clear()
    sample_eta.main(cmd)
    assert (scored[0].int() - stock.int()).abs().max() <= 2
    # with a floor, eta 0 is sample_floor.py's file for it
    torch.save(marked, tmp_path / "samples-narrow-ddim10-tmin9.pt")
    scored.clear()
    sample_eta.main([*cmd, "--t-min", "9"])
    assert torch.equal(scored[0], marked) and torch.equal(scored[1], eta1)  # the 10-step grid ends at t = 9
    with pytest.raises(SystemExit, match="each must be in"):
        sample_eta.main([*cmd, "--etas", "0"])


def test_low_t_fits_a_linear_denoiser_that_beats_the_noisy_input(tmp_path, capsys):
    """benchmarks/low_t.py: on smooth images a fitted 7x7 filter removes much of the noise at t = 39
    (its RMSE well under the noisy input's), and each arm gets a finite column."""
    save_arm(tmp_path, "narrow", NARROW, weights=True)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(80, 1, 40, 40), 9, stride=1)  # 32 px, smooth
    images = (smooth - smooth.amin()) / (smooth.amax() - smooth.amin()) * 255
    torch.save({"train_images": images[:64].to(torch.uint8), "ref_images": images[64:].to(torch.uint8)},
               tmp_path / "data.pt")
    low_t.main([str(tmp_path), "--seed", "0", "--arms", "narrow", "--t", "39"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 39 |")][0]
    noisy, linear, narrow = (float(v) for v in row.strip("| ").split(" | ")[1:])
    assert noisy > 0 and linear < 0.7 and narrow == narrow and narrow > 0
