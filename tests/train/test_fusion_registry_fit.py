"""A registry is a promise: every fusion `attnfuse list` shows trains by name from a one-line config change."""

import pytest
import yaml

from attnfuse.cli import main
from attnfuse.fusion import list_fusions


@pytest.fixture(scope="module")
def base_config():
    return {
        "seed_everything": 0,
        "data": {"dataset": "synthetic", "options": {"num_rows": 120}, "batch_size": 32},
        "model": {"dim": 16},
        "trainer": {"max_steps": 2, "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "test_after_fit": False,
    }


@pytest.mark.parametrize("name", list_fusions())
def test_every_registered_fusion_fits_by_name(name, base_config, tmp_path, capsys):
    cfg = {**base_config, "model": {**base_config["model"], "fusion": name}}  # the one-line change
    cfg["trainer"] = {**cfg["trainer"], "default_root_dir": str(tmp_path)}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["fit", "--config", str(path)])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert next((tmp_path / "lightning_logs").glob("version_0/checkpoints/*.ckpt"), None) is not None


@pytest.mark.parametrize("name", list_fusions())
def test_every_registered_fusion_prints_its_options(name, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--model.fusion", name, "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    fusion = printed["model"]["fusion"]
    assert fusion["class_path"].startswith("attnfuse.") and isinstance(fusion["init_args"], dict)
