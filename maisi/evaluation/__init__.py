"""Checking what was generated, the library behind ``maisi.evaluate``: the run and its report (``run``),
its inputs (``inputs``), the 2.5D FID (``fid``) and the HU and mask-fidelity checks (``quality``) that
``maisi.infer`` also runs on every sample."""
