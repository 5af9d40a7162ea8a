"""The tutor's design as run configuration: built from ModelConfig, recorded in the checkpoint, and
old tutor checkpoints (saved before those fields) rebuilt as the design they were trained with."""

from __future__ import annotations

import json

import pytest
import torch

from fasterkd.config import TrainConfig, preset
from fasterkd.engine.checkpoint import (
    build_network,
    checkpoint_header,
    check_resume_config,
    load_checkpoint,
    load_tutor,
    model_identity,
    read_checkpoint,
)


def _save(cfg: TrainConfig, path, drop: tuple[str, ...] = ()) -> dict:
    model = build_network(cfg)
    ckpt = checkpoint_header(cfg, model_identity(model, cfg), model)
    for k in drop:  # what a checkpoint written before these fields existed holds
        ckpt["config"]["model"].pop(k)
        ckpt["identity"].pop(k, None)
    torch.save(ckpt, path)
    return model.state_dict()


def test_defaults_are_the_tutor_config_defaults():
    from fasterkd.models.tutor import TutorConfig

    m = preset("tutor", "smoke").model
    t = TutorConfig(arch=None)
    assert (m.quarter_widths, m.refine_kernel, m.head_resolution) == (t.quarter_widths, t.refine_kernel, t.head_resolution)


def test_the_configured_design_is_built_recorded_and_rebuilt(tmp_path):
    cfg = preset("tutor", "smoke", quarter_widths=[96, 128], refine_kernel=1, head_resolution="1/8")
    cfg.validate()
    assert cfg.model.quarter_widths == (96, 128)
    net = build_network(cfg)
    assert (net.tutor_config.quarter_widths, net.tutor_config.refine_kernel, net.tutor_config.head_resolution) == ((96, 128), 1, "1/8")
    ident = model_identity(net, cfg)
    assert (ident["quarter_widths"], ident["refine_kernel"], ident["head_resolution"]) == ([96, 128], 1, "1/8")
    state = _save(cfg, tmp_path / "t.pt")
    model, back = load_checkpoint(tmp_path / "t.pt")
    assert back.model.quarter_widths == (96, 128) and model.tutor_config.refine_kernel == 1
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # another design does not build from it: a wrong width is named
    with pytest.raises(ValueError, match="quarter_widths must be 2 positive ints"):
        build_network(preset("tutor", "smoke", quarter_widths=[96]))


def test_an_old_tutor_checkpoint_loads_as_the_old_design(tmp_path):
    old = preset("tutor", "smoke", quarter_widths=[128, 128], refine_kernel=1)
    state = _save(old, tmp_path / "old.pt", drop=("quarter_widths", "refine_kernel", "head_resolution"))
    raw = torch.load(tmp_path / "old.pt", weights_only=True)
    assert "quarter_widths" not in raw["config"]["model"] and "refine_kernel" not in raw["identity"]
    ckpt = read_checkpoint(tmp_path / "old.pt")
    assert ckpt["config"]["model"]["quarter_widths"] == [128, 128] and ckpt["config"]["model"]["refine_kernel"] == 1
    assert ckpt["identity"]["refine_kernel"] == 1
    model, cfg = load_checkpoint(tmp_path / "old.pt")  # strict: every weight fits the old design
    assert (model.tutor_config.quarter_widths, model.tutor_config.refine_kernel) == ((128, 128), 1)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    student = preset("student", "smoke", tutor=str(tmp_path / "old.pt"))
    assert load_tutor(student, torch.device("cpu")).tutor_config.refine_kernel == 1
    # resuming it (the trainer reads it through read_checkpoint): the old design resumes, today's
    # default is another model
    check_resume_config(ckpt["config"], old, "old.pt")
    with pytest.raises(ValueError, match="model.quarter_widths .*model.refine_kernel"):
        check_resume_config(ckpt["config"], preset("tutor", "smoke"), "old.pt")
    # built with today's defaults instead, the old weights would not fit
    with pytest.raises(RuntimeError):
        build_network(preset("tutor", "smoke")).load_state_dict(state)
