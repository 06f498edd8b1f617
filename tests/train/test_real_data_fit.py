"""Every catalog data set trains by name through `attnfuse fit` (real data from the offline catalog), including an
image input (mfeat's `pix` view as its 16x15 image) beside tabular views."""

import math

import pytest
import yaml

from attnfuse.cli import main
from attnfuse.data import list_datasets

DATASETS = {  # name -> (data options, metric that must beat chance)
    "mfeat": ({"pix_as_image": True}, 0.5),
    "nutrimouse": ({"target": "genotype"}, None),
    "womens_clothing": ({"text": "none", "rows": 600}, None),
}


def test_every_dataset_in_list_is_covered_here_or_synthetic():
    from attnfuse.data import DATASETS as REGISTRY

    real = {n for n in list_datasets() if not REGISTRY[n].synthetic and n != "table"}
    assert real == set(DATASETS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.registry(n)) for n in DATASETS])
def test_catalog_dataset_fits_by_name(name, tmp_path, capsys):
    options, floor = DATASETS[name]
    cfg = {
        "data": {"dataset": name, "options": options, "batch_size": 64},
        "model": {"fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2}}, "dim": 16},
        "trainer": {"max_epochs": 2, "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "enable_model_summary": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    acc = float(out.split("test_acc=")[1].split(",")[0])
    assert math.isfinite(acc)
    if floor is not None:
        assert acc > floor, out[-1000:]
