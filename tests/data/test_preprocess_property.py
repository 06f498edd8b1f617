"""Property: any table through validate + TablePreprocessor.fit/transform gives finite, mask-consistent
values or a SchemaError, nothing else (random dtypes, NaN / inf / float32 overflow, blanks, duplicate
names, mixed types)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnfuse.data import InputSpec, SchemaError, TablePreprocessor, TableSchema, validate

NAMES = ["a", "b", "c", "d", "e"]
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e39, -1e39, 3e38, 1e-300, np.nan]))
CELLS = {
    "float": (FLOATS, "float64"),
    "int": (st.integers(-(2**40), 2**40), "int64"),
    "bool": (st.booleans(), "bool"),
    "Int64": (st.one_of(st.none(), st.integers(-100, 100)), "Int64"),
    "Float64": (st.one_of(st.none(), st.floats(-1e6, 1e6)), "Float64"),
    "str": (st.one_of(st.none(), st.sampled_from(["", " ", "x", "y", "nan", "inf"])), "object"),
    "mixed": (st.one_of(st.none(), st.integers(0, 3), st.floats(allow_nan=True), st.sampled_from(["", "x", "1"])), "object"),
}


@st.composite
def tables(draw) -> tuple[pd.DataFrame, TableSchema]:
    n = draw(st.integers(1, 8))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=5))  # repeats: duplicate column names
    columns = []
    for _ in names:
        cells, dtype = CELLS[draw(st.sampled_from(sorted(CELLS)))]
        values = draw(st.lists(cells, min_size=n, max_size=n))
        columns.append(pd.Series(values, dtype=dtype) if dtype != "object" else pd.Series(values, dtype=object))
    task = draw(st.sampled_from(["classification", "regression"]))
    target = pd.Series(draw(st.lists(st.one_of(st.integers(0, 2), FLOATS) if task == "regression" else st.integers(0, 2),
                                     min_size=n, max_size=n)))
    df = pd.concat([*columns, target], axis=1)
    df.columns = [*names, "y"]
    inputs, used = [], set()
    for i in range(draw(st.integers(1, 3))):
        cols = draw(st.lists(st.sampled_from(sorted(set(names))), min_size=1, max_size=3, unique=True))
        if used & set(cols):
            continue
        used |= set(cols)
        inputs.append(InputSpec(f"in{i}", draw(st.sampled_from(["numeric", "vector", "categorical"])), cols,
                                nan_policy=draw(st.sampled_from(["missing", "zero", "error"]))))
    if not inputs:
        inputs = [InputSpec("in0", "categorical", [names[0]])]
    return df, TableSchema(inputs=inputs, target="y", task=task)


def _check(pre: TablePreprocessor, df: pd.DataFrame) -> None:
    enc = pre.transform(df)
    n = len(df)
    assert enc.num_rows == n and enc.target is not None and len(enc.target) == n
    if pre.schema.task == "regression":
        assert np.isfinite(enc.target).all()
    for spec in pre.schema.inputs:
        values, present = enc.values[spec.name], enc.present[spec.name]
        assert present.dtype == bool and present.shape == (n,)
        assert values.shape == (n, len(spec.columns))
        assert (values[~present] == 0).all(), "an absent row holds zeros"
        if spec.nan_policy != "missing":
            assert present.all()
        if spec.kind == "categorical":
            assert values.dtype == np.int64 and values.min(initial=0) >= 0
            assert (values.max(axis=0, initial=0) <= [len(v) for v in pre.vocabs[spec.name]]).all()
        else:
            assert values.dtype == np.float32 and np.isfinite(values).all()
            if spec.nan_policy == "missing":  # a present row had only finite float32 cells
                block = df[list(spec.columns)].to_numpy(dtype=np.float64, na_value=np.nan)
                with np.errstate(invalid="ignore"):
                    assert (np.abs(block[present]) <= np.finfo(np.float32).max).all()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(tables())
@pytest.mark.filterwarnings("ignore")
def test_any_table_is_a_finite_transform_or_a_schema_error(table):
    df, schema = table
    try:
        validate(df, schema)
        pre = TablePreprocessor.fit(df, schema, rows=np.arange(0, len(df), 2))
    except SchemaError:
        return
    _check(pre, df)
    _check(TablePreprocessor.from_dict(pre.to_dict()), df)  # the saved preprocessor behaves the same
