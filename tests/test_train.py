"""Training, checkpoints and exact resumption on a tiny synthetic task."""

import json
import shutil

import pytest
import torch

from sadiffuseq.checkpoint import EMA, find_checkpoint, load_model, save_checkpoint
from sadiffuseq.config import load_config
from sadiffuseq.errors import UserError
from sadiffuseq.train import lr_at, train

from conftest import tiny_overrides


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_save_load_gives_identical_outputs(tiny_cfg, tmp_path):
    from sadiffuseq.data.dataset import ensure_dataset
    from sadiffuseq.train import build_model

    meta = ensure_dataset(tiny_cfg.data, tiny_cfg.data_dir, progress=False)
    model = build_model(tiny_cfg, meta["vocab_size"], torch.device("cpu")).eval()
    ema = EMA(model, 0.9)
    with torch.no_grad():  # make EMA differ from the raw weights
        for p in model.parameters():
            p.add_(0.01)
    ckpt = save_checkpoint(tmp_path / "r", 5, model, ema, tiny_cfg, tiny_cfg.data_dir / "tokenizer.json", {"x": 1})
    x, t = torch.randn(2, 16, tiny_cfg.model.d_emb), torch.tensor([3, 70])
    loaded, cfg, tok = load_model(tmp_path / "r", weights="raw")
    assert torch.equal(loaded(x, t), model(x, t))
    assert cfg.to_dict() == tiny_cfg.to_dict() and tok.get_vocab_size() == meta["vocab_size"]
    ema_model, _, _ = load_model(ckpt, weights="ema")
    assert torch.equal(dict(ema_model.named_parameters())["embed.weight"], ema.shadow["embed.weight"])
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text().strip() == "step_00000005"


def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path):
    full_cfg = load_config(None, tiny_overrides(tmp_path, **{"train.out_dir": tmp_path / "full"}))
    train(full_cfg, progress=False, log=lambda *_: None)
    full = _losses(tmp_path / "full")
    assert [s for s, _ in full] == [1, 2, 3, 4, 5, 6]

    # The same run, "killed" after its step-3 checkpoint: drop the final checkpoint, then resume.
    cut_cfg = load_config(None, tiny_overrides(tmp_path, **{"train.out_dir": tmp_path / "cut"}))
    train(cut_cfg, progress=False, log=lambda *_: None)
    ckpts = tmp_path / "cut" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000006")
    (ckpts / "latest").write_text("step_00000003\n")
    with pytest.raises(UserError, match="already holds a training run"):
        train(cut_cfg, progress=False, log=lambda *_: None)  # never overwrites a run silently
    train(cut_cfg, resume=True, progress=False, log=lambda *_: None)
    resumed = _losses(tmp_path / "cut")
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]  # log lines after the checkpoint were replaced
    assert resumed == full  # bit-identical losses
    a, _, _ = load_model(tmp_path / "full", weights="raw")
    b, _, _ = load_model(tmp_path / "cut", weights="raw")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_training_lowers_the_loss_and_writes_the_run(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"train.steps": 60, "train.log_every": 10, "train.eval_every": 30}))
    run = train(cfg, progress=False, log=lambda *_: None)
    losses = [l for _, l in _losses(run)]
    assert losses[-1] < 0.8 * losses[0]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records) and all("tokens_per_s" in r for r in records if "loss" in r)
    for name in ("config.yaml", "tokenizer.json", "loss.png"):
        assert (run / name).is_file()


def test_learning_rate_schedule():
    cfg = load_config(None, ["--train.lr=1.0", "--train.warmup_steps=10", "--train.steps=110"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.5) and lr_at(110, cfg) == pytest.approx(0.0)
    cfg.decay = "cosine"
    assert lr_at(60, cfg) == pytest.approx(0.5) and lr_at(35, cfg) == pytest.approx(0.5 * (1 + 2**-0.5))


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        find_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a sadiffuseq checkpoint: missing model.safetensors"):
        find_checkpoint(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="without a finished checkpoint"):
        find_checkpoint(tmp_path / "run")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("model.safetensors", "ema.safetensors", "config.yaml", "tokenizer.json", "trainer_state.pt"):
        (bad / name).write_text("garbage")
    with pytest.raises(UserError):
        load_model(bad)


def test_sample_command_rejects_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    from sadiffuseq.cli import main

    assert main(["sample", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not a sadiffuseq checkpoint: missing model.safetensors" in err and "Traceback" not in err
