"""The count quantiser (SPEC 1.1): exact small counts, decade edges, numpy / torch agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lingshu.tokens import MASK_TOKEN, N_EXPR_TOKENS, VOCAB_SIZE, bin_edges, dequantize_tokens, quantize_counts


def test_constants():
    assert N_EXPR_TOKENS == 281 and MASK_TOKEN == 281 and VOCAB_SIZE == 282


@pytest.mark.parametrize("mode", ["lower", "center"])
def test_counts_below_100_round_trip_exactly(mode):
    x = np.arange(100)
    tok = quantize_counts(x)
    assert np.array_equal(tok, x)
    assert np.array_equal(dequantize_tokens(tok, mode=mode), x)


@pytest.mark.parametrize(
    "count, token",
    [(99, 99), (100, 100), (109, 100), (110, 101), (999, 189), (1000, 190), (1099, 190), (1100, 191),
     (9999, 279), (10000, 280), (123456, 280)],
)
def test_decade_edges(count, token):
    assert quantize_counts(np.array([count]))[0] == token
    assert quantize_counts(torch.tensor([count])).item() == token
    assert quantize_counts(np.array([count + 0.5]))[0] == token  # float counts are floored


def test_formula_matches_spec_over_its_range():
    x = np.arange(100, 10000)
    k = np.array([len(str(v)) - 1 for v in x])  # floor(log10 x) without floats
    r = (x - 10**k) // 10 ** (k - 1)
    assert np.array_equal(quantize_counts(x), 100 + 90 * (k - 2) + r)


def test_monotone_and_every_token_used():
    x = np.arange(20001)
    tok = quantize_counts(x)
    assert (np.diff(tok) >= 0).all()
    assert np.array_equal(np.unique(tok), np.arange(N_EXPR_TOKENS))


def test_numpy_and_torch_agree_for_every_dtype():
    x = np.arange(20001)
    ref = quantize_counts(x)
    for dt in (np.int32, np.uint16, np.float32, np.float64):
        assert np.array_equal(quantize_counts(x.astype(dt)), ref)
    for dt in (torch.int32, torch.int64, torch.float32, torch.float64):
        out = quantize_counts(torch.from_numpy(x).to(dt))
        assert out.dtype == torch.long and np.array_equal(out.numpy(), ref)
    assert quantize_counts(x, dtype=np.uint16).dtype == np.uint16
    assert quantize_counts(x[:-1].reshape(4, -1)).shape == (4, 5000)


@pytest.mark.parametrize("bad", [[-1], [np.nan], [np.inf], [3.0, -0.5]])
def test_negative_and_non_finite_raise(bad):
    with pytest.raises(ValueError):
        quantize_counts(np.array(bad))
    with pytest.raises(ValueError):
        quantize_counts(torch.tensor(bad))


def test_bin_edges_table_and_dequantize_within_bins():
    edges = bin_edges()
    assert edges.shape == (N_EXPR_TOKENS, 2)
    assert tuple(edges[99]) == (99, 99) and tuple(edges[100]) == (100, 109)
    assert tuple(edges[189]) == (990, 999) and tuple(edges[190]) == (1000, 1099)
    assert tuple(edges[279]) == (9900, 9999) and edges[280, 0] == 10000 and np.isinf(edges[280, 1])
    assert (edges[1:, 0] == edges[:-1, 1] + 1).all()  # contiguous, no gaps
    # every token's lower edge and centre quantise back to that token
    tok = np.arange(N_EXPR_TOKENS)
    for mode in ("lower", "center"):
        assert np.array_equal(quantize_counts(dequantize_tokens(tok, mode=mode)), tok)
    assert dequantize_tokens(np.array([100, 190, 280]), mode="center").tolist() == [105, 1050, 10000]
    assert dequantize_tokens(np.array([100, 190, 280]), mode="lower").tolist() == [100, 1000, 10000]
    t = torch.arange(N_EXPR_TOKENS)
    assert np.array_equal(dequantize_tokens(t).numpy(), dequantize_tokens(tok))


@pytest.mark.parametrize("bad", [MASK_TOKEN, -1, 300])
def test_dequantize_rejects_mask_and_out_of_range(bad):
    with pytest.raises(ValueError):
        dequantize_tokens(np.array([0, bad]))
    with pytest.raises(ValueError):
        dequantize_tokens(torch.tensor([0, bad]))
