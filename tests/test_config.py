import pytest

from sadiffuseq.cli import main, preset_path
from sadiffuseq.config import Config, load_config
from sadiffuseq.errors import UserError


def test_defaults_are_valid_and_presets_load():
    Config().validate()
    for name in ("tiny", "base", "science-2k"):
        load_config(preset_path(name))


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 256\n  n_heads: 4\ntrain:\n  lr: 3\n")
    cfg = load_config(path, ["--train.steps=7", "--train.betas=[0.8, 0.95]", "--sample.clamp=true"])
    assert cfg.model.d_model == 256 and cfg.model.n_heads == 4
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)  # an int is accepted for a float
    assert cfg.train.steps == 7 and cfg.train.betas == (0.8, 0.95) and cfg.sample.clamp is True


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--model.d_modle=64", "did you mean 'model.d_model'"),
        ("--modle.d_model=64", "unknown config section 'modle'"),
        ("--train.steps=abc", "train.steps='abc' has the wrong type: expected an integer"),
        ("--train.steps=true", "train.steps=True has the wrong type"),
        ("--train.steps=-5", "train.steps=-5 must be positive"),
        ("--diffusion.schedule=sqr", "diffusion.schedule='sqr' is not one of: sqrt, cosine, linear"),
        ("--model.n_heads=5", "model.d_model=768 is not divisible by model.n_heads=5"),
        ("--data.seq_len=40", "data.seq_len=40 cannot hold a source of data.max_src_len=48"),
        ("--sample.steps=5000", "sample.steps=5000 exceeds diffusion.steps=2000"),
        ("train.steps", "must look like --section.key=value"),
        ("--model.dropout=1.0", "model.dropout=1.0 must be in [0.0, 1.0)"),
        ("--data.task=jsonl", "data.task=jsonl needs data.train_path"),
    ],
)
def test_bad_settings_name_the_key(override, expected):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("model:\n  widht: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown key 'model.widht'"):
        load_config(bad)


def test_cli_reports_config_errors_without_traceback(capsys, tmp_path):
    code = main(["data", "--config", "tiny", "--model.d_modle=3", f"--train.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: command line: unknown key 'model.d_modle'")
    assert "Traceback" not in err
    assert main(["train", "--config", "no-such-preset"]) == 2
    assert "no such file or preset" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["data", "train", "sample", "eval", "demo", "bench"])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: sadiffuseq {command}" in out and "example" in out


def test_configs_saved_before_a_key_was_renamed_still_load():
    from sadiffuseq.config import config_from_dict

    assert config_from_dict({"model": {"flex_global_copies": True}}).model.flex_globals == "split"
    assert config_from_dict({"model": {"flex_globals": "copies"}}).model.flex_globals == "split"
    assert config_from_dict({"model": {"flex_global_copies": False}}).model.flex_globals == "inline"
    with pytest.raises(UserError, match="model.flex_globals"):
        config_from_dict({"model": {"flex_globals": "diagonal"}})
