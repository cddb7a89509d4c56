"""Featurizer and evaluation on the real embedded data: classifier accuracy, FID sanity, the
evaluate stage end to end (metrics file, cache, MLflow), VAE likelihood bounds."""

import json

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from genmodels.data.loader import read_images, read_split
from genmodels.config import FeaturizerParams, PrepareParams, parse_params
from genmodels.data.shards import load_manifest, prepare_shards
from genmodels.families import get_family
from genmodels.families.vae import VAEPeriodicEval
from genmodels.metrics.features import INCEPTION_WEIGHTS_FILE, load_extractor, quantize_8bit
from genmodels.metrics.fid import FeatureStats, fid_from_stats
from genmodels.metrics.protocol import SignatureMismatch, check_comparable, reference_stats
from genmodels.report import write_report
from genmodels.stages.evaluate import _sample_checks, evaluate
from genmodels.stages.featurizer import train_featurizer
from genmodels.tracking import open_run, resolve_tracking
from genmodels.train.ddp import Precision
from genmodels.train.loop import TrainJob
from tests.images import digit_like, write_good_folder

SMALL_EVAL = {"num_samples": 300, "kid_subset_size": 100, "kid_num_subsets": 10, "bootstrap_resamples": 3,
              "iwae_num_samples": 5, "reference_max_samples": 1000}


@pytest.fixture(scope="module")
def featurizer(mnist_shards, tmp_path_factory):
    """The shipped featurizer params on mnist5k: the accuracy the offline FID stands on."""
    out = tmp_path_factory.mktemp("featurizer")
    summary = train_featurizer(FeaturizerParams(), mnist_shards, out / "model", out / "featurizer.json")
    return out / "model", summary


@pytest.mark.slow
def test_domain_classifier_reaches_97_percent_on_mnist5k(featurizer):
    model_dir, summary = featurizer
    assert summary["val_accuracy"] >= 0.97, summary
    assert json.loads((model_dir / "config.json").read_text())["val_accuracy"] == summary["val_accuracy"]


def test_fid_grows_monotonically_with_noise_on_real_features(featurizer, mnist_shards):
    extractor = load_extractor("domain", featurizer_dir=featurizer[0])
    reference = FeatureStats.from_features(torch.cat([extractor.features(x) for x, _ in read_split(mnist_shards, "train", limit=2000)]))
    val = torch.cat([x for x, _ in read_split(mnist_shards, "val")])
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(val.shape, generator=generator)
    fids = [fid_from_stats(reference, FeatureStats.from_features(extractor.features((val + sigma * noise).clamp(-1, 1))))
            for sigma in (0.0, 0.1, 0.25, 0.5, 1.0)]
    assert fids == sorted(fids) and fids[-1] > 5 * fids[0], fids


def _fake_trained_model(project, family, mnist_shards):
    """A models/<family>/ as the train stage writes it (random weights; Ray is not the subject here)."""
    params = parse_params({"train": {"gan": {"width": 8, "latent_dim": 16}, "vae": {"width": 8, "latent_dim": 8}}}).train
    spec = get_family(family)
    model = spec.build_generator(spec.params(params), image_size=28, channels=1)
    weights = {spec.generator_key: model.state_dict()}
    target = project / "models" / family
    target.mkdir(parents=True)
    torch.save(weights, target / "weights.pt")
    (target / "config.json").write_text(json.dumps({"family": family, "image_size": 28, "channels": 1, family: spec.params(params).model_dump()}))
    tracking = resolve_tracking(project)
    run_id, _ = open_run(tracking, experiment="genmodels", run_key=f"eval-test-{family}", run_name=family, params={}, tags={})
    (target / "mlflow.json").write_text(json.dumps({"tracking_uri": tracking.uri, "run_id": run_id}))
    return tracking, run_id


def test_evaluate_gan_writes_metrics_signature_cache_and_mlflow(featurizer, mnist_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracking, run_id = _fake_trained_model(tmp_path, "gan", mnist_shards)
    params = parse_params({"evaluate": {**SMALL_EVAL, "cache_dir": str(tmp_path / "cache")}})
    record = evaluate(params, "gan", models_dir=tmp_path / "models", shards=mnist_shards, featurizer_dir=featurizer[0],
                      metrics_dir=tmp_path / "metrics")
    written = json.loads((tmp_path / "metrics/eval_gan.json").read_text())
    assert written == json.loads(json.dumps(record))
    for key in ("fid", "fid_bootstrap_std", "kid", "kid_std", "precision", "recall", "density", "coverage", "classifier_score"):
        assert isinstance(written[key], float), key
    assert written["fid"] > 0 and written["fid_bootstrap_std"] > 0 and 0 <= written["precision"] <= 1
    assert written["featurizer_val_accuracy"] == featurizer[1]["val_accuracy"]
    signature = written["signature"]
    assert signature["extractor"].startswith("domain-cnn") and signature["num_real"] == 1000 and signature["num_generated"] == 300
    assert signature["prdc_num_samples"] == 300 and signature["prdc_k"] == 5  # PRDC on 300 real vs 300 generated
    assert (signature["kid_subset_size"], signature["kid_num_subsets"], signature["seed"]) == (100, 10, 0)
    assert len(list((tmp_path / "cache").glob("reference-*.pt"))) == 1
    again = evaluate(params, "gan", models_dir=tmp_path / "models", shards=mnist_shards, featurizer_dir=featurizer[0],
                     metrics_dir=tmp_path / "metrics")
    assert again["signature"] == signature and again["fid"] == pytest.approx(record["fid"], rel=1e-9)  # from the cache
    run = MlflowClient(tracking.uri).get_run(run_id)
    assert run.data.metrics["evaluate/fid"] == pytest.approx(record["fid"])
    assert run.data.tags["eval.signature.extractor_sha256"] == signature["extractor_sha256"]
    assert any(a.path.startswith("images/eval_samples+") for a in MlflowClient(tracking.uri).list_artifacts(run_id, "images"))
    # Class coverage and the memorisation check (random weights: blobs of one class or none, copying nothing).
    assert 0 <= written["classes_under_half_share"] <= 10 and 0 <= written["class_share_tv"] <= 1
    assert written["memorised_fraction"] < 0.05 and written["memorisation_threshold"] > 0
    images = [a.path for a in MlflowClient(tracking.uri).list_artifacts(run_id, "images")]
    assert any("eval_samples_vs_real" in path for path in images) and any("eval_closest_to_train" in path for path in images)
    # The report covers the families that exist, here the GAN alone; evaluate logged it to the run.
    logged = {a.path for a in MlflowClient(tracking.uri).list_artifacts(run_id)}
    assert {"report.html", "eval_class_share.json"} <= logged, logged
    page = tmp_path / "page.html"
    assert write_report(params, page, models_dir=tmp_path / "models", shards=mnist_shards, metrics_dir=tmp_path / "metrics") == ["gan"]
    html = page.read_text()
    assert '<section id="gan">' in html and 'id="vae"' not in html
    assert html.count("data:image/png;base64,") == 2  # samples and real images; no curves: this model never trained
    other = {**record, "signature": {**signature, "num_generated": 5000}}
    with pytest.raises(SignatureMismatch, match="num_generated: 300 vs 5000"):
        check_comparable(record, other)
    check_comparable(record, again)


def test_the_memorisation_check_flags_training_images_and_pairs_each_with_itself(featurizer, mnist_shards, tmp_path):
    manifest = load_manifest(mnist_shards)
    ep = parse_params({"evaluate": {**SMALL_EVAL, "cache_dir": str(tmp_path)}}).evaluate
    extractor = load_extractor("domain", featurizer_dir=featurizer[0])
    reference = reference_stats(extractor, manifest, ep)
    train = read_images(manifest, "train", limit=ep.reference_max_samples)
    copies = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:300]]
    numbers, pictures = _sample_checks(extractor, copies, reference, manifest, ep, featurizer_dir=featurizer[0])
    assert numbers["memorised_fraction"] > 0.9 and numbers["memorisation_num_train"] == 1000
    assert numbers["classes_under_half_share"] == 0  # training images cover every class
    pairs = pictures["eval_closest_to_train"]  # samples on the top row, their nearest training images below
    assert pairs.shape == (2 * 30 + 2, 8 * 30 + 2) and (pairs[2:30] == pairs[32:60]).all()
    held_out, _ = _sample_checks(extractor, read_images(manifest, "val")[:300], reference, manifest, ep,
                                 featurizer_dir=featurizer[0])
    assert held_out["memorised_fraction"] < 0.05  # ~1% by construction


def test_evaluate_vae_reports_bounds_in_nats(featurizer, mnist_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    _fake_trained_model(tmp_path, "vae", mnist_shards)
    params = parse_params({"evaluate": {**SMALL_EVAL, "cache_dir": str(tmp_path / "cache")}})
    record = evaluate(params, "vae", models_dir=tmp_path / "models", shards=mnist_shards, featurizer_dir=featurizer[0],
                      metrics_dir=tmp_path / "metrics")
    assert record["elbo"] < 0 and record["iwae"] >= record["elbo"]  # log p(x) >= IWAE_k >= ELBO
    assert record["num_val"] == load_num_val(mnist_shards) and record["iwae_num_samples"] == 5
    assert "recon_fid" in record and "fid" in record
    assert record["signature"]["recon_num_generated"] == record["num_val"] and record["signature"]["iwae_num_samples"] == 5


def test_generated_images_are_quantized_to_8_bits_like_the_real_ones(featurizer):
    extractor = load_extractor("domain", featurizer_dir=featurizer[0])
    images = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1  # not on the 8-bit grid
    torch.testing.assert_close(extractor.features(images), extractor.features(quantize_8bit(images)), rtol=0, atol=0)


def test_periodic_vae_elbo_does_not_depend_on_the_world_size(mnist_shards):
    params = parse_params({"train": {"vae": {"width": 8, "latent_dim": 8}}}).train
    job = TrainJob(family="vae", params=params, shards=str(mnist_shards), manifest_sha256="-", image_size=28, channels=1,
                   tracking_uri="-", run_id="-")
    torch.manual_seed(0)
    task = get_family("vae").build_task(params, image_size=28, channels=1, device=torch.device("cpu"), world_size=1,
                                        precision=Precision())
    totals = {}
    for world_size in (1, 2, 3):
        ranks = [VAEPeriodicEval(job, task, rank=rank, world_size=world_size) for rank in range(world_size)]
        totals[world_size] = sum(float(r.local_sum()) for r in ranks) / ranks[0].num_val  # what all_reduce would sum
    assert totals[2] == pytest.approx(totals[1], rel=1e-12) and totals[3] == pytest.approx(totals[1], rel=1e-12), totals


def test_evaluate_vae_without_val_data_reports_sample_metrics_only(featurizer, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "shards"
    prepare_shards(PrepareParams(source="mnist5k", val_fraction=0.0), shards)
    _fake_trained_model(tmp_path, "vae", shards)
    params = parse_params({"evaluate": {**SMALL_EVAL, "cache_dir": str(tmp_path / "cache")}})
    record = evaluate(params, "vae", models_dir=tmp_path / "models", shards=shards, featurizer_dir=featurizer[0],
                      metrics_dir=tmp_path / "metrics")
    assert record["num_val"] == 0 and "elbo" not in record and "recon_fid" not in record and record["fid"] > 0


def test_featurizer_names_images_without_a_class(tmp_path):
    write_good_folder(tmp_path / "images")
    Image.fromarray(digit_like(7)).save(tmp_path / "images" / "top.png")  # at the top level: label -1
    shards = tmp_path / "shards"
    prepare_shards(PrepareParams(source=f"folder:{tmp_path / 'images'}", image_size=28, val_fraction=0.3), shards)
    with pytest.raises(ValueError, match=r"1 image\(s\) have no class label \(files at the top level"):
        train_featurizer(FeaturizerParams(num_epochs=1), shards, tmp_path / "featurizer", tmp_path / "featurizer.json")


def load_num_val(shards):
    return json.loads((shards / "manifest.json").read_text())["splits"]["val"]["num_samples"]


def test_inception_without_weights_or_extra_fails_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError, match=f"{INCEPTION_WEIGHTS_FILE}.*never downloaded"):
        load_extractor("inception", inception_weights=str(tmp_path / "missing.pth"))
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"not really weights")
    with pytest.raises(ImportError, match=r"pip install 'genmodels\[inception\]'"):
        load_extractor("inception", inception_weights=str(weights))
