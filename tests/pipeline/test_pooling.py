"""The one ceil-mode cell pooling: the build's cells, the test stores' cells and the student's nodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_tools.errors import ConfigError
from cache_tools.fidelity import node_windows, pool_cells
from pipeline import inference
from student import functional as SF


def test_build_and_student_use_the_cache_tools_pooling():
    assert inference.pool_cells is pool_cells and SF.pool_nodes is pool_cells


@pytest.mark.parametrize("block", [(4, 4), (32, 32), (3, 5), 2, (1, 1)])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_numpy_and_torch_pool_the_same_windows(block, mode):
    f = np.random.default_rng(0).normal(size=(2, 3, 65, 33)).astype(np.float32)
    by_numpy = pool_cells(f, block, mode)
    by_torch = pool_cells(torch.from_numpy(f), block, mode).numpy()
    kh, kw = (block, block) if isinstance(block, int) else block
    assert by_numpy.shape == by_torch.shape == (2, 3, len(node_windows(65, kh)), len(node_windows(33, kw)))
    if mode == "max":
        np.testing.assert_array_equal(by_numpy, by_torch)
    else:  # the same windows; the sums' rounding may differ in the last bit
        np.testing.assert_allclose(by_numpy, by_torch, rtol=1e-6, atol=1e-6)
    # a clipped last window reduces over what it covers: rows 64:65, columns 32:33 of block 32
    if block == (32, 32):
        reduce = np.max if mode == "max" else np.mean
        np.testing.assert_allclose(by_numpy[..., 2, 1], reduce(f[..., 64:65, 32:33], axis=(-2, -1)), rtol=1e-6)


def test_gradients_flow_and_bad_modes_are_refused():
    x = torch.rand(1, 2, 9, 9, requires_grad=True)
    pool_cells(x, 4, "avg").sum().backward()
    assert x.grad is not None and float(x.grad.sum()) == pytest.approx(2 * 9)  # 3x3 cells, each averaging to 1
    for bad in (np.zeros((1, 4, 4), np.float32), torch.zeros(1, 1, 4, 4)):
        with pytest.raises(ConfigError, match="'max' or 'avg'"):
            pool_cells(bad, 2, "sum")
