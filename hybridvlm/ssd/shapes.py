"""Shape checks shared by the SSD implementations: a wrong tensor is named, not
left to fail inside a rearrange or a kernel's block spec."""

from __future__ import annotations

import numbers


def check_inputs(x, dt, A, B, C, initial_state=None, *, chunk_size=None) -> None:
    """Raises ValueError naming the first input that disagrees with x (b, l, h, p).

    Expected: dt (b, l, h); A (h,); B and C (b, l, g, n) with g dividing h;
    initial_state (b, h, p, n) or None; chunk_size a positive int or None.
    """
    if x.ndim != 4:
        raise ValueError(f"SSD input x: expected (batch, length, heads, head_dim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.ndim != 4 or tuple(B.shape[:2]) != (b, l):
        raise ValueError(f"SSD input B: expected (batch={b}, length={l}, groups, state), got shape {tuple(B.shape)}")
    g, n = B.shape[2:]
    expected = {"dt": (dt, (b, l, h)), "A": (A, (h,)), "C": (C, (b, l, g, n))}
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (b, h, p, n))
    for name, (value, shape) in expected.items():
        if tuple(value.shape) != shape:
            raise ValueError(f"SSD input {name}: expected shape {shape} (from x {tuple(x.shape)} and B "
                             f"{tuple(B.shape)}), got {tuple(value.shape)}")
    if g == 0 or h % g:
        raise ValueError(f"SSD input B: {g} groups do not divide {h} heads")
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"SSD chunk_size: expected a positive int, got {chunk_size!r}")
