"""python -m dgan.evaluate on a tiny trained run: the CLI as users run it, torchrun gathering, fail-fast."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dgan.checkpoint import load_checkpoint

from cli_helpers import REPO, run_cli, tiny_run

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane

SHARED_NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"
EVAL = ["--num-samples", "8", "--sampler", "ddim", "--steps", "4", "--batch-size", "4", "--seed", "0",
        "--t-values", "10,50"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.getbasetemp() / "dgan-tiny-run")


@pytest.fixture(scope="module")
def checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("ckpt-0*.pt"))[-1]


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dgan.metrics import build_tiny_extractor

    return build_tiny_extractor(tmp_path_factory.mktemp("extractor") / "tiny.pt")


@pytest.fixture(scope="module")
def loaded(checkpoint: Path):
    from dgan.generation import load_generator

    return load_generator(checkpoint, torch.device("cpu"))


@pytest.fixture(autouse=True)
def one_thread():
    """In-process work on one thread, like the subprocesses; the session's setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _evaluate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli([sys.executable, "-m", "dgan.evaluate", *args], **env)


# --------------------------------------------------------------------------------------------------
# The CLI, as the README shows it
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_eval(run_dir, extractor) -> dict:
    """The README command, run once: its argv, its JSON report and its console output."""
    # --batch-size 1 makes the torchrun test below comparable bit for bit (see its comment).
    cmd = ["--fid", "--kid", "--psnr", "--ssim", "--run", str(run_dir), "--num-samples", "7", "--sampler", "ddim",
           "--steps", "4", "--batch-size", "1", "--seed", "3", "--t-values", "10,50", "--recon-images", "16",
           "--feature-extractor", str(extractor)]
    r = _evaluate(*cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    step = load_checkpoint(sorted((run_dir / "checkpoints").glob("ckpt-0*.pt"))[-1])["metadata"]["step"]
    path = run_dir / "eval" / f"eval-{step:09d}.json"
    return {"cmd": cmd, "path": path, "report": json.loads(path.read_text()), "stdout": r.stdout}


def test_cli_writes_the_json_report(user_eval, run_dir, checkpoint, extractor):
    report, trainer = user_eval["report"], load_checkpoint(checkpoint)["state"]["trainer"]
    metrics = report["metrics"]
    assert user_eval["path"].name == f"eval-{trainer['step']:09d}.json"
    assert set(metrics) == {"fid", "kid", "kid_std", "psnr_t10", "ssim_t10", "psnr_t50", "ssim_t50"}
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["psnr_t10"] > metrics["psnr_t50"]  # less noise, better one-step reconstruction
    assert report["checkpoint"] == {"path": str(checkpoint.resolve()), "step": trainer["step"],
                                    "images_seen": trainer["images_seen"]}
    assert (report["num_samples"], report["sampler"], report["steps"], report["seed"]) == (7, "ddim", 4, 3)
    assert report["reference"]["split"] == "val" and report["reference"]["source"] == "phantoms"
    assert report["extractor"]["name"] == "torchscript" and report["extractor"]["path"] == str(extractor)
    assert report["world_size"] == 1 and report["t_values"] == [10, 50]
    assert "fid" in user_eval["stdout"] and "psnr_t10" in user_eval["stdout"]  # the console table
    assert (run_dir / "eval" / f"samples-{trainer['step']:09d}.png").is_file()


def test_cli_logs_to_the_training_run_in_mlflow(user_eval, run_dir, checkpoint):
    import mlflow

    trainer = load_checkpoint(checkpoint)["state"]["trainer"]
    metrics = user_eval["report"]["metrics"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    mrun = client.get_run(trainer["mlflow_run_id"])
    assert user_eval["report"]["mlflow_run_id"] == trainer["mlflow_run_id"]
    history = client.get_metric_history(mrun.info.run_id, "eval/fid")
    assert (trainer["step"], metrics["fid"]) in [(m.step, m.value) for m in history]
    assert mrun.data.metrics["eval/ssim_t50"] == metrics["ssim_t50"]
    assert mrun.data.tags["eval.step"] == str(trainer["step"])
    assert mrun.data.tags["eval.sampler"] == "ddim 4 steps, eta 0.0"  # how the scored samples were drawn
    assert mrun.info.status == "FINISHED"  # reopening the run for evaluation did not leave it RUNNING
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id, "eval")}
    assert {f"eval/{user_eval['path'].name}", f"eval/samples-{trainer['step']:09d}.png"} <= artifacts


def test_cli_same_command_gives_the_same_numbers(user_eval):
    again = _evaluate(*user_eval["cmd"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(user_eval["path"].read_text())["metrics"] == user_eval["report"]["metrics"]


def test_missing_inception_weights_fail_fast_without_download(run_dir, tmp_path):
    from dgan.metrics import inception_weights_cache_path

    torch_home = tmp_path / "torch-home"
    torch_home.mkdir()
    start = time.perf_counter()
    r = _evaluate("--fid", "--run", str(run_dir), TORCH_HOME=str(torch_home))
    elapsed = time.perf_counter() - start
    assert r.returncode != 0
    assert inception_weights_cache_path().name in r.stderr  # names the file
    assert str(torch_home / "hub" / "checkpoints") in r.stderr and "https://" in r.stderr  # where to, where from
    assert "--fid-weights" in r.stderr
    assert "dgan.evaluate: fid of" not in r.stdout  # stopped before loading the checkpoint
    assert not any(torch_home.rglob("*"))  # no (partial) download was started
    if elapsed >= 5.0:
        # The check needs the CLI's own imports (torch, torch-fidelity, the evaluation modules); on a
        # slow or loaded machine those alone can exceed 5 s, so there the bound is that import time
        # plus 1.5 s: no work beyond the imports happens before the check. Under load two runs of the
        # same imports differ by a share of their time (11.6 s against 9.8 s seen with the suite beside
        # a benchmark), so the slack grows with the floor; a download or checkpoint load would not fit.
        start = time.perf_counter()
        run_cli([sys.executable, "-c", "import dgan.evaluate, dgan.metrics"])
        floor = time.perf_counter() - start
        assert elapsed < 1.3 * floor + 1.5, (elapsed, floor)


def test_torchrun_two_ranks_gather_exactly_n_samples_equal_to_one_process(user_eval, run_dir, loaded, tmp_path):
    from dgan.generation import generate_indices
    from dgan.metrics import to_uint8

    # Same options as the single-process README run (batch size 1: CPU conv kernels round differently
    # for different batch compositions, so only equal batches can be compared bit for bit).
    cmd = [a if a != "--run" else "--run-dir" for a in user_eval["cmd"]]  # torchrun owns --run-path
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    two = run_cli([*launcher, "--standalone", "--nproc_per_node=2", "-m", "dgan.evaluate", *cmd, "--no-mlflow",
                "--device", "cpu", "--dump-samples", str(tmp_path / "two.pt"), "--out", str(tmp_path / "two.json")])
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    report = json.loads((tmp_path / "two.json").read_text())
    assert report["world_size"] == 2 and report["num_samples"] == 7
    assert report["metrics"] == user_eval["report"]["metrics"]  # the same numbers as one process
    dump = torch.load(tmp_path / "two.pt")
    n = 7  # odd: the ranks' shares differ in size (4 and 3)
    assert dump["images"].shape == (n, 1, 32, 32) and dump["images"].dtype == torch.uint8
    assert dump["ranks"].tolist() == [i % 2 for i in range(n)]  # index i came from rank i % 2
    assert len({img.numpy().tobytes() for img in dump["images"]}) == n  # no duplicates
    G, cfg, diffusion, _ = loaded  # one thread here, as in the subprocesses (see one_thread)
    alone = generate_indices(G, diffusion, list(range(n)), sampler="ddim", steps=4, seed=3, channels=1,
                             image_size=32, num_classes=0, batch_size=1, device=torch.device("cpu"))
    assert torch.equal(dump["images"], to_uint8(alone))  # in index order, equal to one process's samples


def test_t_min_reaches_the_sampler_and_the_report(run_dir, checkpoint, loaded, extractor, tmp_path):
    """--t-min 9 samples with no step below t = 9 (the tiny run, T = 100, ends its 4 DDIM steps at
    t = 0, so every image changes) and records the floor; --t-min 100 on T = 100 is a usage error
    that writes nothing."""
    from dgan.generation import generate_indices, load_generator
    from dgan.metrics import to_uint8

    cmd = ["--fid", "--run", str(run_dir), *EVAL[:-2], "--no-mlflow", "--feature-extractor", str(extractor)]
    r = _evaluate(*cmd, "--t-min", "9", "--dump-samples", str(tmp_path / "f.pt"), "--out", str(tmp_path / "f.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "f.json").read_text())["t_min"] == 9
    images = torch.load(tmp_path / "f.pt", weights_only=True)["images"]
    grids = {}
    for t_min, (G, _, diffusion, _) in {0: loaded, 9: load_generator(checkpoint, torch.device("cpu"), 9)}.items():
        grids[t_min] = to_uint8(generate_indices(G, diffusion, list(range(8)), sampler="ddim", steps=4, seed=0,
                                                 channels=1, image_size=32, num_classes=0, batch_size=4,
                                                 device=torch.device("cpu")))
    assert torch.equal(images, grids[9])
    assert all(not torch.equal(a, b) for a, b in zip(grids[0], grids[9]))
    bad = _evaluate(*cmd, "--t-min", "100", "--out", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "--t-min 100" in bad.stderr and not (tmp_path / "bad.json").exists()


def test_eta_reaches_ddim_and_the_report(run_dir, checkpoint, loaded, extractor, tmp_path):
    """--eta 1 samples DDIM with DDPM's fresh noise per step (the same images as generate_indices with
    eta=1, none equal to eta 0's) and records it; an eta another sampler would ignore is a usage error."""
    from dgan.generation import generate_indices
    from dgan.metrics import to_uint8

    cmd = ["--fid", "--run", str(run_dir), *EVAL[:-2], "--no-mlflow", "--feature-extractor", str(extractor)]
    r = _evaluate(*cmd, "--eta", "1", "--dump-samples", str(tmp_path / "e.pt"), "--out", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "e.json").read_text())["eta"] == 1.0 and "eta 1.0" in r.stdout
    images = torch.load(tmp_path / "e.pt", weights_only=True)["images"]
    G, _, diffusion, _ = loaded
    grids = {eta: to_uint8(generate_indices(G, diffusion, list(range(8)), sampler="ddim", steps=4, seed=0, channels=1,
                                            image_size=32, num_classes=0, batch_size=4, device=torch.device("cpu"),
                                            eta=eta)) for eta in (0.0, 1.0)}
    assert torch.equal(images, grids[1.0])
    assert all(not torch.equal(a, b) for a, b in zip(grids[0.0], grids[1.0]))
    for bad, needle in ((["--eta", "0.5", "--sampler", "dpmpp2m"], "--eta is DDIM's"), (["--eta", "2"], "--eta 2.0")):
        out = _evaluate(*cmd, *bad, "--out", str(tmp_path / "bad.json"))
        assert out.returncode == 2 and needle in out.stderr and not (tmp_path / "bad.json").exists()


# --------------------------------------------------------------------------------------------------
# The pieces, in process
# --------------------------------------------------------------------------------------------------


def test_newest_run_is_the_default(checkpoint, tmp_path):
    from dgan.errors import DganError
    from dgan.rundir import find_checkpoint

    root = tmp_path / "runs"
    with pytest.raises(DganError, match="no run with checkpoints"):
        find_checkpoint(None, None, str(root))
    paths = {}
    for name in ("a", "b"):
        paths[name] = root / name / "checkpoints" / "ckpt-000000005.pt"
        paths[name].parent.mkdir(parents=True)
        shutil.copy(checkpoint, paths[name])
    for newest, oldest in (("b", "a"), ("a", "b")):
        now = time.time()
        os.utime(paths[oldest], (now - 100, now - 100))
        os.utime(paths[newest], (now, now))
        assert find_checkpoint(None, None, str(root)) == (paths[newest].resolve(), (root / newest).resolve())


def test_samples_do_not_depend_on_batch_size_or_rank_split(loaded):
    from dgan.generation import generate_indices, initial_noise, rank_indices

    G, cfg, diffusion, _ = loaded
    # 10 steps, not 2: x0_hat at t=T-1 divides by sqrt(alpha_bar_T) ~ 0.007, which magnifies the kernels'
    # batch-size rounding 150x; a 2-step DDIM rests its whole result on that one prediction.
    kw = dict(sampler="ddim", steps=10, seed=5, channels=1, image_size=32, num_classes=0, device=torch.device("cpu"))
    whole = generate_indices(G, diffusion, list(range(5)), batch_size=5, **kw)
    shares = [rank_indices(5, r, 2) for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    split = torch.empty_like(whole)
    for share in shares:
        split[share] = generate_indices(G, diffusion, share, batch_size=1, **kw)
    # Equal up to float rounding between batch compositions (CPU conv kernels differ by batch size).
    assert torch.allclose(whole, split, atol=1e-3)
    assert torch.equal(initial_noise([4], 5, (1, 32, 32))[0], initial_noise(range(5), 5, (1, 32, 32))[4])
    assert not torch.allclose(initial_noise([4], 5, (1, 32, 32)), initial_noise([4], 6, (1, 32, 32)))


def test_gather_refuses_duplicates_and_gaps():
    from dgan.errors import EvalError
    from dgan.generation import gather_in_order

    images = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1)
    ordered, ranks = gather_in_order([2, 0, 1], images, 3)
    assert ordered.flatten().tolist() == [1, 2, 0] and ranks.tolist() == [0, 0, 0]
    with pytest.raises(EvalError, match="expected exactly 0..2"):
        gather_in_order([0, 0, 1], images, 3)
    with pytest.raises(EvalError, match="expected exactly 0..3"):
        gather_in_order([0, 1, 2], images, 4)


class _Oracle(torch.nn.Module):
    """Predicts the exact target (eps or v, as the diffusion says) of x_t for known x0: the one-step
    reconstruction is then perfect."""

    def __init__(self, x0: torch.Tensor, diffusion) -> None:
        super().__init__()
        self.x0, self.diffusion = x0, diffusion
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x_t, t, y=None):
        return self.diffusion.training_target(self.x0, t, self.diffusion.predict_eps(x_t, t, self.x0))


def test_reconstruction_metrics_score_an_oracle_as_perfect(loaded):
    from dgan.scoring import reconstruction_metrics
    from dgan.data.synthetic import make_phantoms

    _, _, diffusion, _ = loaded
    images, _ = make_phantoms(4, 32, 0)
    x0 = torch.from_numpy(images).float().div(127.5).sub(1).reshape(4, 1, 32, 32)
    oracle = _Oracle(x0, diffusion).train()
    scores = reconstruction_metrics(oracle, diffusion, x0, None, (10, 90), seed=0, batch_size=4,
                                    device=torch.device("cpu"))
    assert set(scores) == {"psnr_t10", "ssim_t10", "psnr_t90", "ssim_t90"}
    assert scores["psnr_t90"] > 60 and scores["ssim_t90"] > 0.999
    assert oracle.training  # mode restored
    blind = reconstruction_metrics(_Oracle(torch.zeros_like(x0), diffusion), diffusion, x0, None, (90,), seed=0,
                                   batch_size=4, device=torch.device("cpu"))
    assert blind["psnr_t90"] < 30


def test_evaluate_generator_returns_only_the_requested_metrics(loaded, extractor, tmp_path):
    from dgan.scoring import evaluate_generator

    G, cfg, diffusion, _ = loaded
    G.train()
    rng = torch.get_rng_state()
    metrics = evaluate_generator(G, diffusion, cfg, num_samples=4, sampler="ddim", steps=2, seed=0,
                                 metrics=["fid", "psnr"], extractor_path=extractor, device=torch.device("cpu"),
                                 t_values=(10,), cache_dir=tmp_path / "fid-cache")
    assert set(metrics) == {"fid", "psnr_t10"} and all(math.isfinite(v) for v in metrics.values())
    assert G.training  # the trainer's G keeps its mode
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG stream is untouched
    assert any((tmp_path / "fid-cache").iterdir())  # reference statistics were cached
    G.eval()


def test_sharpness_is_the_samples_edge_energy_over_the_references(loaded, monkeypatch):
    """--sharpness: edge energy falls when images are blurred and is 0 for flat ones; the metric is the
    samples' over the reference's, needs no feature extractor, and a flat reference is a clear error."""
    import dgan.scoring
    from dgan.errors import EvalError
    from dgan.pixels import edge_energy, to_uint8
    from dgan.reference import load_reference

    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    blurred = torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1).round().to(torch.uint8)
    assert edge_energy(blurred) < 0.5 * edge_energy(images)
    assert edge_energy(torch.full((2, 1, 8, 8), 7, dtype=torch.uint8)) == 0.0
    G, cfg, diffusion, _ = loaded
    request = dict(num_samples=4, sampler="ddim", steps=2, seed=0, metrics=["sharpness"], device=torch.device("cpu"))
    result = dgan.scoring.run_evaluation(G, diffusion, cfg, **request)
    real, labels = load_reference(cfg, "val")
    assert set(result.metrics) == {"sharpness"}
    assert result.metrics["sharpness"] == pytest.approx(edge_energy(result.samples) / edge_energy(to_uint8(real)))
    monkeypatch.setattr(dgan.scoring, "load_reference", lambda *a: (torch.zeros_like(real), labels))
    with pytest.raises(EvalError, match="reference images are flat"):
        dgan.scoring.run_evaluation(G, diffusion, cfg, **request)


def test_reference_split_and_label_shift_warning():
    from dgan.config import load_config
    from dgan.reference import LABEL_SHIFT_WARNING, reference_info, load_reference, reference_split

    if not SHARED_NPZ.is_file():
        pytest.skip(f"{SHARED_NPZ} not present")
    cfg = load_config(None, ["data.source=npz", f"data.path={SHARED_NPZ}"])
    images, labels = load_reference(cfg, "val")
    assert images.shape == (524, 1, 32, 32) and labels.shape == (524,)
    assert -1.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert reference_info(cfg, "val", 524, None)["warning"] == LABEL_SHIFT_WARNING
    assert "warning" not in reference_info(cfg, "train", 3882, None)
    assert reference_split(cfg, "train") == "train"
    phantoms = load_config(None, [])
    assert "warning" not in reference_info(phantoms, "val", 64, None)


def test_bad_requests_fail_before_any_work(extractor):
    from dgan.errors import EvalError
    from dgan.scoring import check_request

    ok = dict(sampler="ddim", steps=4, num_samples=8, t_values=(10, 50), num_steps=100, extractor_path=extractor)
    assert check_request(["fid", "psnr"], **ok)["name"] == "torchscript"
    assert check_request(["psnr"], **ok) == {"name": None}  # no extractor needed without FID/KID
    for metrics, change, message in ((["psnr"], {"t_values": (10, 100)}, r"0\.\.99"),
                                     (["ssim"], {"t_values": (-1,), "num_steps": None}, r"0\.\.T-1"),
                                     (["fid"], {"steps": 101}, "--steps 101"),
                                     (["kid"], {"num_samples": 1}, "at least 2"),
                                     (["fid"], {"extractor_path": "/nonexistent.pt"}, "no such file"),
                                     (["fid", "lpips"], {}, "choose from"),
                                     (["fid"], {"sampler": "euler"}, "sampler 'euler'")):
        with pytest.raises(EvalError, match=message):
            check_request(metrics, **{**ok, **change})
    assert check_request(["fid"], **{**ok, "sampler": "ddpm", "steps": 1000})["name"] == "torchscript"


def test_per_class_without_fid_or_kid_is_a_clear_error():
    from dgan.config import load_config
    from dgan.errors import EvalError
    from dgan.scoring import run_evaluation

    cfg = load_config(None, ["model.num_classes=2"])
    with pytest.raises(EvalError, match="--per-class scores FID/KID per class; add --fid"):
        run_evaluation(None, None, cfg, num_samples=4, sampler="ddim", steps=2, seed=0, metrics=["psnr"],
                       device=torch.device("cpu"), per_class=True)
