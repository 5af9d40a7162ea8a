"""Official FasterSeg weights on the command line: ``weights import`` -> ``eval``, ``weights export``
back to the same names, and ``--init`` from an official file."""

from __future__ import annotations

import json

import pytest
import torch

from fasterkd import cli
from fasterkd.config import preset
from fasterkd.engine.checkpoint import (
    build_network,
    checkpoint_header,
    export_official_weights,
    initialise_from,
    model_identity,
    read_checkpoint,
)
from fasterkd.models.official import fasterseg_state_dict, from_official_weights
from test_official_weights import needs_ref, random_official_state_dict, read_tsv

pytestmark = [needs_ref, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTERKD_CACHE", str(tmp_path_factory.getbasetemp() / "fasterkd-cache"))


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    state = random_official_state_dict(read_tsv(), seed=3)
    path = tmp_path_factory.mktemp("official") / "weights1.pt"
    torch.save(state, path)  # as the official train.py saves model.state_dict()
    return path, state


def test_import_then_eval_then_export_round_trip(official_file, tmp_path, capsys):
    path, state = official_file
    root = tmp_path / "data"
    assert cli.main(["data", "synth", "--out", str(root), "--n", "2", "--size", "64x128", "--split", "val"]) == 0
    best = tmp_path / "official" / "best.pt"
    assert cli.main(["weights", "import", str(path), "--out", str(best)]) == 0
    ckpt = read_checkpoint(best)  # a normal fasterkd checkpoint
    assert ckpt["stage"] == "baseline" and ckpt["config"]["model"]["head"] == "bilinear"
    assert ckpt["imported_from"] == str(path) and ckpt["epoch"] == 0
    report = tmp_path / "val.json"
    assert cli.main(["eval", str(best), "--data-root", str(root), "--max-images", "2", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["images"] == 2 and 0.0 <= result["pixel_acc"] <= 1.0
    # the same numbers as the official weights loaded straight into a network
    from fasterkd.data.loaders import open_split
    from fasterkd.data.transforms import EvalTransform
    from fasterkd.evaluate import evaluate

    cfg = preset("baseline", "paper", data_root=str(root))
    ds = open_split(cfg.data, "val", EvalTransform(), max_images=2)
    direct = evaluate(from_official_weights(path), torch.utils.data.DataLoader(ds, batch_size=1), torch.device("cpu"))
    assert result["pixel_acc"] == pytest.approx(direct["pixel_acc"], abs=1e-12)
    # export: the official file's names, shapes and values
    back = tmp_path / "weights_back.pt"
    assert cli.main(["weights", "export", str(best), "--out", str(back)]) == 0
    reread = torch.load(back, weights_only=True)
    assert set(reread) == set(state) and all(torch.equal(reread[k], v) for k, v in state.items())
    assert "wrote" in capsys.readouterr().out


def test_export_refuses_networks_the_official_code_lacks(tmp_path, capsys):
    cfg = preset("tutor", "smoke", out_dir=str(tmp_path))
    model = build_network(cfg)
    torch.save(checkpoint_header(cfg, model_identity(model, cfg), model), tmp_path / "tutor.pt")
    with pytest.raises(ValueError, match=r"tutor.pt: cannot be written as official .*'quarter\.0"):
        export_official_weights(tmp_path / "tutor.pt", tmp_path / "w.pt")
    assert cli.main(["weights", "export", str(tmp_path / "tutor.pt"), "--out", str(tmp_path / "w.pt")]) == 2
    assert "quarter.0" in capsys.readouterr().err and not (tmp_path / "w.pt").exists()


def test_init_from_an_official_file(official_file, tmp_path):
    path, state = official_file
    cfg = preset("baseline", "smoke", init=str(path), kd_weight=0.0)
    model = build_network(cfg)
    assert initialise_from(model, cfg) == []  # every weight from the file
    assert all(torch.equal(v, state[k]) for k, v in fasterseg_state_dict(model).items())
    # a tutor takes the student's weights; its 1/4 path starts fresh
    tcfg = preset("tutor", "smoke", init=str(path), kd_weight=0.0)
    fresh = initialise_from(build_network(tcfg), tcfg)
    assert fresh and all(k.startswith(("quarter", "refine4")) for k in fresh)
    # a file that is neither is named with both reasons
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    with pytest.raises(ValueError, match=r"not a fasterkd checkpoint.*nor official FasterSeg weights"):
        initialise_from(model, preset("baseline", "smoke", init=str(junk)))
    # the command line: one epoch of the baseline from the official weights
    out = tmp_path / "run"
    assert cli.main(["train", "baseline", "--profile", "smoke", "--device", "cpu", "--init", str(path), "--kd-weight", "0",
                     "--out", str(out), "--no-progress", "--set", "eval_every=0", "--set", "final_eval=false"]) == 0
    assert read_checkpoint(out / "last.pt")["step"] == 2
