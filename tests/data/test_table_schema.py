"""Schema declaration and validation errors, one test per kind of mistake; table loading."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnfuse.data import InputSpec, SchemaError, TableSchema, load_table, validate


@pytest.fixture
def df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [30.0, 41.0, np.nan, 25.0],
            "bmi": [22.0, 27.5, 30.1, 19.9],
            "site": ["a", "b", None, "a"],
            "note": ["ok", None, "fine", ""],
            "label": ["yes", "no", "yes", "no"],
            "score": [0.1, 0.5, 0.7, 0.2],
        }
    )


def _schema(*inputs: InputSpec, target: str = "label", task: str = "classification") -> TableSchema:
    return TableSchema(inputs=inputs or (InputSpec("vitals", "numeric", ["age", "bmi"]),), target=target, task=task)


def test_valid_schema_passes(df):
    schema = _schema(
        InputSpec("vitals", "numeric", ["age", "bmi"]), InputSpec("site", "categorical", ["site"]), InputSpec("note", "text", ["note"])
    )
    assert validate(df, schema) == set()


def test_unknown_column_lists_available_and_close_match(df):
    with pytest.raises(SchemaError) as info:
        validate(df, _schema(InputSpec("vitals", "numeric", ["age", "bmj"])))
    msg = str(info.value)
    assert "unknown column 'bmj'" in msg and "did you mean ['bmi']" in msg
    assert "available columns: ['age', 'bmi', 'site', 'note', 'label', 'score']" in msg


def test_wrong_dtype_for_numeric(df):
    with pytest.raises(SchemaError, match=r"column 'site' has dtype .*expected a numeric dtype"):
        validate(df, _schema(InputSpec("x", "numeric", ["age", "site"])))


def test_wrong_dtype_for_text(df):
    with pytest.raises(SchemaError, match=r"column 'bmi' has dtype float64, expected strings"):
        validate(df, _schema(InputSpec("t", "text", ["bmi"])))


def test_target_missing(df):
    with pytest.raises(SchemaError, match=r"target column is missing: 'lable' \(did you mean \['label'\]\?\)"):
        validate(df, _schema(target="lable"))
    assert validate(df.drop(columns="label"), _schema(), require_target=False) == set()


def test_nan_in_target(df):
    bad = df.assign(label=["yes", None, "no", "no"])
    with pytest.raises(SchemaError, match=r"target 'label' has missing values in 1 row\(s\) \(positions 1\)"):
        validate(bad, _schema())


def test_regression_target_must_be_numeric(df):
    with pytest.raises(SchemaError, match=r"task .regression. needs numeric values"):
        validate(df, _schema(task="regression"))
    validate(df, _schema(target="score", task="regression"))


def test_empty_group(df):
    with pytest.raises(SchemaError, match="empty column group"):
        validate(df, _schema(InputSpec("v", "vector", [])))
    # a vector input may take its values from arrays instead
    validate(df, _schema(InputSpec("v", "vector", [])), arrays={"v": np.zeros((4, 3))})


def test_arrays_must_match(df):
    with pytest.raises(SchemaError, match=r"arrays\['v'\] has 3 rows but the table has 4"):
        validate(df, _schema(InputSpec("v", "vector", [])), arrays={"v": np.zeros((3, 3))})
    with pytest.raises(SchemaError, match=r"arrays given for unknown input\(s\) \['w'\]"):
        validate(df, _schema(), arrays={"w": np.zeros((4, 3))})


def test_duplicate_names_and_columns():
    with pytest.raises(SchemaError, match=r"duplicate input name\(s\) \['a'\]"):
        TableSchema(inputs=[InputSpec("a", "numeric", ["x"]), InputSpec("a", "numeric", ["y"])], target="t")
    with pytest.raises(SchemaError, match=r"column\(s\) listed twice: \['x'\]"):
        InputSpec("a", "numeric", ["x", "x"])


def test_bad_kind_policy_task_and_columns():
    with pytest.raises(SchemaError, match="kind must be one of"):
        InputSpec("a", "picture", ["x"])
    with pytest.raises(SchemaError, match="nan_policy must be one of"):
        InputSpec("a", "numeric", ["x"], nan_policy="drop")
    with pytest.raises(SchemaError, match="columns must be a list"):
        InputSpec("a", "numeric", "x")
    with pytest.raises(SchemaError, match="task must be one of"):
        TableSchema(inputs=[InputSpec("a", "numeric", ["x"])], target="t", task="ranking")
    with pytest.raises(SchemaError, match="at least one input"):
        TableSchema(inputs=[], target="t")


def test_target_used_as_input(df):
    with pytest.raises(SchemaError, match="uses the target column 'score'"):
        validate(df, _schema(InputSpec("v", "numeric", ["bmi", "score"]), target="score", task="regression"))


def test_nan_policy_error(df):
    with pytest.raises(SchemaError, match=r"nan_policy='error' but 1 row\(s\) \(positions 2\)"):
        validate(df, _schema(InputSpec("vitals", "numeric", ["age", "bmi"], nan_policy="error")))
    with pytest.raises(SchemaError, match=r"2 row\(s\) \(positions 1, 3\)"):  # None and blank text
        validate(df, _schema(InputSpec("note", "text", ["note"], nan_policy="error")))


def test_all_problems_reported_at_once(df):
    with pytest.raises(SchemaError) as info:
        validate(df, _schema(InputSpec("a", "numeric", ["nope"]), InputSpec("b", "numeric", ["site"]), target="zzz"))
    msg = str(info.value)
    assert "'nope'" in msg and "'site'" in msg and "'zzz'" in msg


def test_allow_missing_inputs(df):
    schema = _schema(InputSpec("vitals", "numeric", ["age", "bmi"]), InputSpec("lab", "numeric", ["crp", "wbc"]))
    with pytest.raises(SchemaError, match="unknown column 'crp'"):
        validate(df, schema)
    assert validate(df, schema, allow_missing_inputs=True) == {"lab"}
    partial = _schema(InputSpec("lab", "numeric", ["age", "wbc"]))
    with pytest.raises(SchemaError, match="unknown column 'wbc'"):  # partly present is still an error
        validate(df, partial, allow_missing_inputs=True)


def test_schema_dict_roundtrip():
    schema = _schema(InputSpec("v", "numeric", ["a", "b"], nan_policy="zero"), InputSpec("c", "categorical", ["c"]))
    assert TableSchema.from_dict(schema.to_dict()) == schema
    as_mapping = {"target": "label", "inputs": {"v": {"kind": "numeric", "columns": ["a", "b"], "nan_policy": "zero"},
                                                "c": {"kind": "categorical", "columns": ["c"]}}}
    assert TableSchema.from_dict(as_mapping) == schema
    with pytest.raises(SchemaError, match="unknown key"):
        TableSchema.from_dict({"target": "y", "inputs": [], "model": 1})
    with pytest.raises(SchemaError, match="keys are name, kind, columns, nan_policy"):
        TableSchema.from_dict({"target": "y", "inputs": [{"name": "a", "kind": "numeric", "cols": ["x"]}]})


def test_validate_type_errors(df):
    with pytest.raises(TypeError, match="DataFrame"):
        validate(df.to_dict(), _schema())
    with pytest.raises(TypeError, match="TableSchema"):
        validate(df, {"target": "label"})


def test_load_table(tmp_path, df):
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(load_table(tmp_path / "t.parquet"), df)
    assert load_table(tmp_path / "t.csv").shape == df.shape
    (tmp_path / "t.xlsx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported table format 't\.xlsx'"):
        load_table(tmp_path / "t.xlsx")
    with pytest.raises(FileNotFoundError, match="table file not found"):
        load_table(tmp_path / "missing.csv")
