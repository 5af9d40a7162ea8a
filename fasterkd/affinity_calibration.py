"""Measured seconds per image of the exact FA paths: the table behind ``impl="auto"``.

Written by ``benchmarks/fa_loss.py --calibrate`` (never by hand); see benchmarks/README.md.
``TIMINGS[device type][q]`` lists measured shapes as (pixels N, channels C_t + C_s,
{candidate: fastest forward + backward seconds per image}); a candidate is ``"reference"``,
``"gram"`` or ``"tiled:<tile>"``.
"""

MACHINE: dict = {}
COMMAND = ""
TIMINGS: dict = {}
