"""scripts/bench_decode.py's rows of the dense model: as loaded, with the fused norms and attention (the same greedy
with every linear layer a no-op (the floor the other rows are read against: another text)."""

from tests.test_docs import script


def test_the_dense_rows_measure_what_they_say(model_dirs):
    bench_decode = script("bench_decode")
    found = {dtype: bench_decode.measure(str(model_dirs["llama"]), dtype, 6)
             for dtype in ("float32", "float32+fused", "float32+nolinear")}  # fmt: skip
    for row in found.values():
        assert row["decode_tokens_per_second"] > 0 and row["prefill_tokens_per_second"] > 0
    assert found["float32+fused"]["text"] == found["float32"]["text"]
    assert found["float32+nolinear"]["text"] != found["float32"]["text"]
