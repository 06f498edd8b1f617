import pytest
import yaml

from attnfuse.data import make_synthetic_table


@pytest.fixture
def table_config(tmp_path):
    """A small SYNTHETIC table on disk and a CLI config that trains early fusion on it."""
    df, schema = make_synthetic_table(300, seed=0, missing_rate=0.1)
    path = tmp_path / "table.csv"
    df.to_csv(path, index=False)

    def write(**overrides):
        cfg = {
            "seed_everything": 0,
            "data": {"dataset": "table", "batch_size": 32, "table": {"path": str(path), "schema": schema.to_dict()}},
            "model": {"fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2, "dropout": 0.1}}, "dim": 16},
            "trainer": {"max_epochs": 2, "default_root_dir": str(tmp_path / "runs"), "enable_progress_bar": False,
                        "enable_model_summary": False, "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                                   "init_args": {"save_dir": str(tmp_path / "runs")}}},
        }
        for key, value in overrides.items():
            section, _, name = key.partition("__")
            cfg[section][name] = value
        out = tmp_path / f"config{len(list(tmp_path.glob('config*.yaml')))}.yaml"
        out.write_text(yaml.safe_dump(cfg))
        return out

    write.df, write.schema, write.path, write.tmp = df, schema, path, tmp_path
    return write
