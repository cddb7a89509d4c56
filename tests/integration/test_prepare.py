"""`prepare` end to end on real sources: embedded sets, an image folder with bad inputs, atomicity."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import genmodels.data.shards as shards_module
from genmodels.config import PrepareParams
from genmodels.data.loader import ShardLoader
from genmodels.data.shards import PrepareError, iter_samples, load_manifest, prepare_shards
from genmodels.data.sources import SourceError
from tests.images import write_bad_folder, write_good_folder, write_unsafe_folder


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_mnist5k_manifest_describes_the_shards(mnist_shards):
    manifest = json.loads((mnist_shards / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["source"] == "mnist5k"
    assert (manifest["image_size"], manifest["channels"]) == (28, 1)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["num_samples"] + val["num_samples"] == 5000
    assert 400 < val["num_samples"] < 600
    assert len(train["shards"]) == -(-train["num_samples"] // 700)
    assert manifest["classes"] == [str(d) for d in range(10)] and manifest["rejected"] == []
    for shard in train["shards"] + val["shards"]:
        data = (mnist_shards / shard["name"]).read_bytes()
        assert len(data) == shard["num_bytes"]
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(list(iter_samples(data, shard["name"]))) == shard["num_samples"]
    assert sorted(p.name for p in mnist_shards.iterdir()) == sorted(
        ["manifest.json"] + [s["name"] for s in train["shards"] + val["shards"]]
    )


def test_same_input_gives_byte_identical_shards(tmp_path):
    params = PrepareParams(source="digits", image_size=16, max_samples_per_shard=400)
    prepare_shards(params, tmp_path / "a")
    prepare_shards(params, tmp_path / "b")
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    prepare_shards(params.model_copy(update={"seed": 1}), tmp_path / "c")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_folder_with_bad_inputs_converts_or_rejects_each_with_a_reason(tmp_path):
    good = write_good_folder(tmp_path / "images")
    cases = write_bad_folder(tmp_path / "images")
    (tmp_path / "images" / "README.txt").write_text("not an image extension: ignored, not rejected")
    out = tmp_path / "shards"
    manifest = prepare_shards(
        PrepareParams(source=f"folder:{tmp_path / 'images'}", image_size=16, channels=3, val_fraction=0.0), out
    )
    rejected = {r.key: r.reason for r in manifest.rejected}
    expected_rejects = {k: word for k, word in cases.items() if word != "convert"}
    assert set(rejected) == set(expected_rejects)
    for key, word in expected_rejects.items():
        assert word in rejected[key], (key, rejected[key])
    converted = sum(1 for word in cases.values() if word == "convert")
    assert manifest.split("train").num_samples == len(good) + converted
    assert manifest.classes == ["bad", "cat", "dog"]
    loader = ShardLoader(load_manifest(out), "train", batch_size_per_worker=len(good) + converted, shuffle=False)
    images, labels = next(iter(loader))
    assert images.shape == (len(good) + converted, 3, 16, 16)
    assert sorted(labels.tolist()) == sorted([0] * converted + [1] * 6 + [2] * 6)


@pytest.mark.timeout(60)  # reading the FIFO or /dev/zero would hang: fail instead
def test_folder_rejects_links_out_special_and_oversized_files_unread(tmp_path):
    good = write_good_folder(tmp_path / "images")
    cases = write_unsafe_folder(tmp_path / "images", tmp_path / "outside")
    root = os.path.realpath(tmp_path / "images")
    params = PrepareParams(
        source=f"folder:{tmp_path / 'images'}", image_size=16, val_fraction=0.0, max_file_bytes=2048
    )
    manifest = prepare_shards(params, tmp_path / "shards")
    rejected = {r.key: r.reason for r in manifest.rejected}
    expected_rejects = {k: word for k, word in cases.items() if word != "read"}
    assert set(rejected) == set(expected_rejects)
    for key, word in expected_rejects.items():
        assert word in rejected[key], (key, rejected[key])
    assert rejected["odd/zero.png"] == f"symlink to /dev/zero, outside the source folder {root}"
    assert rejected["odd/big.png"] == "file is 3000 bytes, more than prepare.max_file_bytes=2048"
    assert rejected["odd/ancestor"].startswith(f"symlinked directory to {root}, not followed")
    assert manifest.split("train").num_samples == len(good) + 2  # plain.png and the link to it
    assert manifest.classes == ["cat", "dog", "odd"]

    before = _tree_digest(tmp_path / "shards")
    line = re.escape(f"\n  odd/outside.png: symlink to {os.path.realpath(tmp_path / 'outside' / 'secret.png')}, outside")
    with pytest.raises(PrepareError, match=r"7 input\(s\) rejected(.|\n)*" + line):
        prepare_shards(params.model_copy(update={"on_bad_image": "fail"}), tmp_path / "shards")
    assert _tree_digest(tmp_path / "shards") == before


# Runs its arguments as its only child and prints that child's peak RSS (kB): what prepare itself held.
_PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def _prepare_peak_kb(params: Path, folder: Path, out: Path) -> int:
    command = [sys.executable, "-c", _PEAK_RSS, "genmodels", "prepare", "--params", str(params), "--out", str(out), "--set", f"prepare.source=folder:{folder}",
               "--set", "prepare.image_size=16", "--set", "prepare.val_fraction=0", "--set", f"prepare.max_file_bytes={1 << 20}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.timeout(180)
def test_a_file_growing_while_read_is_rejected_and_hostile_files_do_not_raise_peak_memory(tmp_path, repo_root):
    """The bad folder (a 67 M pixel decompression bomb, 16-bit, CMYK, truncated...) beside a file
    another process keeps appending to, against the good images alone: prepare's peak RSS, each
    run in a process of its own."""
    write_good_folder(tmp_path / "clean")
    write_good_folder(tmp_path / "hostile")
    cases = write_bad_folder(tmp_path / "hostile")
    growing = tmp_path / "hostile" / "bad" / "growing.png"
    grow = ("import sys, io; from PIL import Image; f = open(sys.argv[1], 'wb'); Image.new('L', (20, 20)).save(f, 'PNG')\n"
            "for _ in range(4096): f.write(bytes(8192)); f.flush()")  # 32 MiB, appended while prepare runs
    writer = subprocess.Popen([sys.executable, "-c", grow, str(growing)])
    try:
        clean_kb = _prepare_peak_kb(repo_root / "params.yaml", tmp_path / "clean", tmp_path / "clean-shards")
        hostile_kb = _prepare_peak_kb(repo_root / "params.yaml", tmp_path / "hostile", tmp_path / "hostile-shards")
    finally:
        writer.kill()
        writer.wait()
    rejected = {r.key: r.reason for r in load_manifest(tmp_path / "hostile-shards").rejected}
    assert set(rejected) == {k for k, word in cases.items() if word != "convert"} | {"bad/growing.png"}
    assert "prepare.max_file_bytes=1048576" in rejected["bad/growing.png"], rejected["bad/growing.png"]
    print(f"prepare peak RSS: clean folder {clean_kb / 1024:.0f} MiB, hostile folder {hostile_kb / 1024:.0f} MiB")
    # Decoding the bomb alone would take 64 MiB (8192 x 8192 x 1 byte; seen: +130 MiB with the guard off).
    assert hostile_kb - clean_kb < 32 * 1024, (clean_kb, hostile_kb)


def test_on_bad_image_fail_refuses_and_keeps_previous_shards(tmp_path):
    write_good_folder(tmp_path / "images")
    out = tmp_path / "shards"
    source = f"folder:{tmp_path / 'images'}"
    prepare_shards(PrepareParams(source=source, image_size=16), out)
    before = _tree_digest(out)
    (tmp_path / "images" / "cat" / "broken.png").write_bytes(b"")
    with pytest.raises(PrepareError, match=r"1 input\(s\) rejected.*\n  cat/broken.png: empty file"):
        prepare_shards(PrepareParams(source=source, image_size=16, on_bad_image="fail"), out)
    assert _tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shards")] == []


@pytest.mark.parametrize("make", [lambda root: None, lambda root: root.mkdir()])
def test_missing_or_imageless_folder_is_a_clear_error(tmp_path, make):
    root = tmp_path / "nothing"
    make(root)
    (tmp_path / "nothing.txt").write_text("")
    with pytest.raises(SourceError, match=f"folder '{root}' (does not exist|contains no image files)"):
        prepare_shards(PrepareParams(source=f"folder:{root}"), tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


def test_crash_mid_write_leaves_previous_shards_intact(tmp_path, monkeypatch):
    params = PrepareParams(source="digits", image_size=8, max_samples_per_shard=100)
    out = tmp_path / "shards"
    prepare_shards(params, out)
    before = _tree_digest(out)
    calls = {"n": 0}
    real = shards_module.resize_center_crop

    def crash_after_some(img, size):  # fault injection: the process dies half-way through a split
        calls["n"] += 1
        if calls["n"] == 500:
            raise KeyboardInterrupt("simulated crash")
        return real(img, size)

    monkeypatch.setattr(shards_module, "resize_center_crop", crash_after_some)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(params.model_copy(update={"image_size": 12}), out)
    assert calls["n"] == 500
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


@pytest.mark.parametrize("edit,overrides,message", [
    (None, ["--set", "prepare.image_size=large"], 'prepare.image_size: expected an integer in [8, 512], got "large"'),
    (("prepare:\n", "prepare:\n  imgsize: 28\n"), [], "prepare.imgsize: unknown key"),
    (("prepare:\n", "prepare: [\n"), [], "params.yaml: not valid YAML"),
    ((None, "# nothing yet\n"), [], "params.yaml: empty, no params at all"),
], ids=["wrong-type", "unknown-key", "yaml-syntax", "empty-file"])
def test_cli_bad_params_fail_before_touching_outputs(tmp_path, repo_root, edit, overrides, message):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "manifest.json").write_text("previous")
    params = tmp_path / "params.yaml"
    text = (repo_root / "params.yaml").read_text()
    if edit:
        old, new = edit
        text = new if old is None else text.replace(old, new, 1)
    params.write_text(text)
    result = subprocess.run(["genmodels", "prepare", "--params", str(params), "--out", str(out), *overrides],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "manifest.json").read_text() == "previous"
