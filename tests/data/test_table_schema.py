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


# --- bad files and bad values (issue 14) ---------------------------------------------------------


def test_duplicate_header_names_in_csv_and_tsv_are_rejected_not_renamed(tmp_path):
    (tmp_path / "t.csv").write_text("age,bmi,age,label\n1,2,3,x\n4,5,6,y\n")
    with pytest.raises(SchemaError, match=r"t\.csv has duplicate column name\(s\) \['age'\]"):
        load_table(tmp_path / "t.csv")
    (tmp_path / "t.tsv").write_text("a\tb\tb\n1\t2\t3\n")
    with pytest.raises(SchemaError, match=r"t\.tsv has duplicate column name\(s\) \['b'\]"):
        load_table(tmp_path / "t.tsv")
    (tmp_path / "ok.csv").write_text("NA,null,,\n1,2,3,4\n")  # names pandas would read as missing, empty names: not duplicates
    assert load_table(tmp_path / "ok.csv").shape == (1, 4)


def test_duplicate_column_names_in_parquet_are_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table([pa.array([1, 2]), pa.array([3, 4])], names=["age", "age"]), tmp_path / "t.parquet")
    with pytest.raises(SchemaError, match=r"t\.parquet has duplicate column name\(s\) \['age'\]"):
        load_table(tmp_path / "t.parquet")


def test_validate_rejects_duplicate_columns_of_a_dataframe(df):
    dup = pd.concat([df, df[["age"]]], axis=1)
    with pytest.raises(SchemaError, match=r"duplicate column name\(s\) \['age'\]"):
        validate(dup, _schema())


@pytest.mark.parametrize("content", ["", "   \n\n"])
def test_empty_file_names_the_file(tmp_path, content):
    for name in ("t.csv", "t.tsv", "t.parquet"):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=f"table file {tmp_path / name}") as err:
            load_table(tmp_path / name)
        assert "\n" not in str(err.value)


def test_header_only_table_is_one_line_naming_the_file(tmp_path, df):
    df.head(0).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(SchemaError, match=r"t\.csv has no data rows \(a header of 6 column\(s\) only\)") as err:
        load_table(tmp_path / "t.csv")
    assert "\n" not in str(err.value)
    df.head(0).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(SchemaError, match=r"t\.parquet has no data rows"):
        load_table(tmp_path / "t.parquet")


def test_validate_empty_frame_reports_no_rows_without_dtype_complaints(df):
    empty = df.head(0).astype(object)  # as pandas reads a header-only file
    with pytest.raises(SchemaError) as err:
        validate(empty, _schema(), require_target=False)
    assert "the table has no rows" in str(err.value) and "dtype" not in str(err.value)


def test_unparsable_file_names_the_file(tmp_path):
    (tmp_path / "t.parquet").write_text("not a parquet file")
    with pytest.raises(ValueError, match=r"cannot read table file .*t\.parquet"):
        load_table(tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text('a,b\n1,"2\n')  # unterminated quote
    with pytest.raises(ValueError, match=r"cannot read table file .*t\.csv"):
        load_table(tmp_path / "t.csv")


def test_nan_policy_error_rejects_inf_and_float32_overflow(df):
    df = df.assign(age=[30.0, np.inf, 41.0, 25.0], bmi=[22.0, 27.5, 1e39, 19.9])
    with pytest.raises(SchemaError, match=r"nan_policy='error' but 2 row\(s\) \(positions 1, 2\)"):
        validate(df, _schema(InputSpec("vitals", "numeric", ["age", "bmi"], nan_policy="error")))


def test_non_finite_regression_target_is_rejected(df):
    schema = _schema(target="score", task="regression")
    with pytest.raises(SchemaError, match=r"target column 'score' has non-finite values \(inf\) in 1 row\(s\) \(positions 2\)"):
        validate(df.assign(score=[0.1, 0.5, np.inf, 0.2]), schema)
    with pytest.raises(SchemaError, match=r"target column 'score' has values beyond float32's range .* \(positions 1\)"):
        validate(df.assign(score=[0.1, -1e39, 0.7, 0.2]), schema)


def test_complex_and_timedelta_columns_are_not_numeric(df):
    bad = df.assign(age=df["age"].astype(complex), bmi=pd.to_timedelta(df["bmi"], unit="s"))
    with pytest.raises(SchemaError) as err:
        validate(bad, _schema())
    assert "column 'age' has dtype complex128" in str(err.value) and "column 'bmi' has dtype timedelta64" in str(err.value)


def test_unknown_input_key_suggests_the_close_one():
    with pytest.raises(SchemaError, match=r"'column': did you mean 'columns'\?"):
        TableSchema.from_dict({"target": "y", "inputs": {"a": {"kind": "numeric", "column": ["x"]}}})
