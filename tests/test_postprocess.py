"""Tests for bids_app.postprocess."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.postprocess import binarise, fill_holes_axial, keep_cord_components, trim_below

SPACING = (0.5, 0.5, 1.0)


def tube(mask, x, y, z0, z1, r=3):
    """Square-section rod of half-width r voxels around (x, y) for slices z0..z1-1."""
    mask[x - r : x + r + 1, y - r : y + r + 1, z0:z1] = 1


def test_binarise():
    prob = np.array([0.2, 0.5, 0.51, 1.0], np.float32).reshape(1, 1, 4)
    out = binarise(prob, 0.5)
    assert out.dtype == np.uint8 and out.ravel().tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        binarise(prob, 1.5)


def test_keep_cord_components_bridges_gaps_along_the_cord_only():
    m = np.zeros((60, 60, 120), np.uint8)
    tube(m, 30, 30, 0, 40)  # main cord, 40 mm
    tube(m, 31, 30, 45, 60)  # continues after a 5 mm gap, shifted 0.5 mm in-plane: kept
    tube(m, 31, 31, 70, 80)  # 10 mm above that: kept through the chain
    tube(m, 10, 30, 5, 30, r=2)  # beside the cord (same S-I range): removed
    tube(m, 30, 30, 100, 110, r=2)  # 20 mm above the chain's top: beyond 15 mm tolerance, removed
    tube(m, 50, 50, 82, 90, r=2)  # within the gap tolerance but 10 mm away in-plane: removed
    out = keep_cord_components(m, SPACING, gap_tolerance_mm=15.0, inplane_margin_mm=3.0)
    expected = np.zeros_like(m)
    tube(expected, 30, 30, 0, 40)
    tube(expected, 31, 30, 45, 60)
    tube(expected, 31, 31, 70, 80)
    assert np.array_equal(out, expected)


def test_keep_cord_components_inferior_side_and_trivial_cases():
    m = np.zeros((40, 40, 60), np.uint8)
    tube(m, 20, 20, 20, 60)
    tube(m, 20, 21, 5, 12)  # 8 mm below the main component: kept
    out = keep_cord_components(m, SPACING, gap_tolerance_mm=10.0)
    assert np.array_equal(out, m)
    tighter = keep_cord_components(m, SPACING, gap_tolerance_mm=5.0)
    assert tighter[:, :, :12].sum() == 0 and tighter[:, :, 20:].sum() == m[:, :, 20:].sum()
    assert keep_cord_components(np.zeros((4, 4, 4)), SPACING).sum() == 0


def test_fill_holes_axial_fills_each_plane_only():
    m = np.zeros((9, 9, 5), np.uint8)
    m[2:7, 2:7, 1:4] = 1
    m[3:6, 3:6, 1:4] = 0  # hollow square tube open at both ends: holes in each plane
    m[4, 4, 2] = 1
    out = fill_holes_axial(m)
    assert out[2:7, 2:7, 1:4].all()
    assert out.sum() == 5 * 5 * 3
    c = np.zeros((5, 5, 5), np.uint8)
    c[1:4, 1:4, 1:4] = 1
    c[2, 2, 2] = 0  # 3-D cavity inside a cube is an axial hole too
    assert fill_holes_axial(c)[2, 2, 2] == 1
    open_c = np.zeros((5, 5, 3), np.uint8)
    open_c[1:4, 1:4, 1] = 1
    open_c[2, 3, 1] = 0  # notch open to the outside: not a hole
    assert fill_holes_axial(open_c)[2, 3, 1] == 0


def test_trim_below_uses_a_10_mm_margin_along_s():
    m = np.ones((3, 3, 60), np.uint8)
    out = trim_below(m, np.array([1.0, 1.0, 30.0]), (1.0, 1.0, 0.5), margin_mm=10.0)
    kept = np.nonzero(out.any(axis=(0, 1)))[0]
    assert kept.min() == 10 and kept.max() == 59  # slice 10 is exactly 10 mm below: kept
    assert np.array_equal(trim_below(m, None, (1, 1, 1)), m)
