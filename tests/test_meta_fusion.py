"""--meta end to end: every loader kind yields the same metadata, every registry model fuses it,
a run trained with it predicts with and without it (predict, eval, serve, Grad-CAM), and bad values
are refused naming the field."""
from __future__ import annotations

import importlib.util
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hamengine.config import LoaderConfig, LoaderKind, Precision
from hamengine.engine.runtime.run import RunDir
from hamengine.loaders import build_loader
from hamengine.loaders.ingest import metadata as M
from hamengine.loaders.pack.records import Pack
from hamengine.models import create_model, gradcam_target_layer, list_models

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

KINDS = ["resident", "torch", "dali"] + (["ffcv"] if importlib.util.find_spec("ffcv") else [])


def _cfg(kind: str, **kw) -> LoaderConfig:
    return LoaderConfig(kind=LoaderKind(kind), size=48, batch_size=16, dtype=Precision.FP32, workers=1,
                        meta=True, **kw)


def _pairs(labels: torch.Tensor, meta: torch.Tensor) -> list[tuple[float, ...]]:
    return [tuple(r) for r in torch.cat([labels[:, None].float(), meta.float()], 1).tolist()]


@pytest.mark.parametrize("kind", [*KINDS, "folder"])
def test_every_kind_yields_the_pack_metadata_with_its_batches(kind, loader_pack, synth_source):
    pack = Pack(loader_pack)
    schema = pack.meta_schema()
    extra = {"source": str(synth_source)} if kind == "folder" else {}
    # eval: storage order, so the rows are exactly the encoding of the split's metadata, in order
    val = build_loader(pack, "val", _cfg(kind, **extra), "cpu")
    try:
        got = [b for b in val]
    finally:
        val.close()
    assert all(len(b) == 3 for b in got)
    meta = torch.cat([b[2] for b in got])
    assert meta.dtype == torch.float32 and meta.shape == (pack.num_samples("val"), schema.width)
    assert torch.equal(meta, torch.from_numpy(schema.encode(pack.metadata("val"))))
    assert torch.equal(torch.cat([b[1] for b in got]).cpu(), torch.from_numpy(pack.labels("val")))
    # train: shuffled, augmented; each sample's (label, metadata) must be the pair the table holds
    table = torch.from_numpy(schema.encode(pack.metadata("train")))
    labels = torch.from_numpy(pack.labels("train"))
    train = build_loader(pack, "train", _cfg(kind, **extra), "cpu")
    try:
        batches = [b for b in train]
        if kind != "dali":  # plan-order kinds: the rows of the plan's indices, batch by batch
            assert torch.equal(torch.cat([b[2] for b in batches]), table[torch.from_numpy(train.plan().indices)])
    finally:
        train.close()
    seen = Counter(_pairs(torch.cat([b[1] for b in batches]).cpu(), torch.cat([b[2] for b in batches])))
    assert sum(seen.values()) == len(train) * 16
    assert not seen - Counter(_pairs(labels, table))  # DALI: each read once, with its own row


def test_eval_metadata_agrees_across_kinds_batch_by_batch(loader_pack):
    pack = Pack(loader_pack)
    per_kind = {}
    for kind in KINDS:
        ld = build_loader(pack, "test", _cfg(kind), "cpu")
        try:
            per_kind[kind] = [b[2] for b in ld]
        finally:
            ld.close()
    first = per_kind[KINDS[0]]
    for kind, batches in per_kind.items():
        assert len(batches) == len(first) and all(torch.equal(a, b) for a, b in zip(first, batches, strict=True)), kind


def test_dx_type_never_reaches_a_batch(loader_pack):
    """The loaders' metadata is the encoding of age, sex and site only: change dx_type (and dx) in
    every row and the table a loader would yield is byte for byte the same."""
    pack = Pack(loader_pack)
    schema = pack.meta_schema()
    rows = pack.metadata("train")
    flipped = [{**r, "dx_type": "histo" if r.get("dx_type") != "histo" else "follow_up", "dx": "mel"} for r in rows]
    assert np.array_equal(schema.encode(rows), schema.encode(flipped))
    ld = build_loader(pack, "train", _cfg("resident"), "cpu")
    try:
        assert torch.equal(ld.meta_table, torch.from_numpy(schema.encode(flipped)))
    finally:
        ld.close()
    assert "dx_type" not in " ".join(schema.columns())


@pytest.mark.parametrize("name", list_models())
def test_every_registry_model_fuses_metadata(name):
    missing = torch.from_numpy(M.MetaSchema(50.0, 15.0).missing())
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, meta_missing=missing).eval()
    x = torch.randn(2, 3, 64, 64)
    meta = torch.zeros(2, missing.numel())
    meta[:, 0] = torch.tensor([-2.0, 2.0])  # two ages
    with torch.no_grad():
        blank, given = model(x), model(x, meta)
        assert torch.equal(blank, model(x, missing.expand(2, -1)))  # None means "every field missing"
    assert blank.shape == given.shape == (2, 7) and not torch.allclose(blank, given)
    layer = gradcam_target_layer(model, name)
    assert any(layer is m for m in model.backbone.modules())  # Grad-CAM looks at the image branch


def test_a_meta_run_records_its_encoding_and_evaluates_with_and_without(meta_run, loader_pack):
    from hamengine.engine.evaluate.evaluator import EvalOptions, evaluate_run

    saved = json.loads(RunDir(meta_run).metadata.read_text())
    assert saved == Pack(loader_pack).meta_schema().record() and "dx_type" in saved["never"]
    assert json.loads((meta_run / "config.json").read_text())["meta"] is True
    with_meta = json.loads((meta_run / "eval-test" / "metrics.json").read_text())
    assert with_meta["eval"]["metadata"].startswith("used")
    without = evaluate_run(meta_run, EvalOptions(device="cpu", n_boot=0, plots=False, meta=False), progress=False)
    assert without["eval"]["metadata"].startswith("withheld")
    assert Path(without["outputs"]["metrics"]).parent.name == "eval-test-no-meta"
    assert (meta_run / "eval-test" / "metrics.json").is_file()  # the with-metadata scores stay
    from hamengine.cli import cli

    r = CliRunner().invoke(cli, ["report", str(meta_run), "--json"])
    assert r.exit_code == 0, r.output
    md = Path(json.loads(r.output)["markdown"]).read_text()
    assert "Metadata: used: age, sex and body site" in md


def test_a_meta_run_predicts_with_and_without_metadata(meta_run, synth_source):
    from hamengine.engine.evaluate.predict import Predictor
    from hamengine.engine.serve.gradcam import explain_image

    images = sorted(synth_source.rglob("*.jpg"))[:3]
    p = Predictor(meta_run, device="cpu")
    assert p.uses_metadata
    blank = p.probabilities(images)
    given = p.probabilities(images, [{"age": 80, "sex": "male", "localization": "back"}] * 3)
    partial = p.probabilities(images, [{"age": 35}, None, {"localization": "face"}])
    for probs in (blank, given, partial):
        assert probs.shape == (3, 7) and np.allclose(probs.sum(1), 1.0)
    assert not np.allclose(blank, given)  # the metadata reaches the model
    assert np.allclose(partial[1], blank[1])  # a row without metadata is the all-unknown prediction
    overlay, cls = explain_image(p, images[0])
    assert overlay.size[0] > 0 and 0 <= cls < 7


@pytest.mark.parametrize(("args", "field"), [(["--age", "forty"], "age"), (["--age", "130"], "age"),
                                             (["--sex", "x"], "sex"), (["--site", "moon"], "site")])
def test_predict_refuses_bad_metadata_naming_the_field(meta_run, synth_source, args, field):
    from hamengine.cli import cli

    image = str(sorted(synth_source.rglob("*.jpg"))[0])
    r = CliRunner().invoke(cli, ["predict", str(meta_run), image, "--device", "cpu", *args])
    assert r.exit_code != 0 and field in r.output, r.output
    ok = CliRunner().invoke(cli, ["predict", str(meta_run), image, "--device", "cpu", "--age", "45",
                                   "--sex", "female", "--site", "lower extremity", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["metadata"] is True


def test_predict_meta_csv_and_its_errors(meta_run, synth_source, tmp_path):
    from hamengine.cli import cli

    images = sorted(synth_source.rglob("*.jpg"))[:2]
    good = tmp_path / "meta.csv"
    good.write_text(f"image,age,sex,site\n{images[0].name},55,male,back\n")
    r = CliRunner().invoke(cli, ["predict", str(meta_run), *map(str, images), "--device", "cpu",
                                  "--meta-csv", str(good), "--json"])
    assert r.exit_code == 0, r.output
    bad = tmp_path / "bad.csv"
    bad.write_text(f"image,age\n{images[0].name},55\n{images[1].name},ancient\n")
    r = CliRunner().invoke(cli, ["predict", str(meta_run), *map(str, images), "--device", "cpu",
                                  "--meta-csv", str(bad)])
    assert r.exit_code != 0 and "bad.csv, line 3" in r.output and "age" in r.output, r.output


def test_an_image_only_run_refuses_metadata(eval_run, synth_source):
    from hamengine.cli import cli

    image = str(sorted(synth_source.rglob("*.jpg"))[0])
    r = CliRunner().invoke(cli, ["predict", str(eval_run), image, "--device", "cpu", "--age", "40"])
    assert r.exit_code != 0 and "without --meta" in r.output, r.output


def test_serve_takes_optional_metadata_fields(meta_run, synth_source):
    from fastapi.testclient import TestClient

    from hamengine.engine.serve.server import create_app

    jpeg = sorted(synth_source.rglob("*.jpg"))[0].read_bytes()
    files = {"image": ("lesion.jpg", io.BytesIO(jpeg), "image/jpeg")}
    with TestClient(create_app(meta_run, device="cpu")) as client:
        assert 'id="meta-site"' in client.get("/").text
        assert client.get("/api/model").json()["metadata"]["width"] == M.MetaSchema(0, 1).width
        plain = client.post("/api/predict", files=files)
        assert plain.status_code == 200 and plain.json()["metadata_used"] is False
        files = {"image": ("lesion.jpg", io.BytesIO(jpeg), "image/jpeg")}
        given = client.post("/api/predict", files=files, data={"age": "70", "sex": "male", "site": "back"})
        assert given.status_code == 200 and given.json()["metadata_used"] is True
        assert given.json()["probabilities"] != plain.json()["probabilities"]
        for data, field in (({"age": "old"}, "age"), ({"sex": "other"}, "sex"), ({"site": "moon"}, "site")):
            files = {"image": ("lesion.jpg", io.BytesIO(jpeg), "image/jpeg")}
            bad = client.post("/api/predict", files=files, data=data)
            assert bad.status_code == 422 and field in bad.json()["detail"], bad.json()


def test_serve_of_an_image_only_run_has_no_metadata_fields(eval_run, synth_source):
    from fastapi.testclient import TestClient

    from hamengine.engine.serve.server import create_app

    jpeg = sorted(synth_source.rglob("*.jpg"))[0].read_bytes()
    with TestClient(create_app(eval_run, device="cpu")) as client:
        assert 'id="meta-site"' not in client.get("/").text
        r = client.post("/api/predict", files={"image": ("a.jpg", io.BytesIO(jpeg), "image/jpeg")},
                        data={"age": "40"})
        assert r.status_code == 422 and "without --meta" in r.json()["detail"]


def test_a_meta_checkpoint_starts_a_new_model_from_its_image_branch(meta_run):
    """--pretrained-path RUN/checkpoints/best.pt of a --meta run: the backbone's weights load into
    an image-only model and into a new fused one (its metadata MLP and head start fresh)."""
    ckpt = meta_run / "checkpoints" / "best.pt"
    state = torch.load(ckpt, weights_only=True)["model"]
    plain = create_model("hamnet", pretrained_path=ckpt)
    fused = create_model("hamnet", pretrained_path=ckpt, meta_missing=torch.zeros(20))
    for k, v in plain.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, state[f"backbone.{k}"]), k
            assert torch.equal(fused.state_dict()[f"backbone.{k}"], v), k
